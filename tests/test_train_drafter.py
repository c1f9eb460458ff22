"""train_drafter: data pairing, loss, real gradient accumulation, checkpoints/resume, multi-process training.

Every test builds its own tiny target (a random LlamaGen T2I GPT: dim 32, 4 condition positions with left
padding, a 4x4 grid, 64 codes) and writes its hidden states in the ``lantern-drafter-data/1`` format.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from entrypoints.common import UserError
from entrypoints.train_drafter import main as td
from entrypoints.train_drafter.data_utils import make_drafter_batch, split_indices
from models.base_models.llamagen.gpt import GPTConfig, LlamaGenGPT
from models.drafters.cnets import EagleDrafter, load_drafter
from models.generation import prefix_attention_mask
from models.train_data import DrafterDataError, DrafterDataset, read_data_info

REPO_ROOT = Path(__file__).resolve().parents[1]
T, N, DIM, VOCAB = 4, 16, 32, 64


# ---------------------------------------------------------------------------------------------------
# tiny target and data in the generate_train_data format


def make_target(folder: Path, seed: int = 0) -> LlamaGenGPT:
    """A random tiny LlamaGen T2I target saved as this project's folder (config.json + model.safetensors)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(dim=DIM, n_layer=2, n_head=2, vocab_size=VOCAB, block_size=N, cls_token_num=T, model_type="t2i",
                    caption_dim=8, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    target = LlamaGenGPT(cfg).eval()
    with torch.no_grad():  # a sharper lm_head, so the target's argmax is a meaningful thing to agree with
        target.output.weight.mul_(8.0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    save_file({k: v.contiguous() for k, v in target.state_dict().items()}, str(folder / "model.safetensors"))
    return target


@torch.no_grad()
def write_data(folder: Path, target: LlamaGenGPT, n: int = 48, shard_size: int = 20, uncond: bool = True,
               manifest: bool = True, seed: int = 1) -> None:
    """Run the target over [condition; x_0..x_{N-2}] and write hidden-state shards + manifest.json."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, N), generator=g)
    captions = torch.randn(n, T, 8, generator=g)
    valid = torch.zeros(n, T, dtype=torch.bool)
    for i, k in enumerate(torch.randint(1, T + 1, (n,), generator=g).tolist()):
        valid[i, T - k :] = True  # left padding
    null_caption = torch.randn(1, T, 8, generator=g).expand(n, -1, -1)
    keys = prefix_attention_mask(torch.cat([valid, torch.ones(n, N - 1, dtype=torch.bool)], 1))
    pos = torch.arange(T + N - 1)

    def run(caption):
        seq = torch.cat([target.embed_condition(caption), target.embed_tokens(tokens[:, : N - 1])], 1)
        return target.forward_hidden(seq, pos, attn_mask=keys).half()

    hidden, hidden_u = run(captions), run(null_caption)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, n, shard_size)):
        sl = slice(start, min(n, start + shard_size))
        name = f"hidden_r0_{index:05d}.safetensors"
        tensors = {"hidden": hidden[sl], "tokens": tokens[sl], "prefix_valid": valid[sl].to(torch.uint8),
                   "sample_id": torch.arange(n)[sl]}
        if uncond:
            tensors["hidden_uncond"] = hidden_u[sl]
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
        shards.append({"file": name, "num_samples": sl.stop - sl.start, "first_sample_id": start})
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({
            "format": "lantern-drafter-data/1", "model": "demo", "prefix_len": T, "num_image_tokens": N,
            "hidden_size": DIM, "vocab_size": VOCAB, "streams": ["cond", "uncond"] if uncond else ["cond"],
            "dtype": "float16", "model_path": "target", "shards": shards}))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each training run here builds its own Accelerator; isolate accelerate's process-wide singletons."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train_drafter")
    target = make_target(root / "target")
    write_data(root / "data", target)
    return {"root": root, "target_path": root / "target", "data": root / "data", "target": target}


def run_train(setup: dict, save_dir: Path, *extra: str) -> dict:
    argv = ["--base_path", str(setup["target_path"]), "--data_dir", str(setup["data"]), "--save_dir", str(save_dir),
            "--cpu", "--num_epochs", "50", *extra]
    return td.train(td.parse_args().parse_args(argv))


def records(save_dir: Path, event: str) -> list[dict]:
    lines = (save_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def final_weights(state_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(state_dir / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0.0 if atol == 0 else 1e-5, msg=k)


# ---------------------------------------------------------------------------------------------------
# data: pairing, masking, reader


def test_batch_pairs_f_p_with_next_token_and_masks_padding():
    """Position p reads (f_p, s_{p+1}) and predicts f_{p+1}; loss positions T-1..T+N-3; pad keys hidden."""
    b = 2
    hidden = torch.randn(b, T + N - 1, DIM).half()
    tokens = torch.randint(0, VOCAB, (b, N))
    valid = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.uint8)
    db = make_drafter_batch({"hidden": hidden, "tokens": tokens, "prefix_valid": valid})
    L = T + N - 2
    assert db.inputs.shape == (b, L, DIM) and db.targets.shape == (b, L, DIM) and db.input_ids.shape == (b, L)
    assert db.loss_start == T - 1 and db.loss_targets.shape == (b, N - 1, DIM)
    # condition positions carry id 0; at p = T-1 the drafter sees f_{T-1} and x_0 and must predict f_T
    assert (db.input_ids[:, : T - 1] == 0).all()
    assert torch.equal(db.input_ids[:, T - 1 :], tokens[:, : N - 1])
    assert torch.equal(db.inputs[:, T - 1], hidden[:, T - 1].float())
    assert torch.equal(db.targets[:, T - 1], hidden[:, T].float())
    # the last loss target is f_{T+N-2}, the hidden state that predicts x_{N-1}
    assert torch.equal(db.loss_targets[:, -1], hidden[:, T + N - 2].float())
    m = db.attn_mask[:, 0]
    assert m.shape == (b, L, L)
    assert not m[0, T:, :2].any() and m[0, T:, 2:T].all()  # padded keys hidden from real queries
    assert m[0, 0, 0] and m[0, 1, 1]  # a padded query still sees itself (no empty row)
    assert torch.equal(m[1], torch.ones(L, L, dtype=torch.bool).tril())  # no padding: plain causal


def test_padded_condition_features_do_not_reach_the_loss_positions():
    """Whatever sits at padded condition positions cannot change the drafter's predictions at image positions."""
    torch.manual_seed(0)
    drafter = EagleDrafter(td.default_drafter_config(GPTConfig(dim=DIM, n_head=2, vocab_size=VOCAB, block_size=N,
                                                                cls_token_num=T, model_type="t2i"))).eval()
    hidden = torch.randn(1, T + N - 1, DIM)
    valid = torch.tensor([[0, 0, 1, 1]])
    batch = {"hidden": hidden, "tokens": torch.randint(0, VOCAB, (1, N)), "prefix_valid": valid}
    db = make_drafter_batch(batch)
    out = drafter(db.inputs, db.input_ids, rope_pos=db.rope_pos, attn_mask=db.attn_mask)
    hidden2 = hidden.clone()
    hidden2[:, :2] = torch.randn(1, 2, DIM) * 10
    db2 = make_drafter_batch({**batch, "hidden": hidden2})
    out2 = drafter(db2.inputs, db2.input_ids, rope_pos=db2.rope_pos, attn_mask=db2.attn_mask)
    torch.testing.assert_close(out[:, 2:], out2[:, 2:])


@torch.no_grad()
def test_training_layout_matches_the_engine_calls():
    """The training forward (one causal pass) equals the engine's cached drafter calls (models/ea_model.py):
    prefill features f_0..f_{T-1} with ids [0]*(T-1) + [x_0], then one position at a time with x_{p+1}."""
    torch.manual_seed(1)
    drafter = EagleDrafter(td.default_drafter_config(GPTConfig(dim=DIM, n_head=2, vocab_size=VOCAB, block_size=N,
                                                                cls_token_num=T, model_type="t2i"))).eval()
    hidden, tokens = torch.randn(1, T + N - 1, DIM), torch.randint(0, VOCAB, (1, N))
    valid = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    db = make_drafter_batch({"hidden": hidden, "tokens": tokens, "prefix_valid": valid})
    full = drafter(db.inputs, db.input_ids, rope_pos=db.rope_pos, attn_mask=db.attn_mask)

    keys = torch.cat([valid, torch.ones(1, N, dtype=torch.bool)], 1)
    cache = drafter.new_cache(1, T + N)
    ids = torch.cat([torch.zeros(1, T - 1, dtype=torch.long), tokens[:, :1]], 1)
    pos = torch.arange(T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (keys[:, None, :T] & causal[None]) | (torch.arange(T)[None, None] == pos[None, :, None])
    steps = [drafter(hidden[:, :T], ids, pos, cache, pos, mask[:, None])]
    for p in range(T, T + N - 2):  # position p reads f_p and x_{p-T+1}
        pos = torch.tensor([p])
        steps.append(drafter(hidden[:, p : p + 1], tokens[:, p - T + 1 : p - T + 2], pos, cache, pos,
                             keys[:, None, None, : p + 1]))
    torch.testing.assert_close(torch.cat(steps, 1)[:, T - 1 :], full[:, T - 1 :], atol=1e-5, rtol=1e-5)


def test_reader_with_and_without_manifest(setup, tmp_path):
    info = read_data_info(setup["data"])
    assert (info.prefix_len, info.num_image_tokens, info.hidden_size, info.num_samples) == (T, N, DIM, 48)
    assert info.has_uncond and len(info.shards) == 3
    # shards alone (no manifest) describe the same data
    bare = tmp_path / "bare"
    bare.mkdir()
    for s in info.shards:
        (bare / s.path.name).write_bytes(s.path.read_bytes())
    info2 = read_data_info(bare)
    assert (info2.prefix_len, info2.num_image_tokens, info2.hidden_size, info2.num_samples) == (T, N, DIM, 48)
    a, b = DrafterDataset(info)[30], DrafterDataset(info2)[30]
    assert all(torch.equal(a[k], b[k]) for k in a)
    raw = load_file(str(info.shards[1].path))  # sample 30 = row 10 of the second shard
    assert torch.equal(a["hidden"], raw["hidden"][10]) and torch.equal(a["tokens"], raw["tokens"][10])


def test_reader_reports_inconsistent_data(setup, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    manifest = json.loads((setup["data"] / "manifest.json").read_text())
    for s in manifest["shards"]:
        (bad / s["file"]).write_bytes((setup["data"] / s["file"]).read_bytes())
    manifest["shards"][0]["num_samples"] = 99
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DrafterDataError, match="manifest.json says 99"):
        read_data_info(bad)
    manifest["shards"][0]["num_samples"] = 20
    manifest["shards"].append({"file": "hidden_r0_00009.safetensors", "num_samples": 1})
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DrafterDataError, match="missing"):
        read_data_info(bad)
    with pytest.raises(DrafterDataError, match="not found"):
        read_data_info(tmp_path / "nowhere")


def test_uncond_stream_choice_is_per_epoch_and_reproducible(setup):
    info = read_data_info(setup["data"])
    ds = DrafterDataset(info, uncond_prob=0.3, seed=5)
    picks = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        picks.append(torch.stack([ds[i]["uncond"] for i in range(len(ds))]))
    frac = torch.stack(picks).float().mean().item()
    assert 0.15 < frac < 0.45 and not torch.equal(picks[0], picks[1])
    ds2 = DrafterDataset(info, uncond_prob=0.3, seed=5)
    ds2.set_epoch(2)
    assert torch.equal(torch.stack([ds2[i]["uncond"] for i in range(len(ds2))]), picks[2])
    raw = load_file(str(info.shards[0].path))
    i = int(picks[2].nonzero()[0])
    if i < 20:
        assert torch.equal(ds2[i]["hidden"], raw["hidden_uncond"][i])
    train, held = split_indices(48, 0.05)
    assert len(held) == 2 and len(train) == 46 and not set(train) & set(held)


# ---------------------------------------------------------------------------------------------------
# training


def test_loss_falls_and_checkpoint_loads(setup, tmp_path):
    save = tmp_path / "run"
    out = run_train(setup, save, "--lr", "2e-3", "--bs", "4", "--max_steps", "60", "--warmup_steps", "3",
                    "--log_every", "1", "--save_every", "5")
    train = records(save, "train")
    assert [r["step"] for r in train] == list(range(1, 61))
    first = sum(r["loss"] for r in train[:5]) / 5
    last = sum(r["loss"] for r in train[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    evals = records(save, "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert evals[-1]["loss"] < evals[0]["loss"] and evals[-1]["top1"] > evals[0]["top1"] + 0.2
    assert evals[-1]["top1"] <= evals[-1]["top2"] <= evals[-1]["top3"]
    # 46 train samples, bs 4: 12 steps per epoch -> 60 steps = 5 epochs -> state_5 (save_every 5)
    assert out["state_dir"] == save / "state_5" and (save / "latest").read_text().strip() == "state_5"
    drafter = load_drafter(save / "state_5", "cpu", torch.float32, setup["target"].config)
    assert torch.equal(drafter.embed_tokens.weight, setup["target"].tok_embeddings.weight)  # frozen copy
    assert set(json.loads((save / "state_5" / "config.json").read_text())) >= {"hidden_size", "block_size"}
    state = torch.load(save / "state_5" / "training_state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batches_done"]) == (60, 5, 0)


def _max_abs_diff(a: dict, b: dict) -> tuple[float, str]:
    """Largest elementwise difference over all tensors, and the tensor where it occurs."""
    return max(((a[k] - b[k]).abs().max().item(), k) for k in a if a[k].numel())


def test_gradient_accumulation_matches_the_large_batch(setup, tmp_path):
    """bs 2 × accumulation 2 gives the same gradients and weights as bs 4 × 1 (noise off, same sample order).

    Tolerances are derived from the effect being tested, not from one CPU's rounding: the two runs differ only
    in fp32 summation order, while turning accumulation off (bs 2 × 1) changes the result at full size.
    Gradients are compared before the optimiser touches them (AdamW's first moment after one step is exactly
    0.1·g); the weights after three Adam steps are compared relative to the no-accumulation effect, because
    Adam divides tiny gradient differences by tiny second moments (3e-6 absolute on some CPUs)."""
    common = ["--lr", "1e-3", "--data_noise", "none", "--warmup_steps", "1",
              "--eval_fraction", "0.05", "--grad_clip_mode", "norm", "--grad_clip", "1e9"]
    runs = {"a": ["--bs", "2", "--gradient_accumlation_steps", "2"], "b": ["--bs", "4", "--gradient_accumulation_steps", "1"],
            "c": ["--bs", "2", "--gradient_accumulation_steps", "1"]}
    grads, weights = {}, {}
    for name, flags in runs.items():
        run_train(setup, tmp_path / f"{name}1", *flags, *common, "--max_steps", "1")
        state = torch.load(tmp_path / f"{name}1" / "state_step1" / "training_state.pt", weights_only=True)
        grads[name] = {str(i): s["exp_avg"] / 0.1 for i, s in state["optimizer"]["state"].items()}
        run_train(setup, tmp_path / name, *flags, *common, "--max_steps", "3")
        weights[name] = final_weights(tmp_path / name / "state_step3")
    scale = max(g.abs().max().item() for g in grads["b"].values())
    (g_ab, where_ab), (g_ac, _) = _max_abs_diff(grads["a"], grads["b"]), _max_abs_diff(grads["a"], grads["c"])
    assert g_ab <= 1e-4 * scale, f"accumulated gradients differ from the large batch's by {g_ab:.3g} (param {where_ab}; " \
                                 f"largest gradient {scale:.3g}, tolerance {1e-4 * scale:.3g})"
    assert g_ac > 1e-2 * scale, f"bs 2 without accumulation should change the gradient, changed it by {g_ac:.3g}"
    (w_ab, where), (w_ac, _) = _max_abs_diff(weights["a"], weights["b"]), _max_abs_diff(weights["a"], weights["c"])
    assert w_ac > 1e-4, f"bs 2 without accumulation should move the weights, moved them by {w_ac:.3g}"
    assert w_ab <= 1e-2 * w_ac, f"weights after accumulation differ from the large batch's by {w_ab:.3g} ({where}); " \
                                f"turning accumulation off moves them by {w_ac:.3g} (tolerance 1 % of that)"
    la, lb = records(tmp_path / "a", "train")[-1], records(tmp_path / "b", "train")[-1]
    assert la["loss"] == pytest.approx(lb["loss"], rel=1e-5)


def test_resume_continues_exactly(setup, tmp_path):
    """Stopping mid-epoch and resuming ends with the same weights and optimizer state as an uninterrupted run."""
    common = ["--bs", "4", "--gradient_accumulation_steps", "2", "--max_steps", "9", "--lr", "1e-3",
              "--uncond_prob", "0.3", "--noise_std", "0.2", "--warmup_steps", "2"]  # 6 steps per epoch
    full = run_train(setup, tmp_path / "full", *common)
    first = run_train(setup, tmp_path / "parts", *common, "--stop_after_steps", "4")
    assert first["step"] == 4 and first["state_dir"] == tmp_path / "parts" / "state_step4"
    second = run_train(setup, tmp_path / "parts", *common, "--resume")
    assert second["step"] == 9 and full["step"] == 9
    assert full["state_dir"].name == second["state_dir"].name == "state_step9"
    assert_same_weights(final_weights(full["state_dir"]), final_weights(second["state_dir"]))
    sa = torch.load(full["state_dir"] / "training_state.pt", weights_only=True)
    sb = torch.load(second["state_dir"] / "training_state.pt", weights_only=True)
    assert (sa["step"], sa["epoch"], sa["batches_done"]) == (sb["step"], sb["epoch"], sb["batches_done"]) == (9, 1, 6)
    for pid, st in sa["optimizer"]["state"].items():
        torch.testing.assert_close(st["exp_avg_sq"], sb["optimizer"]["state"][pid]["exp_avg_sq"], rtol=0, atol=0)
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"] == 9
    # the epoch-1 checkpoint of the resumed run (written after the restart) exists and is loadable
    load_drafter(tmp_path / "parts" / "state_1", "cpu", torch.float32, setup["target"].config)


def test_config_files_and_layout_checks(setup, tmp_path):
    for name, n_img in (("llamagen_t2i_config.json", 256), ("llamagen_t2i2_config.json", 1024)):
        cfg = td.read_drafter_config(REPO_ROOT / "data" / "configs" / name, setup["target"].config)
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.vocab_size) == (1280, 3584, 20, 16384)
        assert (cfg.num_hidden_layers, cfg.block_size, cfg.cls_token_num, cfg.rms_norm_eps) == (1, n_img, 120, 1e-6)
    with pytest.raises(UserError, match="hidden_size 1280 != target dim 32"):
        run_train(setup, tmp_path / "x", "--config_path", str(REPO_ROOT / "data/configs/llamagen_t2i_config.json"))
    own = {**td.default_drafter_config(setup["target"].config).to_dict(), "intermediate_size": 48}
    (tmp_path / "cfg.json").write_text(json.dumps(own))
    out = run_train(setup, tmp_path / "y", "--config_path", str(tmp_path / "cfg.json"), "--max_steps", "1")
    assert load_drafter(out["state_dir"]).config.intermediate_size == 48


def test_main_py_dispatch_runs_training(setup, tmp_path):
    import main as cli

    save = tmp_path / "cli"
    cli.main(["train_drafter", "--base_path", str(setup["target_path"]), "--data_dir", str(setup["data"]),
              "--save_dir", str(save), "--cpu", "--max_steps", "2", "--bs", "8"])
    assert (save / "latest").exists() and records(save, "train")[-1]["step"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_launch(setup, tmp_path):
    """Two gloo processes (accelerate launch --multi_gpu): identical final weights on both ranks, falling loss."""
    save = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "entrypoints.train_drafter.main",
           "--base_path", str(setup["target_path"]), "--data_dir", str(setup["data"]), "--save_dir", str(save),
           "--bs", "4", "--max_steps", "16", "--lr", "2e-3", "--warmup_steps", "2", "--log_every", "4",
           "--dump_rank_weights"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    r0 = load_file(str(save / "rank_weights" / "rank0.safetensors"))
    r1 = load_file(str(save / "rank_weights" / "rank1.safetensors"))
    assert_same_weights(r0, r1)
    assert_same_weights(r0, final_weights(save / (save / "latest").read_text().strip()))
    train = records(save, "train")
    assert [r["step"] for r in train] == [4, 8, 12, 16] and train[-1]["loss"] < 0.8 * train[0]["loss"]
    # 46 samples, bs 4 per process, 2 processes -> 6 micro-batches per process per epoch
    assert (save / "state_2").exists()
