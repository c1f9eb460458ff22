"""The command line: task dispatch, --help everywhere, greedy generation from original-format checkpoint files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_checkpoints

import main as cli
from models.base_models.llamagen.t5 import save_text_cache


def test_main_help_lists_every_task(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for task in cli.TASKS:
        assert task in out


@pytest.mark.parametrize("task", list(cli.TASKS))
def test_every_task_help(task, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([task, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_unknown_task_and_bad_flag_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["no_such_task"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["generate_images", "--temperature", "hot"])
    assert e.value.code == 2


def test_unknown_model_lists_valid_ones(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate_images", "--model", "dalle"])
    assert e.value.code == 2
    assert "llamagen" in capsys.readouterr().err


def test_missing_checkpoint_names_file_and_layout(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate_images", "--model", "llamagen_c2i", "--model_path", str(tmp_path / "c2i_B_256.pt"),
                  "--vq_path", str(tmp_path / "vq_ds16_c2i.pt"), "--prompt", "1", "--output_dir", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "vq_ds16_c2i.pt" in err and "Expected" in err and "Traceback" not in err


def _run_greedy(tmp_path, model: str, kind: str, prompts: list[str], extra: list[str]) -> list[np.ndarray]:
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    cli.main(["generate_images", "--model", model, "--model_path", str(tmp_path / f"{kind}.pt"),
              "--vq_path", str(tmp_path / "vq.pt"), "--image_size", "8", "--prompt", str(tmp_path / "prompts.txt"),
              "--temperature", "0", "--top_k", "0", "--cfg", "4.0", "--save_tokens", "--device", "cpu",
              "--output_dir", str(out), *extra])
    stats = json.loads((out / f"global_statistics_0_{len(prompts)}.json").read_text())
    assert set(stats) == {f"prompt_{i}" for i in range(len(prompts))}
    for entry in stats.values():
        assert {"prompt", "latency", "step_compression", "tokens_per_second"} <= set(entry)
    assert (out / "generation_configs.json").exists()
    assert all((out / f"prompt_{i}.png").exists() for i in range(len(prompts)))
    return [np.load(out / f"prompt_{i}_tokens.npy") for i in range(len(prompts))]


def test_greedy_cli_reproduces_c2i_fixture(tmp_path):
    io = write_checkpoints(tmp_path, "c2i")
    tokens = _run_greedy(tmp_path, "llamagen_c2i", "c2i", [str(int(c)) for c in io["gen_cond"]], [])
    assert np.array_equal(np.stack(tokens), io["gen_tokens"].numpy())


def test_greedy_cli_reproduces_t2i_fixture(tmp_path):
    io = write_checkpoints(tmp_path, "t2i")
    # T5 features as T5 returns them (right-padded), cached by prompt so no 3B encoder is needed
    masks = io["emb_masks"].flip(-1)
    n_valid = io["emb_masks"].sum(1).long()
    embs = torch.zeros_like(io["caption_raw"])
    for i, n in enumerate(n_valid.tolist()):
        embs[i, :n] = io["caption_raw"][i, -n:]
    prompts = ["a red cube on a table", "two dogs in the snow"]
    save_text_cache(tmp_path / "t5_cache.safetensors", prompts, embs, masks)
    tokens = _run_greedy(tmp_path, "llamagen", "t2i", prompts, ["--t5_path", str(tmp_path / "t5_cache.safetensors")])
    assert np.array_equal(np.stack(tokens), io["gen_tokens"].numpy())


def test_generation_resumes_without_redoing_images(tmp_path, capsys):
    io = write_checkpoints(tmp_path, "c2i")
    prompts = [str(int(c)) for c in io["gen_cond"]]
    _run_greedy(tmp_path, "llamagen_c2i", "c2i", prompts, [])
    first = (tmp_path / "out" / "prompt_0.png").stat().st_mtime_ns
    _run_greedy(tmp_path, "llamagen_c2i", "c2i", prompts, [])
    assert (tmp_path / "out" / "prompt_0.png").stat().st_mtime_ns == first
    assert "resuming: 2 of 2" in capsys.readouterr().out
