"""generate_images under ``accelerate launch`` with two CPU processes: prompts split, outputs merged, no collisions."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, write_checkpoints


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_generation_matches_single_process(tmp_path):
    pytest.importorskip("accelerate")
    write_checkpoints(tmp_path, "c2i")
    (tmp_path / "p.txt").write_text("\n".join(str(i % 10) for i in range(7)) + "\n")
    common = ["main.py", "generate_images", "--model", "llamagen_c2i", "--model_path", str(tmp_path / "c2i.pt"),
              "--vq_path", str(tmp_path / "vq.pt"), "--image_size", "8", "--prompt", str(tmp_path / "p.txt"),
              "--set_seed", "--cfg", "4", "--save_tokens"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--num_machines", "1",
              "--main_process_port", str(_free_port())]
    # the split run also decodes in batches of 2: neither the split nor the batching shows in the results
    subprocess.run(launch + common + ["--output_dir", str(tmp_path / "two"), "--batch_size", "2"], cwd=REPO_ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    subprocess.run([sys.executable] + common + ["--output_dir", str(tmp_path / "one")], cwd=REPO_ROOT, env=env,
                   check=True, capture_output=True, timeout=300)
    two = json.loads((tmp_path / "two" / "global_statistics_0_7.json").read_text())
    assert list(two) == [f"prompt_{i}" for i in range(7)]
    assert not list((tmp_path / "two").glob("*.rank*.json"))
    for i in range(7):  # per-image seeds make the split invisible in the results
        a = np.load(tmp_path / "two" / f"prompt_{i}_tokens.npy")
        b = np.load(tmp_path / "one" / f"prompt_{i}_tokens.npy")
        assert np.array_equal(a, b)
