"""generate_train_data: hidden-state shards (format 2 of models/train_data.py) and the DrafterDataset reader.

The stored hidden states are checked against a direct ``forward_hidden`` call and, through the lm_head, against
the original LlamaGen training forward (conformance fixtures), for both CFG streams.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from test_extract_code import (
    assert_complete_and_unique,
    fixture_caption_features,
    interrupt_on_call,
    model_args,
    read_folder,
    write_caption_cache,
    write_checkpoints,
)

from entrypoints import generate_train_data, self_distill
from models.base_models.llamagen.loading import load_llamagen_gpt
from models.generation import prefix_attention_mask
from models.train_data import (
    CODES_FORMAT,
    CODES_PREFIX,
    DRAFTER_FORMAT,
    HIDDEN_PREFIX,
    DrafterDataset,
    ShardWriter,
    drafter_input_ids,
    drafter_loss_mask,
    read_manifest,
    write_manifest,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_codes(folder: Path, model_type: str, tensors: dict[str, torch.Tensor], shard_size: int = 2) -> None:
    """A code-shard folder written with the library's own writer (as extract_code / self_distill do)."""
    writer = ShardWriter(folder, CODES_PREFIX, 0, shard_size, {"model_type": model_type})
    writer.add(tensors)
    writer.flush()
    write_manifest(folder, CODES_PREFIX, {"format": CODES_FORMAT, "model": "test", "model_type": model_type,
                                          "num_image_tokens": tensors["tokens"].shape[1], "source": "test"})


def fixture_codes(tmp_path: Path, kind: str) -> dict[str, torch.Tensor]:
    """Code shards holding the fixture's two samples (ids 10, 11); returns the fixture io."""
    io = write_checkpoints(tmp_path, kind)
    tensors = {"tokens": io["z_indices"], "sample_id": torch.tensor([10, 11])}
    if kind == "c2i":
        tensors["labels"] = io["cond_idx"]
    else:
        embs, masks = fixture_caption_features(io)
        tensors.update(caption_embs=embs.half(), emb_masks=masks.to(torch.uint8))
    write_codes(tmp_path / "codes", kind, tensors, shard_size=1)
    return io


def run(argv: list[str]) -> dict:
    return generate_train_data.run_generate_train_data(generate_train_data.parse_args().parse_args(argv))


def gtd_args(tmp_path: Path, kind: str, out: str = "hidden", *extra: str) -> list[str]:
    return [*model_args(tmp_path, kind)[:6], "--data_path", str(tmp_path / "codes"), "--output_dir",
            str(tmp_path / out), *extra]


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_hidden_states_match_the_original_training_forward(tmp_path, kind):
    io = fixture_codes(tmp_path, kind)
    manifest = run(gtd_args(tmp_path, kind, "hidden", "--batch_size", "2"))
    t = 1 if kind == "c2i" else 120
    assert manifest["format"] == DRAFTER_FORMAT and manifest["streams"] == ["cond", "uncond"]
    assert (manifest["prefix_len"], manifest["num_image_tokens"], manifest["hidden_size"]) == (t, 16, 64)
    assert manifest["vocab_size"] == 64 and manifest["dtype"] == "float16" and manifest["num_samples"] == 2

    data, _ = read_folder(tmp_path / "hidden", HIDDEN_PREFIX)
    assert data["sample_id"].tolist() == [10, 11] and torch.equal(data["tokens"], io["z_indices"])
    assert data["hidden"].dtype == torch.float16 and data["hidden"].shape == (2, t + 15, 64)
    assert data["hidden_uncond"].shape == data["hidden"].shape
    if kind == "t2i":
        assert torch.equal(data["prefix_valid"], io["emb_masks"].to(torch.uint8))  # left-padded
    else:
        assert data["prefix_valid"].tolist() == [[1], [1]]

    target = load_llamagen_gpt(tmp_path / f"{kind}.pt", block_size=16)
    with torch.no_grad():
        # the original model, all positions: logits_full (cond) and the null-class / null-caption run
        uncond_key = "logits_full_null_class" if kind == "c2i" else "logits_full_uncond"
        for key, ref in (("hidden", "logits_full"), ("hidden_uncond", uncond_key)):
            logits = target.lm_head(data[key].float())
            assert torch.allclose(logits, io[ref], atol=5e-3), (key, (logits - io[ref]).abs().max())
        # and a direct forward_hidden call on the same inputs
        cond = io["cond_idx"]
        seq = torch.cat([target.embed_condition(cond), target.embed_tokens(io["z_indices"][:, :-1])], dim=1)
        valid = torch.cat([data["prefix_valid"].bool(), torch.ones(2, 15, dtype=torch.bool)], dim=1)
        direct = target.forward_hidden(seq, torch.arange(t + 15), attn_mask=prefix_attention_mask(valid))
    assert torch.allclose(data["hidden"].float(), direct, atol=2e-3)


def test_drafter_dataset_pairs_f_t_with_the_next_token(tmp_path):
    io = fixture_codes(tmp_path, "t2i")
    run(gtd_args(tmp_path, "t2i"))
    ds = DrafterDataset(tmp_path / "hidden")
    t, n = 120, 16
    assert len(ds) == 2 and ds.prefix_len == t and ds.num_image_tokens == n and ds.has_uncond
    item = ds[1]
    assert set(item) == {"hidden", "hidden_uncond", "input_ids", "loss_mask", "prefix_valid", "tokens", "sample_id"}
    length = t + n - 1
    assert item["hidden"].shape == (length, 64) and item["input_ids"].shape == (length,)
    assert item["loss_mask"].dtype == torch.bool and item["prefix_valid"].dtype == torch.bool
    tokens = io["z_indices"][1]
    assert torch.equal(item["tokens"], tokens) and int(item["sample_id"]) == 11
    # s_{p+1} at position p: T-1 zeros for the condition, then x_0 .. x_{N-2}, last position padded
    assert item["input_ids"].tolist() == [0] * (t - 1) + tokens[:-1].tolist() + [0]
    positions = item["loss_mask"].nonzero().flatten().tolist()
    assert positions == list(range(t - 1, t + n - 2))  # N-1 training positions
    for p in positions:
        assert item["input_ids"][p] == tokens[p - t + 1]  # the drafter reads x_{p-T+1} beside f_p ...
    # ... and its target f_{p+1} is the hidden state whose lm_head output predicts the token after that one
    target = load_llamagen_gpt(tmp_path / "t2i.pt", block_size=16)
    with torch.no_grad():
        logits = target.lm_head(item["hidden"].float())
    ref = io["logits_full"][1]
    for p in positions:
        assert torch.allclose(logits[p + 1], ref[p + 1], atol=5e-3)  # row p+1 of the training logits ...
    assert torch.allclose(logits[t - 1 :], io["logits_full"][1, t - 1 :], atol=5e-3)  # ... = logits_train
    # batches, negative indices, pickling for DataLoader workers
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["hidden"].shape == (2, length, 64) and batch["loss_mask"].sum() == 2 * (n - 1)
    assert int(ds[-1]["sample_id"]) == 11
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0]["hidden"], ds[0]["hidden"])
    assert torch.equal(drafter_input_ids(io["z_indices"], t)[1], item["input_ids"])
    assert torch.equal(drafter_loss_mask(t, n), item["loss_mask"])


def test_no_uncond_stores_the_conditional_stream_only(tmp_path):
    fixture_codes(tmp_path, "c2i")
    manifest = run(gtd_args(tmp_path, "c2i", "hidden", "--no_uncond"))
    assert manifest["streams"] == ["cond"]
    data, _ = read_folder(tmp_path / "hidden", HIDDEN_PREFIX)
    assert "hidden_uncond" not in data
    ds = DrafterDataset(tmp_path / "hidden")
    assert not ds.has_uncond and "hidden_uncond" not in ds[0]


def test_interrupted_run_resumes_without_losing_or_duplicating_samples(tmp_path, monkeypatch):
    write_checkpoints(tmp_path, "c2i")
    g = torch.Generator().manual_seed(3)
    write_codes(tmp_path / "codes", "c2i", {"tokens": torch.randint(0, 64, (9, 16), generator=g),
                                            "labels": torch.randint(0, 10, (9,), generator=g),
                                            "sample_id": torch.arange(100, 109)}, shard_size=4)
    base = ["--batch_size", "2", "--shard_size", "3"]
    run(gtd_args(tmp_path, "c2i", "straight", *base))

    run(gtd_args(tmp_path, "c2i", "resumed", *base, "--num_samples", "3"))  # a smaller run: the 3 smallest ids
    assert_complete_and_unique(tmp_path / "resumed", HIDDEN_PREFIX, {100, 101, 102})
    original = interrupt_on_call(monkeypatch, generate_train_data, "target_hidden_states", 2)
    with pytest.raises(KeyboardInterrupt):
        run(gtd_args(tmp_path, "c2i", "resumed", *base))
    assert_complete_and_unique(tmp_path / "resumed", HIDDEN_PREFIX, {100, 101, 102, 103, 104})
    monkeypatch.setattr(generate_train_data, "target_hidden_states", original)
    run(gtd_args(tmp_path, "c2i", "resumed", *base))
    assert_complete_and_unique(tmp_path / "resumed", HIDDEN_PREFIX, set(range(100, 109)))
    a, _ = read_folder(tmp_path / "straight", HIDDEN_PREFIX)
    b, _ = read_folder(tmp_path / "resumed", HIDDEN_PREFIX)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


def test_self_distilled_t2i_data_end_to_end(tmp_path):
    """self_distill -> generate_train_data -> DrafterDataset, with the stored T5 features as the condition."""
    write_checkpoints(tmp_path, "t2i")
    prompts = ["x", "y"]
    write_caption_cache(tmp_path / "t5.safetensors", prompts)
    (tmp_path / "p.txt").write_text("x\ny\n")
    self_distill.run_self_distill(self_distill.parse_args().parse_args(
        [*model_args(tmp_path, "t2i"), "--vq_path", str(tmp_path / "vq.pt"), "--t5_path",
         str(tmp_path / "t5.safetensors"), "--prompt", str(tmp_path / "p.txt"), "--samples_per_prompt", "2",
         "--output_dir", str(tmp_path / "codes")]))
    run(gtd_args(tmp_path, "t2i", "hidden", "--batch_size", "3"))
    ds = DrafterDataset(tmp_path / "hidden")
    codes, _ = read_folder(tmp_path / "codes", CODES_PREFIX)
    assert len(ds) == 4 and sorted(int(ds[i]["sample_id"]) for i in range(4)) == [0, 1, 2, 3]
    for i in range(4):
        sid = int(ds[i]["sample_id"])
        assert torch.equal(ds[i]["tokens"], codes["tokens"][sid])
        assert ds[i]["prefix_valid"].sum() == codes["emb_masks"][sid].sum()
        assert ds[i]["prefix_valid"][-1] and not ds[i]["prefix_valid"][0]  # left-padded


def test_model_type_mismatch_is_reported(tmp_path):
    fixture_codes(tmp_path, "c2i")
    write_checkpoints(tmp_path, "t2i")
    with pytest.raises(generate_train_data.UserError, match="c2i codes"):
        run(["--model", "llamagen", "--model_path", str(tmp_path / "t2i.pt"), "--device", "cpu", "--data_path",
             str(tmp_path / "codes"), "--output_dir", str(tmp_path / "hidden")])


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate launcher not installed")
def test_two_processes_split_the_samples_and_merge_one_manifest(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` (two gloo processes on CPU): own files, one manifest."""
    write_checkpoints(tmp_path, "c2i")
    g = torch.Generator().manual_seed(5)
    write_codes(tmp_path / "codes", "c2i", {"tokens": torch.randint(0, 64, (7, 16), generator=g),
                                            "labels": torch.randint(0, 10, (7,), generator=g),
                                            "sample_id": torch.arange(7)}, shard_size=3)
    run(gtd_args(tmp_path, "c2i", "single", "--batch_size", "2"))
    with socket.socket() as sock:  # a free port, so parallel test runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "entrypoints.generate_train_data",
           *gtd_args(tmp_path, "c2i", "double", "--batch_size", "2", "--shard_size", "2")]
    cmd = [a for a in cmd if a not in ("--device", "cpu")]  # each process takes accelerate's device
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(tmp_path / "double")
    assert manifest["num_processes"] == 2 and {s["rank"] for s in manifest["shards"]} == {0, 1}
    assert_complete_and_unique(tmp_path / "double", HIDDEN_PREFIX, set(range(7)))
    a, _ = read_folder(tmp_path / "single", HIDDEN_PREFIX)
    b, _ = read_folder(tmp_path / "double", HIDDEN_PREFIX)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)
