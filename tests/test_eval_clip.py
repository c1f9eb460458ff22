"""CLIP score (open_clip and Hugging Face backends) and HPSv2.1, with random weights in the real layouts and
CLIP's real BPE tokenizer (the vocabulary open_clip ships)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_weights import random_open_clip, smooth_images, tiny_clip_config, write_config, write_hf_clip, write_images
from PIL import Image

import main as cli
from models import clip_eval as ce
from models import evaluation as ev

CPU = torch.device("cpu")
CAPTIONS = ["a red square", "a photo of two dogs on grass", "a blue car", "the green sea at night"]


def _train_to_pair(model, pixels, captions, steps=60):
    """A few contrastive steps so that the random tiny CLIP matches these images with these captions."""
    ids = ce.open_clip_tokenize([ce.CLIP_PREFIX + c for c in captions])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    target = torch.arange(len(captions))
    model.train()
    for _ in range(steps):
        img = F.normalize(model.encode_image(pixels), dim=-1)
        txt = F.normalize(model.encode_text(ids), dim=-1)
        logits = 20.0 * img @ txt.T
        loss = F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def clip_setup(tmp_path_factory):
    """Images + captions, a tiny ViT-B-32-quickgelu (open_clip file + config) trained to pair them, and the same
    weights as a Hugging Face CLIP folder."""
    root = tmp_path_factory.mktemp("clip")
    images = write_images(root / "images", [f"prompt_{i}.png" for i in range(4)], arrays=smooth_images(4, 40, 11))
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    cfg = tiny_clip_config("ViT-B-32-quickgelu")
    cfg_path = write_config(root / "vit_b_32_tiny.json", cfg)
    scorer = ce.ClipScorer("open_clip", None, cfg["vision_cfg"]["image_size"])
    pixels = torch.stack([scorer.preprocess(ev.load_rgb(p)) for p in ev.list_images(images)])
    model = _train_to_pair(random_open_clip(cfg), pixels, CAPTIONS)
    torch.save(model.state_dict(), root / "open_clip_model.pt")
    hf = write_hf_clip(root / "hf_clip", model, cfg)
    return {"root": root, "images": images, "cfg": cfg_path, "weights": root / "open_clip_model.pt", "hf": hf}


def test_clip_tokenizer_really_tokenises_and_both_backends_agree(clip_setup):
    from transformers import AutoTokenizer

    ids = ce.open_clip_tokenize([ce.CLIP_PREFIX + c for c in CAPTIONS])
    assert ids.shape == (4, 77) and len({tuple(r.tolist()) for r in ids}) == 4
    assert ids[0, :4].tolist() == [49406, 320, 1125, 29340]  # <start>, "a", "photo", "depicts"
    hf = AutoTokenizer.from_pretrained(clip_setup["hf"], local_files_only=True)
    hf_ids = hf([ce.CLIP_PREFIX + c for c in CAPTIONS], padding="max_length", max_length=77, truncation=True,
                return_tensors="pt")["input_ids"]
    n = (ids != 0).sum(dim=1)
    for row, k in enumerate(n.tolist()):  # same ids up to the end token; only the padding id differs
        assert hf_ids[row, :k].tolist() == ids[row, :k].tolist()
    long = ce.open_clip_tokenize(["word " * 200])
    assert long.shape == (1, 77) and long[0, -1] == 49407  # truncated, end-of-text kept last


def test_clip_score_of_matching_pairs_beats_shuffled_pairs(clip_setup, tmp_path, capsys):
    scorer = ce.load_clip_scorer(clip_setup["weights"], CPU, str(clip_setup["cfg"]))
    paths = ev.list_images(clip_setup["images"])
    matching = ce.clip_score(scorer, paths, CAPTIONS, batch_size=3)
    shuffled = ce.clip_score(scorer, paths, CAPTIONS[1:] + CAPTIONS[:1], batch_size=3)
    assert -1.0 <= shuffled < matching <= 1.0 and matching - shuffled > 0.2


def test_openai_torchscript_archive_loads_like_the_state_dict(clip_setup, tmp_path):
    """OpenAI's ViT-B-32.pt is a TorchScript archive (with extra attributes); it gives the same cosines."""
    import warnings

    model = ce.load_open_clip(clip_setup["weights"], str(clip_setup["cfg"]), "--clip_path", CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.zeros(1, 3, 32, 32), ce.open_clip_tokenize(["x"])), check_trace=False)
    traced.save(str(tmp_path / "ViT-B-32.pt"))
    paths = ev.list_images(clip_setup["images"])
    a = ce.clip_cosines(ce.load_clip_scorer(clip_setup["weights"], CPU, str(clip_setup["cfg"])), paths, CAPTIONS, 4)
    b = ce.clip_cosines(ce.load_clip_scorer(tmp_path / "ViT-B-32.pt", CPU, str(clip_setup["cfg"])), paths, CAPTIONS, 4)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_open_clip_and_hugging_face_give_the_same_score_on_the_same_weights(clip_setup):
    paths = ev.list_images(clip_setup["images"])
    oc = ce.load_clip_scorer(clip_setup["weights"], CPU, str(clip_setup["cfg"]))
    hf = ce.load_clip_scorer(clip_setup["hf"], CPU)
    assert hf.backend == "hf" and oc.backend == "open_clip"
    a, b = ce.clip_cosines(oc, paths, CAPTIONS, 4), ce.clip_cosines(hf, paths, CAPTIONS, 4)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_eval_fid_clip_reports_the_mean_cosine_with_prompts_from_the_statistics_json(clip_setup, tmp_path,
                                                                                     monkeypatch):
    """Prompts are paired by the index the statistics JSON records; nothing is downloaded even offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(ev, "load_inception", lambda path, device: _ChannelMeans())
    monkeypatch.setattr(ev, "require_file", lambda spec, path, folder=False: path)
    stats = {f"prompt_{i}": {"prompt": c} for i, c in enumerate(CAPTIONS)}
    (tmp_path / "global_statistics_0_4.json").write_text(json.dumps(stats))
    cli.main(["eval_fid_clip", "--fake_dir", str(clip_setup["images"]), "--ref_dir", str(clip_setup["images"]),
              "--caption_path", str(tmp_path / "global_statistics_0_4.json"), "--clip_path",
              str(clip_setup["weights"]), "--clip_model", str(clip_setup["cfg"]), "--output", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    scorer = ce.load_clip_scorer(clip_setup["weights"], CPU, str(clip_setup["cfg"]))
    direct = ce.clip_score(scorer, ev.list_images(clip_setup["images"]), CAPTIONS)
    assert report["clip_score"] == pytest.approx(direct, abs=1e-6)
    assert report["clip_score_x100"] == pytest.approx(100 * direct) and report["clip_backend"] == "open_clip"


class _ChannelMeans(torch.nn.Module):
    primary = "pool3"

    @staticmethod
    def preprocess(img, eval_res=None):
        return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)

    def forward(self, x):
        return {"pool3": torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)}


def test_original_clip_input_round_trip_and_crop():
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, 20:40] = 200
    out = np.asarray(ce.original_clip_input(Image.fromarray(arr), 256))
    assert out.shape == (256, 256, 3) and abs(int(out.mean()) - 200) <= 1  # only the centre strip survives


def test_full_size_clip_and_hps_layouts_on_the_meta_device():
    """The architectures the real files load into, at full size without memory: OpenAI ViT-B/32 and HPS's ViT-H-14."""
    b32 = {k: tuple(v.shape) for k, v in ce.build_open_clip(ce.CLIP_MODEL, "meta").state_dict().items()}
    assert b32["visual.conv1.weight"] == (768, 3, 32, 32) and b32["visual.proj"] == (768, 512)
    assert b32["text_projection"] == (512, 512) and b32["token_embedding.weight"] == (49408, 512)
    h14 = ce.build_open_clip(ce.HPS_MODEL, "meta")
    shapes = {k: tuple(v.shape) for k, v in h14.state_dict().items()}
    assert shapes["visual.conv1.weight"] == (1280, 3, 14, 14)
    assert shapes["visual.positional_embedding"] == (257, 1280)
    assert shapes["visual.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes["transformer.resblocks.23.mlp.c_fc.weight"] == (4096, 1024)
    assert shapes["visual.proj"] == (1280, 1024) and shapes["text_projection"] == (1024, 1024)
    assert sum(v.numel() for v in h14.parameters()) == pytest.approx(986.1e6, rel=1e-3)
    # a state dict with exactly these names and shapes passes the loader's check; one missing key does not
    ev.check_state_dict(h14.state_dict(), dict(h14.state_dict()), "--hps_path", "x", "HPS")
    partial = dict(h14.state_dict())
    partial.pop("visual.ln_post.weight")
    with pytest.raises(ValueError, match="missing.*ln_post"):
        ev.check_state_dict(h14.state_dict(), partial, "--hps_path", "x", "HPS")


def _hps_reference_transform(img: Image.Image, size: int) -> torch.Tensor:
    """HPS's ResizeMaxSize written out with plain PIL: scale the long side to size, pad centred with zeros."""
    w, h = img.size
    s = size / max(w, h)
    nw, nh = round(w * s), round(h * s)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
    x = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor(ce.OPENAI_MEAN).view(3, 1, 1), torch.tensor(ce.OPENAI_STD).view(3, 1, 1)
    return (x - mean) / std


def test_hps_transform_matches_resize_long_side_and_zero_pad():
    img = Image.fromarray(smooth_images(1, 90, 5)[0]).resize((90, 50))
    got = ce.hps_transform(img, 32)
    assert got.shape == (3, 32, 32)
    torch.testing.assert_close(got, _hps_reference_transform(img, 32), atol=1e-6, rtol=0)
    black = (torch.zeros(3, 1, 1) - torch.tensor(ce.OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(ce.OPENAI_STD).view(3, 1, 1)
    torch.testing.assert_close(got[:, :7, :], black.expand(3, 7, 32), atol=1e-6, rtol=0)  # 50·32/90 → 18 rows, 7 padded above


def test_eval_hpsv2_matches_a_direct_open_clip_computation(tmp_path, monkeypatch, capsys):
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_clip_config("ViT-H-14")
    model = random_open_clip(cfg, seed=3)
    # HPS's file: {"state_dict": ...} in half precision
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, tmp_path / "HPS_v2.1_compressed.pt")
    images = write_images(tmp_path / "imgs", [f"prompt_{i}.png" for i in range(3)],
                          arrays=[np.asarray(Image.fromarray(a).resize((48, 30))) for a in smooth_images(3, 48, 2)])
    (tmp_path / "prompts.json").write_text(json.dumps(CAPTIONS[:3]))
    cfg_path = write_config(tmp_path / "vit_h_14_tiny.json", cfg)
    cli.main(["eval_hpsv2", "--image_path", str(images), "--prompt_path", str(tmp_path / "prompts.json"),
              "--hps_path", str(tmp_path / "HPS_v2.1_compressed.pt"), "--hps_model", str(cfg_path),
              "--output", str(tmp_path / "hps.json")])
    report = json.loads((tmp_path / "hps.json").read_text())
    assert "HPSv2.1" in capsys.readouterr().out

    # direct: open_clip's own loader on the same file, HPS's transform written out with PIL, cosine of features
    ref = open_clip.create_model("ViT-H-14", pretrained=None, **{k: v for k, v in cfg.items() if k != "embed_dim"},
                                 embed_dim=cfg["embed_dim"])
    ref.load_state_dict({k: v.float() for k, v in torch.load(tmp_path / "HPS_v2.1_compressed.pt")["state_dict"].items()})
    ref.eval()
    tok = open_clip.get_tokenizer("ViT-H-14")
    with torch.no_grad():
        for i, p in enumerate(ev.list_images(images)):
            x = _hps_reference_transform(ev.load_rgb(p), 32)[None]
            img = F.normalize(ref.encode_image(x), dim=-1)
            txt = F.normalize(ref.encode_text(tok([CAPTIONS[i]])), dim=-1)
            assert report["per_image"][p.name] == pytest.approx(float((img * txt).sum()), abs=1e-5)
    assert report["hpsv2.1"] == pytest.approx(np.mean(list(report["per_image"].values())))


def test_missing_hps_file_exits_2_naming_flag_and_file(tmp_path, capsys):
    images = write_images(tmp_path / "imgs", ["prompt_0.png"])
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["eval_hpsv2", "--image_path", str(images), "--prompt_path", str(tmp_path / "p.txt"),
                  "--hps_path", str(tmp_path / "nope" / "HPS_v2.1_compressed.pt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--hps_path" in err and "HPS_v2.1_compressed.pt" in err and "downloaded" in err


def test_nothing_is_downloaded_without_hf_hub_offline(clip_setup, monkeypatch):
    """With HF_HUB_OFFLINE unset and every network connection refused, both CLIP backends load and score."""
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    paths = ev.list_images(clip_setup["images"])
    for source, model in ((clip_setup["hf"], ce.CLIP_MODEL), (clip_setup["weights"], str(clip_setup["cfg"]))):
        scorer = ce.load_clip_scorer(source, CPU, model)
        assert np.isfinite(ce.clip_score(scorer, paths, CAPTIONS))
