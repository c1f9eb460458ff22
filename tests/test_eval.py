"""Evaluation metrics (SPEC §8): FID, improved precision / recall, CLIP score, and the two eval entry points."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import main as cli
from models import evaluation as ev

# ------------------------------------------------------------------------------------------------- helpers


def _write_images(folder, names, size=16, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
    return folder


class _MeanColour(nn.Module):
    """Stand-in feature extractor: per-channel means and stds (6-d), fast and deterministic."""

    size = 8

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def _tiny_clip(folder):
    """A random tiny CLIPModel + CLIPProcessor saved to ``folder`` (char-level tokenizer, 32 px images)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1, **small),
                        vision_config=dict(image_size=32, patch_size=16, **small), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------- image folders


def test_generated_folder_is_ordered_by_prompt_index(tmp_path):
    _write_images(tmp_path, ["prompt_10.png", "prompt_9.png", "prompt_0.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in ev.list_images(tmp_path)] == ["prompt_0.png", "prompt_9.png", "prompt_10.png"]
    assert [p.name for p in ev.list_images(tmp_path, how_many=2)] == ["prompt_0.png", "prompt_9.png"]


def test_reference_folder_is_sorted_by_name_and_resized(tmp_path):
    _write_images(tmp_path, ["b.jpg", "a.png"], size=12)
    paths = ev.list_images(tmp_path)
    assert [p.name for p in paths] == ["a.png", "b.jpg"]
    batch = ev.load_image_batch(paths, 20)
    assert batch.shape == (2, 3, 20, 20) and 0.0 <= batch.min() and batch.max() <= 1.0


def test_captions_from_statistics_json_and_text_file(tmp_path):
    paths = ev.list_images(_write_images(tmp_path / "imgs", ["prompt_3.png", "prompt_7.png"]))
    stats = {"prompt_7": {"prompt": "a dog"}, "prompt_3": {"prompt": "a cat"}, "prompt_9": {"prompt": "unused"}}
    (tmp_path / "global_statistics_0_10.json").write_text(json.dumps(stats))
    assert ev.load_captions(tmp_path / "global_statistics_0_10.json", paths) == ["a cat", "a dog"]
    (tmp_path / "caps.txt").write_text("first\nsecond\nthird\n")
    assert ev.load_captions(tmp_path / "caps.txt", paths) == ["first", "second"]
    with pytest.raises(ValueError, match="no prompt"):
        ev.load_captions(tmp_path / "global_statistics_0_10.json", [tmp_path / "prompt_5.png"])


# ---------------------------------------------------------------------------------------------------- FID


def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 5))
    mu, sigma = ev.feature_statistics(a)
    assert ev.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_one_dimensional_closed_form():
    # d² = (m1 - m2)² + (s1 - s2)² for N(m1, s1²) and N(m2, s2²)
    d = ev.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert d == pytest.approx(3.0**2 + (2.0 - 3.0) ** 2)


def test_frechet_distance_diagonal_closed_form_and_symmetry():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    d12 = ev.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert d12 == pytest.approx(expected)
    assert ev.frechet_distance(mu2, np.diag(s2), mu1, np.diag(s1)) == pytest.approx(d12)


def test_frechet_distance_survives_singular_covariances():
    rng = np.random.default_rng(1)
    mu, sigma = ev.feature_statistics(rng.normal(size=(3, 8)))  # rank 2 covariance in 8-d
    assert ev.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-4)


# ------------------------------------------------------------------------------------- precision / recall


def test_identical_sets_have_full_precision_and_recall():
    x = np.random.default_rng(0).normal(size=(50, 4))
    assert ev.improved_precision_recall(x, x, k=3) == (1.0, 1.0)


def test_far_apart_sets_have_zero_precision_and_recall():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 4)), rng.normal(size=(30, 4)) + 100.0
    assert ev.improved_precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_subset_case_with_known_answer():
    # real: 0..9 on a line, fake: 0..4. k = 1 -> every radius is 1. All fake points are real points (precision 1);
    # real 0..4 are fake points and real 5 is within 1 of fake 4, real 6..9 are outside (recall 6/10).
    real = np.arange(10, dtype=np.float64)[:, None]
    fake = np.arange(5, dtype=np.float64)[:, None]
    precision, recall = ev.improved_precision_recall(real, fake, k=1, batch_size=3)
    assert precision == 1.0 and recall == pytest.approx(0.6)


def test_knn_radii_exclude_the_sample_itself_and_batching_is_exact():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    assert ev.knn_radii(x, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert ev.knn_radii(x, k=2, batch_size=1).tolist() == [3.0, 2.0, 3.0, 6.0]
    with pytest.raises(ValueError, match="more than"):
        ev.knn_radii(x, k=4)


# ---------------------------------------------------------------------------------------------- CLIP score


def test_clip_score_from_embeddings_is_mean_cosine_times_100():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    txt = torch.tensor([[2.0, 0.0], [0.0, -1.0], [1.0, 1.0]])
    assert ev.clip_score_from_embeddings(img, txt) == pytest.approx(100.0 * (1.0 - 1.0 + 2**-0.5) / 3)


def test_clip_score_with_a_tiny_local_clip_model(tmp_path):
    folder = _tiny_clip(tmp_path / "clip")
    model, processor = ev.load_clip(folder, torch.device("cpu"))
    paths = ev.list_images(_write_images(tmp_path / "imgs", ["prompt_0.png", "prompt_1.png", "prompt_2.png"]))
    captions = ["a cat", "a red car", "two dogs"]
    score = ev.clip_score(model, processor, paths, captions, batch_size=2, device=torch.device("cpu"))
    image_embeds, text_embeds = ev.clip_embeddings(model, processor, paths, captions, 3, torch.device("cpu"))
    assert image_embeds.shape == text_embeds.shape == (3, 8)
    assert score == pytest.approx(ev.clip_score_from_embeddings(image_embeds, text_embeds), abs=1e-4)
    assert -100.0 <= score <= 100.0


def test_missing_weights_name_the_flag_and_never_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="--clip_path"):
        ev.load_clip(tmp_path / "no_clip", torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="--inception_path.*inception_v3"):
        ev.load_inception(tmp_path / "pt_inception.pth", torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="--vgg_path is required"):
        ev.load_vgg16(None, torch.device("cpu"))


def test_wrong_state_dict_is_a_clear_error(tmp_path):
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a torchvision"):
        ev.load_inception(tmp_path / "bad.pt", torch.device("cpu"))


# ------------------------------------------------------------------------------------------- entry points


@pytest.fixture
def folders(tmp_path):
    fake = _write_images(tmp_path / "fake", [f"prompt_{i}.png" for i in range(5)], seed=1)
    ref = _write_images(tmp_path / "ref", [f"{i:012d}.jpg" for i in range(6)], seed=2)
    stats = {f"prompt_{i}": {"prompt": f"a photo number {i}"} for i in range(5)}
    (fake / "global_statistics_0_5.json").write_text(json.dumps(stats))
    return fake, ref


def test_eval_fid_clip_cli_reports_fid_and_clip(folders, tmp_path, monkeypatch, capsys):
    fake, ref = folders
    monkeypatch.setattr(ev, "load_inception", lambda path, device: _MeanColour())
    clip = _tiny_clip(tmp_path / "clip")
    cli.main(["eval_fid_clip", "--fake_dir", str(fake), "--ref_dir", str(ref), "--caption_path",
              str(fake / "global_statistics_0_5.json"), "--clip_path", str(clip), "--how_many", "4",
              "--batch_size", "3", "--device", "cpu"])
    report = json.loads((fake / "eval_fid_clip.json").read_text())
    assert report["num_fake"] == 4 and report["num_ref"] == 4
    assert report["fid"] > 0 and -100 <= report["clip_score"] <= 100
    assert "FID" in capsys.readouterr().out

    # against itself: FID 0; reference statistics may also come precomputed as .npz
    cli.main(["eval_fid_clip", "--fake_dir", str(fake), "--ref_dir", str(fake), "--output", str(tmp_path / "same.json")])
    assert json.loads((tmp_path / "same.json").read_text())["fid"] == pytest.approx(0.0, abs=1e-6)
    mu, sigma = ev.feature_statistics(ev.extract_features(_MeanColour(), ev.list_images(ref), 2, torch.device("cpu")))
    np.savez(tmp_path / "ref_stats.npz", mu=mu, sigma=sigma)
    cli.main(["eval_fid_clip", "--fake_dir", str(fake), "--ref_dir", str(tmp_path / "ref_stats.npz"),
              "--output", str(tmp_path / "npz.json")])
    direct = ev.frechet_distance(*ev.feature_statistics(ev.extract_features(
        _MeanColour(), ev.list_images(fake), 2, torch.device("cpu"))), mu, sigma)
    assert json.loads((tmp_path / "npz.json").read_text())["fid"] == pytest.approx(direct)


def test_eval_prec_recall_cli_reports_precision_and_recall(folders, tmp_path, monkeypatch, capsys):
    fake, ref = folders
    monkeypatch.setattr(ev, "load_vgg16", lambda path, device: _MeanColour())
    cli.main(["eval_prec_recall", "--fake_dir", str(fake), "--ref_dir", str(ref), "--k", "2",
              "--output", str(tmp_path / "pr.json"), "--device", "cpu"])
    report = json.loads((tmp_path / "pr.json").read_text())
    assert 0.0 <= report["precision"] <= 1.0 and 0.0 <= report["recall"] <= 1.0
    assert report["k"] == 2 and report["num_fake"] == 5 and report["num_ref"] == 6
    cli.main(["eval_prec_recall", "--fake_dir", str(fake), "--ref_dir", str(fake), "--k", "2"])
    same = json.loads((fake / "eval_prec_recall.json").read_text())
    assert (same["precision"], same["recall"]) == (1.0, 1.0)
    assert "precision" in capsys.readouterr().out


@pytest.mark.parametrize("task, flag", [("eval_fid_clip", "--inception_path"), ("eval_prec_recall", "--vgg_path")])
def test_cli_missing_weights_exit_2_naming_the_flag(folders, tmp_path, task, flag, capsys):
    fake, ref = folders
    with pytest.raises(SystemExit) as e:
        cli.main([task, "--fake_dir", str(fake), "--ref_dir", str(ref), flag, str(tmp_path / "missing.pth")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "missing.pth" in err and "Traceback" not in err


def test_cli_captions_without_clip_weights_exit_2(folders, capsys):
    fake, ref = folders
    with pytest.raises(SystemExit) as e:
        cli.main(["eval_fid_clip", "--fake_dir", str(fake), "--ref_dir", str(ref),
                  "--caption_path", str(fake / "global_statistics_0_5.json")])
    assert e.value.code == 2
    assert "--clip_path" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_cli_with_real_inception_and_vgg_layouts(folders, tmp_path):
    """End to end with random-init torchvision Inception-v3 / VGG16 state dicts (the real loading paths)."""
    from torchvision.models import inception_v3, vgg16

    fake, ref = folders
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tmp_path / "inc.pt")
    cli.main(["eval_fid_clip", "--fake_dir", str(fake), "--ref_dir", str(ref), "--inception_path",
              str(tmp_path / "inc.pt"), "--device", "cpu", "--output", str(tmp_path / "fid.json")])
    assert np.isfinite(json.loads((tmp_path / "fid.json").read_text())["fid"])
    torch.save({"state_dict": vgg16(weights=None).state_dict()}, tmp_path / "vgg.pth")
    cli.main(["eval_prec_recall", "--fake_dir", str(fake), "--ref_dir", str(ref), "--vgg_path",
              str(tmp_path / "vgg.pth"), "--device", "cpu", "--output", str(tmp_path / "pr.json")])
    report = json.loads((tmp_path / "pr.json").read_text())
    assert 0.0 <= report["precision"] <= 1.0 and 0.0 <= report["recall"] <= 1.0
