"""Reliability: every bad input stops with one clear line and exit code 2 before any output is written.

Classes (issue 7): non-finite and out-of-range numbers, corrupt / truncated / empty / foreign files, parts that
do not fit the target, OS errors, conflicting reruns; and interrupted runs that resume without losing or
duplicating anything. Everything runs in-process through ``main.py``'s ``run_cli`` on the committed demo
checkpoints or tiny fixtures, so the file stays fast.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import main as cli

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "ckpts" / "demo"


@pytest.fixture(autouse=True)
def _need_demo():
    if not (DEMO / "drafter" / "config.json").exists():
        pytest.skip("demo checkpoints not committed")


def fails(capsys, argv: list[str], *needles: str, untouched: Path | None = None) -> str:
    """Run ``python main.py <argv>`` in-process: exit code 2, an ``error:`` line naming the problem, no
    traceback, and (``untouched``) no output folder created or changed."""
    before = sorted(p.name for p in untouched.iterdir()) if untouched is not None and untouched.exists() else None
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    first = next(line for line in err.splitlines() if line.strip() and "%|" not in line)  # not a progress bar
    assert first.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    if untouched is not None:
        after = sorted(p.name for p in untouched.iterdir()) if untouched.exists() else None
        assert after == before, f"{untouched} changed: {before} -> {after}"
    return err


def gen(out: Path, *extra: str) -> list[str]:
    return ["generate_images", "--model", "demo", "--output_dir", str(out), "--num_images", "1", "--device", "cpu",
            *extra]


# ---------------------------------------------------------------------------------------------------
# numbers


@pytest.mark.parametrize("flags,needle", [
    (["--temperature", "nan"], "--temperature nan"),
    (["--temperature", "inf"], "--temperature inf"),
    (["--temperature", "-1"], "--temperature -1"),
    (["--top_p", "0"], "--top_p 0"),
    (["--top_p", "1.5"], "--top_p 1.5"),
    (["--top_k", "-5"], "--top_k -5"),
    (["--cfg", "-3"], "--cfg -3"),
    (["--cfg", "nan"], "--cfg nan"),
    (["--num_images", "0"], "--num_images 0"),
    (["--random_seed", "-1"], "--random_seed -1"),
    (["--threads", "0"], "--threads 0"),
    (["--model_type", "eagle", "--lantern", "--lantern_delta", "nan"], "--lantern_delta nan"),
    (["--model_type", "eagle", "--lantern", "--lantern_delta", "-0.1"], "--lantern_delta -0.1"),
    (["--model_type", "eagle", "--lantern", "--lantern_k", "0"], "--lantern_k 0"),
    (["--model_type", "eagle", "--lantern_tvd", "1.5"], "--lantern_tvd 1.5"),
    (["--model_type", "eagle", "--lantern_lambda", "0.5"], "--lantern_lambda 0.5"),
    (["--model_type", "eagle", "--top_k_draft", "0"], "--top_k_draft 0"),
    (["--model_type", "eagle", "--depth", "0"], "--depth 0"),
    (["--model_type", "eagle", "--total_token", "1"], "--total_token 1"),
    (["--model_type", "eagle", "--static_tree", "--tree_choices", "bushy"], "--tree_choices"),
    (["--model_type", "base", "--lantern"], "--model_type eagle"),
    (["--image_size", "30"], "--image_size 30"),
    (["--image_size", "64"], "generates 64 image tokens"),
])
def test_generate_images_rejects_bad_numbers(tmp_path, capsys, flags, needle):
    fails(capsys, gen(tmp_path / "out", *flags), needle, untouched=tmp_path / "out")


def test_cfg_at_most_one_means_no_guidance_as_in_llamagen(tmp_path, capsys):
    cli.main(gen(tmp_path / "out", "--cfg", "0.5", "--model_type", "base"))
    assert "no classifier-free guidance" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "generation_configs.json").read_text())["resolved_cfg"] == 1.0


@pytest.mark.parametrize("setting,needle", [
    ("lantern:delta=nan", "must be a finite number"),
    ("lantern:delta=abc", "is not a number"),
    ("lantern:delta=1.5", "--lantern_tvd 1.5"),
    ("lantern++:lam=0.5", "--lantern_lambda 0.5"),
    ("lantern:k=0,delta=0.1", "--lantern_k 0"),
    ("eagle2:depth=0", "depth 0"),
    ("eagle2:total_token=x", "is not an integer"),
    ("lantern:delta", "key=value"),
    ("eagle1:tree=bushy", "unknown tree choices"),
])
def test_benchmark_settings_are_validated_before_any_run(tmp_path, capsys, setting, needle):
    fails(capsys, ["benchmark", "--num_images", "1", "--output_dir", str(tmp_path / "b"), "--settings", "ar", setting],
          needle, untouched=tmp_path / "b")


def test_benchmark_and_pipeline_flags(tmp_path, capsys):
    fails(capsys, ["benchmark", "--output_dir", str(tmp_path / "b"), "--temperature", "inf"], "--temperature inf")
    fails(capsys, ["benchmark", "--output_dir", str(tmp_path / "b"), "--num_images", "0"], "--num_images 0")
    fails(capsys, ["self_distill", "--output_dir", str(tmp_path / "s"), "--batch_size", "0"], "--batch_size 0",
          untouched=tmp_path / "s")
    fails(capsys, ["self_distill", "--output_dir", str(tmp_path / "s"), "--top_p", "nan"], "--top_p nan")
    fails(capsys, ["extract_code", "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "c"),
                   "--shard_size", "0"], "--shard_size 0", untouched=tmp_path / "c")
    fails(capsys, ["generate_train_data", "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "h"),
                   "--num_samples", "-2"], "--num_samples -2")



def test_evaluation_flags(tmp_path, capsys):
    d = str(tmp_path)
    fails(capsys, ["eval_prec_recall", "--fake_dir", d, "--ref_dir", "digits", "--k", "0"], "--k 0")
    fails(capsys, ["eval_fid_clip", "--fake_dir", d, "--ref_dir", "digits", "--batch_size", "0"], "--batch_size 0")
    fails(capsys, ["eval_fid_clip", "--fake_dir", d, "--ref_dir", "digits", "--how_many", "-1"], "--how_many -1")
    fails(capsys, ["eval_hpsv2", "--image_path", d, "--prompt_path", d, "--threads", "0"], "--threads 0")

# ---------------------------------------------------------------------------------------------------
# corrupt, empty and foreign files


def copy_part(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(DEMO / name, dst)
    return dst


def test_truncated_empty_and_garbage_weights_name_the_file(tmp_path, capsys):
    gpt = copy_part(tmp_path, "gpt")
    weights = gpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    fails(capsys, gen(tmp_path / "o", "--model_path", str(gpt)), str(weights), "truncated", untouched=tmp_path / "o")
    weights.write_bytes(b"")
    fails(capsys, gen(tmp_path / "o", "--model_path", str(gpt)), str(weights), "empty")
    weights.write_bytes(b"\x00garbage" * 100)
    fails(capsys, gen(tmp_path / "o", "--model_path", str(gpt)), str(weights), "safetensors")


def test_bad_config_json_is_an_error_not_a_default_model(tmp_path, capsys):
    # the VQ's folder as the GPT: its config.json lacks the GPT's sizes (once: a 6.6 B default GPT, killed for memory)
    fails(capsys, gen(tmp_path / "o", "--model_path", str(DEMO / "vq")), "is not a LlamaGen GPT config", "dim",
          untouched=tmp_path / "o")
    gpt = copy_part(tmp_path, "gpt")
    (gpt / "config.json").write_text('{"dim": 128, "n_layer"')
    fails(capsys, gen(tmp_path / "o", "--model_path", str(gpt)), str(gpt / "config.json"), "not valid JSON")
    (gpt / "config.json").write_text("[1, 2]")
    fails(capsys, gen(tmp_path / "o", "--model_path", str(gpt)), "expected a JSON object")
    vq = copy_part(tmp_path, "vq")
    (vq / "config.json").write_text(json.dumps({"dim": 128}))
    fails(capsys, gen(tmp_path / "o", "--vq_path", str(vq)), "is not a LlamaGen VQ tokenizer config")


def test_pt_files_and_shards(tmp_path, capsys):
    bad = tmp_path / "c2i_B_256.pt"
    bad.write_bytes(os.urandom(256))
    fails(capsys, gen(tmp_path / "o", "--model_path", str(bad)), str(bad), "PyTorch checkpoint")
    torch.save({"model": {"something.else": torch.zeros(2)}}, bad)
    fails(capsys, gen(tmp_path / "o", "--model_path", str(bad)), "not a LlamaGen GPT checkpoint")
    # a sharded folder whose index names a shard that is not there
    gpt = copy_part(tmp_path, "gpt")
    sd = load_file(str(gpt / "model.safetensors"))
    (gpt / "model.safetensors").unlink()
    names = sorted(sd)
    save_file({k: sd[k] for k in names[:5]}, str(gpt / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {k: "model-00001-of-00002.safetensors" if i < 5 else "model-00002-of-00002.safetensors"
                            for i, k in enumerate(names)}}
    (gpt / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(capsys, gen(tmp_path / "o", "--model_path", str(gpt)), "model-00002-of-00002.safetensors", "missing",
          untouched=tmp_path / "o")


def test_corrupt_drafter_and_neighbour_table(tmp_path, capsys):
    drafter = copy_part(tmp_path, "drafter")
    (drafter / "model.safetensors").write_bytes(b"")
    fails(capsys, gen(tmp_path / "o", "--model_type", "eagle", "--drafter_path", str(drafter)), "empty",
          untouched=tmp_path / "o")
    table = tmp_path / "nb.safetensors"
    data = (DEMO / "neighbours.safetensors").read_bytes()
    table.write_bytes(data[: len(data) // 3])
    fails(capsys, gen(tmp_path / "o", "--model_type", "eagle", "--lantern", "--codebook_path", str(table)),
          str(table), "not a readable neighbour table", untouched=tmp_path / "o")


# ---------------------------------------------------------------------------------------------------
# parts that do not fit the target


def test_drafter_for_another_target(tmp_path, capsys):
    drafter = copy_part(tmp_path, "drafter")
    cfg = json.loads((drafter / "config.json").read_text())
    (drafter / "config.json").write_text(json.dumps({**cfg, "hidden_size": 256, "vocab_size": 2048}))
    fails(capsys, gen(tmp_path / "o", "--model_type", "eagle", "--drafter_path", str(drafter)),
          "hidden_size 256 != the target's 128", "vocab_size 2048", untouched=tmp_path / "o")
    (drafter / "config.json").write_text(json.dumps({"hidden_size": 128}))
    fails(capsys, gen(tmp_path / "o", "--model_type", "eagle", "--drafter_path", str(drafter)),
          "is not a EAGLE drafter config")


def test_neighbour_tables_that_do_not_fit(tmp_path, capsys):
    from models.drafters.neighbours import save_neighbour_table

    lantern = ["--model_type", "eagle", "--lantern"]
    small = save_neighbour_table(tmp_path / "small.safetensors", torch.randint(0, 512, (512, 30)))
    fails(capsys, gen(tmp_path / "o", *lantern, "--codebook_path", str(small)), "512 rows", "1024 codes",
          untouched=tmp_path / "o")
    wild = save_neighbour_table(tmp_path / "wild.safetensors", torch.randint(0, 5000, (1024, 30)))
    fails(capsys, gen(tmp_path / "o", *lantern, "--codebook_path", str(wild)), "must lie in [0, 1024)")
    fails(capsys, gen(tmp_path / "o", *lantern, "--lantern_k", "200"), "holds only 128 neighbours")


def test_vq_of_another_codebook_size(tmp_path, capsys):
    from models.base_models.llamagen.vq_model import VQConfig, VQModel

    cfg = VQConfig(codebook_size=512, codebook_embed_dim=8, encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2],
                   z_channels=32, ch=32, num_res_blocks=1)
    folder = tmp_path / "vq512"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg.__dict__))
    save_file({k: v.contiguous() for k, v in VQModel(cfg).state_dict().items()}, str(folder / "model.safetensors"))
    fails(capsys, gen(tmp_path / "o", "--vq_path", str(folder)), "1024 tokens", "512 codes", untouched=tmp_path / "o")


# ---------------------------------------------------------------------------------------------------
# OS errors and prompts


def test_output_path_problems(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    fails(capsys, gen(afile), "is a file")
    fails(capsys, gen(afile / "sub"), "cannot be created")
    fails(capsys, ["benchmark", "--output_dir", str(afile)], "is a file")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_output_folder_not_writable(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        fails(capsys, gen(locked / "out"), "not writable")
    finally:
        locked.chmod(0o700)


def test_disk_full_is_one_line(tmp_path, capsys, monkeypatch):
    import torchvision.utils

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "prompt_0.png"))

    monkeypatch.setattr(torchvision.utils, "save_image", full)
    fails(capsys, gen(tmp_path / "out", "--model_type", "base"), "No space left", "disk full")


def test_prompt_paths_that_do_not_exist_or_are_empty(tmp_path, capsys):
    fails(capsys, gen(tmp_path / "o", "--prompt", "prompts/mine.txt"), "file not found", untouched=tmp_path / "o")
    fails(capsys, gen(tmp_path / "o", "--prompt", str(tmp_path / "missing.json")), "file not found")
    (tmp_path / "empty.txt").write_text("\n\n")
    fails(capsys, gen(tmp_path / "o", "--prompt", str(tmp_path / "empty.txt")), "holds no prompts")
    (tmp_path / "bad.json").write_text("{not json")
    fails(capsys, gen(tmp_path / "o", "--prompt", str(tmp_path / "bad.json")), "not a readable prompt file")
    fails(capsys, gen(tmp_path / "o", "--prompt", str(tmp_path)), "is a folder")


# ---------------------------------------------------------------------------------------------------
# reruns


def test_resume_with_other_settings_refuses_and_overwrite_regenerates(tmp_path, capsys):
    out = tmp_path / "out"
    cli.main(gen(out, "--model_type", "base", "--set_seed", "--temperature", "1.0"))
    png = (out / "prompt_0.png").read_bytes()
    err = fails(capsys, gen(out, "--model_type", "base", "--set_seed", "--temperature", "0.5"), "other settings",
                "resolved_temperature 1.0 there, 0.5 now", untouched=out)
    assert (out / "prompt_0.png").read_bytes() == png and "--overwrite" in err
    cli.main(gen(out, "--model_type", "base", "--set_seed", "--temperature", "0.5", "--overwrite"))
    cfg = json.loads((out / "generation_configs.json").read_text())
    assert cfg["resolved_temperature"] == 0.5
    capsys.readouterr()
    cli.main(gen(out, "--model_type", "base", "--set_seed", "--temperature", "0.5"))  # same settings: resumes
    assert "resuming: 1 of 1" in capsys.readouterr().out
    # a larger range keeps the finished image and its statistics (no regeneration under a stale record)
    stats = json.loads((out / "global_statistics_0_1.json").read_text())
    cli.main(gen(out, "--model_type", "base", "--set_seed", "--temperature", "0.5", "--num_images", "3"))
    assert "resuming: 1 of 3" in capsys.readouterr().out
    assert json.loads((out / "global_statistics_0_3.json").read_text())["prompt_0"] == stats["prompt_0"]


def test_a_folder_written_by_another_process_is_locked(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        lock = out / ".generate_images.rank0.lock"
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "command": "main.py generate"}))
        fails(capsys, gen(out, "--model_type", "base"), "being written by another process", f"pid {holder.pid}")
        assert not (out / "prompt_0.png").exists()
    finally:
        holder.kill()
        holder.wait()
    cli.main(gen(out, "--model_type", "base"))  # the holder is gone: its stale lock is taken over
    assert (out / "prompt_0.png").exists() and not (out / ".generate_images.rank0.lock").exists()


# ---------------------------------------------------------------------------------------------------
# train_drafter: existing runs, corrupt states, interrupts, changed settings


@pytest.fixture
def train_setup(tmp_path_factory):
    from accelerate.state import AcceleratorState
    from test_train_drafter import make_target, write_data

    AcceleratorState._reset_state(reset_partial_state=True)
    root = tmp_path_factory.mktemp("bad_train")
    target = make_target(root / "target")
    write_data(root / "data", target)
    yield root
    AcceleratorState._reset_state(reset_partial_state=True)


def train_argv(root: Path, save: Path, *extra: str) -> list[str]:
    return ["train_drafter", "--base_path", str(root / "target"), "--data_dir", str(root / "data"), "--save_dir",
            str(save), "--cpu", "--bs", "4", "--num_epochs", "2", "--lr", "1e-3", "--log_every", "1", *extra]


def _train(argv: list[str]) -> None:
    """Call train_drafter in-process (a fresh accelerate state for every run, as separate commands would)."""
    from accelerate.state import AcceleratorState

    from entrypoints.train_drafter import main as td

    AcceleratorState._reset_state(reset_partial_state=True)
    td.main(argv[1:])


def train_records(save: Path) -> list[dict]:
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def test_train_drafter_refuses_an_existing_run(train_setup, tmp_path, capsys):
    save = tmp_path / "run"
    _train(train_argv(train_setup, save, "--max_steps", "2"))
    before = (save / "metrics.jsonl").read_text()
    fails(capsys, train_argv(train_setup, save, "--max_steps", "2"), "already holds a run", "--resume", "--overwrite")
    fails(capsys, train_argv(train_setup, save, "--resume", "--overwrite"), "not both")
    assert (save / "metrics.jsonl").read_text() == before
    _train(train_argv(train_setup, save, "--max_steps", "3", "--overwrite"))
    steps = [r["step"] for r in train_records(save) if r["event"] == "train"]
    assert steps == [1, 2, 3]
    fails(capsys, train_argv(train_setup, tmp_path / "x", "--lr", "nan"), "--lr nan", untouched=tmp_path / "x")
    fails(capsys, train_argv(train_setup, tmp_path / "x", "--uncond_prob", "1.5"), "--uncond_prob 1.5")
    fails(capsys, train_argv(train_setup, tmp_path / "x", "--eval_fraction", "1"), "--eval_fraction 1")


def test_corrupt_training_state_and_data(train_setup, tmp_path, capsys):
    save = tmp_path / "run"
    _train(train_argv(train_setup, save, "--max_steps", "2"))
    state = save / (save / "latest").read_text().strip() / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    fails(capsys, train_argv(train_setup, save, "--resume"), str(state), "not a readable training state")
    data = tmp_path / "data"
    shutil.copytree(train_setup / "data", data)
    shard = data / "hidden_r0_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:64])
    argv = train_argv(train_setup, tmp_path / "y")
    argv[argv.index("--data_dir") + 1] = str(data)
    fails(capsys, argv, str(shard), untouched=tmp_path / "y")


def test_sigint_saves_a_checkpoint_and_the_resume_is_exact(train_setup, tmp_path, capsys, monkeypatch):
    """Ctrl-C mid-epoch: a checkpoint is written, the message names the command that resumes, and resuming it
    ends with the same weights as an uninterrupted run and with each metrics record once."""
    from entrypoints.train_drafter import main as td

    common = ["--gradient_accumulation_steps", "2", "--max_steps", "9", "--warmup_steps", "2"]
    _train(train_argv(train_setup, tmp_path / "full", *common))
    calls = {"n": 0}
    real = td.make_drafter_batch

    def interrupting(batch):
        calls["n"] += 1
        if calls["n"] == 8:  # inside the 4th accumulation group: the partial group is dropped
            os.kill(os.getpid(), signal.SIGINT)
        return real(batch)

    monkeypatch.setattr(td, "make_drafter_batch", interrupting)
    save = tmp_path / "parts"
    with pytest.raises(KeyboardInterrupt) as e:
        _train(train_argv(train_setup, save, *common, "--overwrite"))
    message = str(e.value)
    assert "checkpoint saved" in message and "--resume" in message and "--overwrite" not in message
    assert (save / "latest").read_text().strip() == "state_step3"
    monkeypatch.setattr(td, "make_drafter_batch", real)
    _train(train_argv(train_setup, save, *common, "--resume"))
    a = load_file(str(tmp_path / "full" / "state_step9" / "model.safetensors"))
    b = load_file(str(save / "state_step9" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in train_records(save) if r["event"] == "train"]
    assert steps == list(range(1, 10))


def test_records_after_the_last_checkpoint_are_not_duplicated(train_setup, tmp_path):
    """A run killed (SIGKILL) after logging past its last checkpoint: the resume drops those records."""
    save = tmp_path / "run"
    _train(train_argv(train_setup, save, "--max_steps", "8", "--stop_after_steps", "4"))
    with open(save / "metrics.jsonl", "a") as f:  # what a killed run logged after its checkpoint at step 4
        for s in (5, 6):
            f.write(json.dumps({"event": "train", "step": s, "loss": 0.0}) + "\n")
        f.write('{"event": "tra')  # and a line cut by the kill
    _train(train_argv(train_setup, save, "--max_steps", "8", "--resume"))
    steps = [r["step"] for r in train_records(save) if r["event"] == "train"]
    assert steps == list(range(1, 9))


def test_resume_with_changed_batch_or_schedule_refuses_with_the_reason(train_setup, tmp_path, capsys):
    save = tmp_path / "run"
    _train(train_argv(train_setup, save, "--max_steps", "20", "--stop_after_steps", "3"))  # stops inside epoch 1
    fails(capsys, train_argv(train_setup, save, "--max_steps", "20", "--resume", "--bs", "2"),
          "position in the epoch", "--bs 4")
    fails(capsys, train_argv(train_setup, save, "--max_steps", "40", "--resume"), "lr would jump")
    _train(train_argv(train_setup, save, "--max_steps", "20", "--resume"))  # the saved settings continue
    assert [r["step"] for r in train_records(save) if r["event"] == "train"] == list(range(1, 21))


def test_threads_flag_and_default(monkeypatch):
    from entrypoints.common import apply_threads, default_cpu_threads

    before = torch.get_num_threads()
    try:
        assert apply_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert apply_threads(None) == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert apply_threads(None) == default_cpu_threads() >= 1
    finally:
        torch.set_num_threads(before)
    assert 1 <= default_cpu_threads() <= 4


def test_generate_codebook_names_a_corrupt_dense_table(tmp_path, capsys):
    bad = tmp_path / "top_1023_indices.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    fails(capsys, ["generate_codebook", "--from_dense", str(bad), "--save_path", str(tmp_path / "nb.safetensors")],
          str(bad), untouched=tmp_path)


def test_two_trainings_into_one_save_dir(train_setup, tmp_path, capsys):
    import socket

    save = tmp_path / "run"
    save.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (save / ".train_drafter.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                               "command": "train_drafter"}))
        fails(capsys, train_argv(train_setup, save, "--max_steps", "2"), "being written by another process")
        assert not (save / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
