"""generate_codebook: the table the CLI writes is the brute-force neighbour order; dense conversion; safe writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import conformance_dir, load_io, read_json

import main as cli
from models.drafters.neighbours import load_neighbour_table


def brute_force(codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """All other codes by exact float64 distance, self excluded, stable argsort (ties → lower index)."""
    cb = codebook.double()
    if metric == "cosine":
        cb = cb / cb.norm(dim=-1, keepdim=True)
    d = ((cb[:, None, :] - cb[None, :, :]) ** 2).sum(-1)
    d.fill_diagonal_(float("inf"))
    return torch.sort(d, dim=-1, stable=True).indices[:, :-1]


def run_cli(*args: str) -> None:
    cli.main(["generate_codebook", *args])


def expect_exit_2(capsys, *args: str) -> str:
    """Run the task expecting a one-line user error (exit code 2); returns stderr."""
    with pytest.raises(SystemExit) as e:
        run_cli(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def original_vq(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """The LlamaGen VQ conformance fixture written as an original ``.pt`` (weights under 'model') + sizes JSON."""
    fixture = conformance_dir("llamagen_vq")
    folder = tmp_path_factory.mktemp("vq")
    state_dict = load_io(fixture / "weights.safetensors")
    torch.save({"model": state_dict}, folder / "vq.pt")
    shutil.copy(fixture / "config.json", folder / "vq.json")
    return folder / "vq.pt", state_dict["quantize.embedding.weight"]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_table_from_vq_checkpoint_is_brute_force_order(original_vq, metric, tmp_path, capsys):
    vq_path, codebook = original_vq
    assert codebook.shape == (64, 8)
    out = tmp_path / "vq_distances" / "neighbours.safetensors"
    run_cli("--model", "llamagen", "--vq_path", str(vq_path), "--save_path", str(out),
            "--top_k", "10", "--metric", metric, "--device", "cpu")
    table = load_neighbour_table(out)
    assert torch.equal(table, brute_force(codebook, metric)[:, :10])

    meta = read_json(out.with_name(out.name + ".json"))
    assert meta["model"] == "llamagen" and meta["metric"] == metric and meta["top_k"] == 10
    assert meta["codebook_size"] == 64 and meta["codebook_dim"] == 8 and meta["vq_path"] == str(vq_path)
    summary = capsys.readouterr().out
    assert "N=64" in summary and "D=8" in summary and metric in summary and "top_k" in summary
    assert not [p for p in out.parent.iterdir() if ".tmp" in p.name]  # temporaries renamed away


def test_metrics_differ_on_unnormalised_rows(original_vq):
    # The fixture rows are not unit length, so the two documented orders are really different tables.
    _, codebook = original_vq
    assert not torch.equal(brute_force(codebook, "l2")[:, :10], brute_force(codebook, "cosine")[:, :10])


def test_default_top_k_is_capped_at_n_minus_1(original_vq, tmp_path, capsys):
    vq_path, codebook = original_vq
    out = tmp_path / "all.npy"
    run_cli("--model", "llamagen", "--vq_path", str(vq_path), "--save_path", str(out), "--device", "cpu")
    assert torch.equal(load_neighbour_table(out), brute_force(codebook, "l2"))
    err = expect_exit_2(capsys, "--model", "llamagen", "--vq_path", str(vq_path),
                        "--save_path", str(tmp_path / "x.npy"), "--top_k", "64")
    assert "--top_k 64" in err and "63" in err


@pytest.mark.parametrize("with_self_column", [False, True])
def test_from_dense_keeps_first_top_k_columns(with_self_column, tmp_path, capsys):
    n = 50
    codebook = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    dense = brute_force(codebook, "l2").numpy().astype(np.uint16)  # (N, N-1) as the original stores it
    if with_self_column:
        dense = np.concatenate([np.arange(n, dtype=np.uint16)[:, None], dense], axis=1)
    src = tmp_path / f"top_{n - 1}_indices.npy"
    np.save(src, dense)
    out = tmp_path / "neighbours.safetensors"
    run_cli("--from_dense", str(src), "--save_path", str(out), "--top_k", "7")
    assert torch.equal(load_neighbour_table(out), brute_force(codebook, "l2")[:, :7])
    meta = read_json(out.with_name(out.name + ".json"))
    assert meta["source"] == "dense" and meta["top_k"] == 7 and meta["codebook_size"] == n
    assert meta["dtype"] == "int16"  # compact storage
    assert "N=50" in capsys.readouterr().out


def test_from_dense_rejects_a_table_listing_self(tmp_path, capsys):
    src = tmp_path / "bad.npy"
    np.save(src, np.tile(np.arange(10, dtype=np.uint16)[:, None], (1, 9)))  # row i starts with i in most rows
    err = expect_exit_2(capsys, "--from_dense", str(src), "--save_path", str(tmp_path / "out.npy"))
    assert "own code" in err
    assert not (tmp_path / "out.npy").exists()


def test_refuses_to_overwrite_without_flag(tmp_path, capsys):
    n = 20
    src = tmp_path / "dense.npy"
    np.save(src, brute_force(torch.randn(n, 3, generator=torch.Generator().manual_seed(1)), "l2").numpy().astype(np.uint16))
    out = tmp_path / "neighbours.safetensors"
    out.write_bytes(b"precious")
    err = expect_exit_2(capsys, "--from_dense", str(src), "--save_path", str(out))
    assert "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"precious"

    run_cli("--from_dense", str(src), "--save_path", str(out), "--overwrite")
    assert load_neighbour_table(out).shape == (n, n - 1)
    assert json.loads(out.with_name(out.name + ".json").read_text())["top_k"] == n - 1


def test_chameleon_models_name_the_missing_tokenizer_files(tmp_path, capsys):
    err = expect_exit_2(capsys, "--model", "anole", "--vq_path", str(tmp_path / "tokenizer"),
                        "--save_path", str(tmp_path / "t.safetensors"))
    assert "vqgan.yaml" in err and "ckpts/anole/chameleon/tokenizer" in err


def test_help_documents_top_k_and_metrics(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("--help")
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--model", "--vq_path", "--save_path", "--top_k", "--metric", "--chunk_size", "--device",
                 "--from_dense", "--overwrite"):
        assert flag in out
    assert "--lantern_k" in out and "normalised" in out
