"""The drafter pipeline on tiny Chameleon checkpoints: extract_code, self_distill, generate_train_data (with the
f_t <-> x_{t+1} pairing of the engine), train_drafter, generate_codebook, and the trained drafter in
generate_images (--drafter_path)."""

from __future__ import annotations

import json

import pytest
import torch
from chameleon_fixtures import write_chameleon_ckpts

from models.generation import Prefix, prefill
from models.registry import load_family
from models.train_data import DrafterDataset, read_shard

IMAGE_SIZE = 8
PROMPTS = ["a red cat", "the blue dog", "a photo of a dog"]


@pytest.fixture(scope="module", params=["anole", "lumina_mgpt"])
def pipeline(request, tmp_path_factory):
    """Runs every stage once per family (shared by the checks below)."""
    from PIL import Image

    from entrypoints.extract_code import main as extract
    from entrypoints.generate_codebook import main as codebook
    from entrypoints.generate_train_data import main as train_data
    from entrypoints.self_distill import main as distill
    from entrypoints.train_drafter.main import main as train

    model = request.param
    root = tmp_path_factory.mktemp(model)
    p = write_chameleon_ckpts(root / "ckpts", model)
    images = root / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, text in enumerate(PROMPTS):
        arr = (torch.rand(12, 10, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(text)
    (images / "prompts.txt").write_text("a red cat\nthe blue dog\n")
    common = ["--model", model, "--model_path", str(p["model"]), "--vq_path", str(p["vq"]), "--device", "cpu"]
    extract([*common, "--data_path", str(images), "--output_dir", str(root / "codes"), "--image_size", str(IMAGE_SIZE)])
    distill([*common, "--prompt", str(images / "prompts.txt"), "--num_prompts", "2",
             "--samples_per_prompt", "2", "--output_dir", str(root / "distill"), "--image_size", str(IMAGE_SIZE)])
    train_data(["--model", model, "--model_path", str(p["model"]), "--vq_path", str(p["vq"]), "--device", "cpu",
                "--data_path", str(root / "distill"), "--output_dir", str(root / "hidden"), "--prefix_len", "64",
                "--batch_size", "3"])
    train(["--model", model, "--base_path", str(p["model"]), "--data_dir", str(root / "hidden"), "--save_dir",
           str(root / "drafter"), "--cpu", "--max_steps", "2", "--bs", "2", "--eval_fraction", "0.25"])
    codebook(["--model", model, "--vq_path", str(p["vq"]), "--save_path", str(root / "nb.safetensors"),
              "--top_k", "8", "--device", "cpu"])
    return {"model": model, "root": root, "ckpts": p}


def test_extract_code_writes_family_tokens_and_resumes(pipeline, capsys):
    from entrypoints.extract_code import main as extract

    root, model, p = pipeline["root"], pipeline["model"], pipeline["ckpts"]
    manifest = json.loads((root / "codes" / "manifest.json").read_text())
    assert manifest["num_samples"] == 3 and manifest["model_type"] == "chameleon"
    shard = root / "codes" / manifest["shards"][0]["file"]
    tensors, meta = read_shard(shard)
    fam = load_family(model, "cpu", torch.float32, str(p["model"]), str(p["vq"]), image_size=IMAGE_SIZE)
    assert tensors["tokens"].shape == (3, fam.num_image_tokens) and meta["prompts"] == PROMPTS
    codes = fam.tokens_to_codes(tensors["tokens"])  # Lumina: newline / end tokens in place
    from PIL import Image

    from models.base_models.chameleon.vqgan import preprocess_image

    with Image.open(root / "images" / "img1.png") as im:
        x = preprocess_image(im, IMAGE_SIZE)
    assert torch.equal(codes[1], fam.vq.encode_to_codes(x[None])[0])
    extract(["--model", model, "--model_path", str(p["model"]), "--vq_path", str(p["vq"]), "--device", "cpu",
             "--data_path", str(root / "images"), "--output_dir", str(root / "codes"), "--image_size", str(IMAGE_SIZE)])
    assert "resuming: 3 samples" in capsys.readouterr().out
    assert json.loads((root / "codes" / "manifest.json").read_text())["num_samples"] == 3


def test_train_data_hidden_states_are_the_engines_features(pipeline):
    """f_p of generate_train_data equals the decoder's features; the drafter reads (f_p, s_{p+1})."""
    root, model, p = pipeline["root"], pipeline["model"], pipeline["ckpts"]
    fam = load_family(model, "cpu", torch.float32, str(p["model"]), str(p["vq"]), image_size=IMAGE_SIZE)
    ds = DrafterDataset(root / "hidden")
    assert len(ds) == 4 and ds.prefix_len == 64
    item = ds[0]
    tokens = item["tokens"]
    t = ds.prefix_len
    prompt_ids = fam.prompt_ids("a red cat")
    # the engine: prefill the unpadded prompt, then feed x_0 .. x_{N-2} one by one
    target = fam.target
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        cache = target.new_cache(1, len(prompt_ids) + len(tokens))
        feats = [prefill(target, Prefix(target.embed_tokens(ids), torch.ones_like(ids, dtype=torch.bool)), cache)]
        for i in range(len(tokens) - 1):
            pos = torch.tensor([len(prompt_ids) + i])
            feats.append(target.forward_hidden(target.embed_tokens(tokens[i].view(1, 1)), pos, cache, pos,
                                               torch.ones(1, 1, 1, int(pos) + 1, dtype=torch.bool)))
    engine = torch.cat(feats, 1)[0]
    stored = item["hidden"][t - len(prompt_ids) :].float()
    assert float((stored - engine).abs().max()) < 2e-2  # float16 storage
    # pairing: position p carries s_{p+1} (prefix ids, then the image tokens)
    assert item["input_ids"][t - len(prompt_ids) : t - 1].tolist() == prompt_ids[1:]
    assert item["input_ids"][t - 1 : t - 1 + len(tokens) - 1].tolist() == tokens[:-1].tolist()
    assert item["prefix_valid"].sum() == len(prompt_ids)
    assert item["prefix_valid_uncond"].sum() == len(fam.uncond_ids())
    assert item["input_ids_uncond"][t - 2].tolist() == fam.uncond_ids()[-1]


def test_trained_drafter_and_codebook_run_in_generate_images(pipeline, tmp_path):
    from PIL import Image

    from entrypoints.generate_images import main
    from models.drafters.neighbours import load_neighbour_table

    root, model, p = pipeline["root"], pipeline["model"], pipeline["ckpts"]
    table = load_neighbour_table(root / "nb.safetensors")
    assert table.shape == (8192, 8) and int(table.max()) < 8192  # VQ indices
    state = sorted((root / "drafter").glob("state_*"))[-1]
    main(["--model", model, "--model_type", "eagle", "--lantern", "--lantern_k", "8", "--model_path",
          str(p["model"]), "--vq_path", str(p["vq"]), "--drafter_path", str(state), "--codebook_path",
          str(root / "nb.safetensors"), "--image_size", str(IMAGE_SIZE), "--prompt", "a red cat", "--num_images", "1",
          "--output_dir", str(tmp_path), "--device", "cpu", "--top_k_draft", "3", "--depth", "3", "--total_token", "10"])
    assert Image.open(tmp_path / "prompt_0.png").size == (IMAGE_SIZE, IMAGE_SIZE)


def test_stages_resume_without_duplicates(pipeline, capsys):
    from entrypoints.generate_train_data import main as train_data
    from entrypoints.self_distill import main as distill

    root, model, p = pipeline["root"], pipeline["model"], pipeline["ckpts"]
    common = ["--model", model, "--model_path", str(p["model"]), "--vq_path", str(p["vq"]), "--device", "cpu"]
    distill([*common, "--prompt", str(root / "images" / "prompts.txt"), "--num_prompts", "2",
             "--samples_per_prompt", "2", "--output_dir", str(root / "distill"), "--image_size", str(IMAGE_SIZE)])
    train_data([*common, "--data_path", str(root / "distill"), "--output_dir", str(root / "hidden"),
                "--prefix_len", "64", "--batch_size", "3"])
    out = capsys.readouterr().out
    assert "resuming: 4 of 4 samples" in out
    for folder in ("distill", "hidden"):
        assert json.loads((root / folder / "manifest.json").read_text())["num_samples"] == 4


@pytest.mark.slow
def test_train_drafter_under_accelerate_launch(pipeline, tmp_path):
    """Two gloo processes (accelerate launch --multi_gpu) train the Chameleon drafter; both ranks agree."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import REPO_ROOT
    from safetensors.torch import load_file

    if pipeline["model"] != "anole":
        pytest.skip("one family is enough for the launcher")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    save = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "entrypoints.train_drafter.main", "--model", "anole", "--base_path",
           str(pipeline["ckpts"]["model"]), "--data_dir", str(pipeline["root"] / "hidden"), "--save_dir", str(save),
           "--bs", "1", "--max_steps", "2", "--eval_fraction", "0.25", "--dump_rank_weights"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = load_file(str(save / "rank_weights" / "rank0.safetensors"))
    r1 = load_file(str(save / "rank_weights" / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
