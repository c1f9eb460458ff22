"""Latent-neighbour tables: construction against brute force, file round trips, the original's format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.drafters.neighbours import (
    build_neighbour_table,
    chameleon_to_token_ids,
    load_neighbour_table,
    save_neighbour_table,
)


def brute_force(codebook: torch.Tensor, top_k: int, metric: str) -> torch.Tensor:
    """Exact pairwise distances in float64, self excluded, stable argsort (ties → lower index)."""
    cb = codebook.double()
    if metric == "cosine":
        cb = cb / cb.norm(dim=-1, keepdim=True)
    d = ((cb[:, None, :] - cb[None, :, :]) ** 2).sum(-1)
    d.fill_diagonal_(float("inf"))
    return torch.sort(d, dim=-1, stable=True).indices[:, :top_k]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n, dim, top_k, chunk", [(50, 4, 10, 4096), (50, 4, 49, 7), (97, 16, 5, 32), (64, 8, 20, 1)])
def test_table_matches_brute_force(metric, n, dim, top_k, chunk):
    gen = torch.Generator().manual_seed(n * dim + top_k)
    codebook = torch.randn(n, dim, generator=gen)
    table = build_neighbour_table(codebook, top_k, metric=metric, chunk_size=chunk)
    assert table.dtype == torch.long and table.shape == (n, top_k)
    assert torch.equal(table, brute_force(codebook, top_k, metric))
    assert not bool((table == torch.arange(n)[:, None]).any())  # self excluded


def test_metrics_differ_and_cosine_ignores_scale():
    gen = torch.Generator().manual_seed(5)
    codebook = torch.randn(40, 3, generator=gen) * torch.rand(40, 1, generator=gen) * 10
    l2 = build_neighbour_table(codebook, 8, metric="l2")
    cos = build_neighbour_table(codebook, 8, metric="cosine")
    assert not torch.equal(l2, cos)
    rescaled = codebook * (1 + torch.rand(40, 1, generator=gen))
    assert torch.equal(build_neighbour_table(rescaled, 8, metric="cosine"), cos)


def test_ties_break_by_lower_index():
    gen = torch.Generator().manual_seed(6)
    codebook = torch.randn(30, 4, generator=gen)
    codebook[[3, 11, 17, 25]] = codebook[8].clone()  # five identical codes: exact distance ties everywhere
    codebook[[5, 20]] = codebook[2].clone()
    for top_k, chunk in ((3, 4096), (6, 8), (29, 5)):
        table = build_neighbour_table(codebook, top_k, chunk_size=chunk)
        assert torch.equal(table, brute_force(codebook, top_k, "l2"))
    table = build_neighbour_table(codebook, 4)
    assert table[8].tolist() == [3, 11, 17, 25] and table[25].tolist() == [3, 8, 11, 17]


def test_bad_arguments():
    cb = torch.randn(10, 2)
    for kwargs in (dict(top_k=0), dict(top_k=10), dict(top_k=3, metric="l1")):
        with pytest.raises(ValueError):
            build_neighbour_table(cb, **kwargs)
    with pytest.raises(ValueError):
        build_neighbour_table(torch.randn(10), 3)


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
@pytest.mark.parametrize("n, stored", [(300, "int16"), (40_000, "uint16"), (70_000, "int32")])
def test_save_load_round_trip(tmp_path, suffix, n, stored):
    gen = torch.Generator().manual_seed(7)
    table = torch.randint(0, n, (64, 12), generator=gen)
    table[0, 0] = n - 1
    path = save_neighbour_table(tmp_path / f"nb{suffix}", table, {"model": "toy", "metric": "l2"})
    meta = json.loads((tmp_path / f"nb{suffix}.json").read_text())
    assert meta["dtype"] == stored and meta["shape"] == [64, 12] and meta["model"] == "toy"
    loaded = load_neighbour_table(path)
    assert loaded.dtype == torch.long and torch.equal(loaded, table)
    assert torch.equal(load_neighbour_table(path, k=5), table[:, :5])
    with pytest.raises(ValueError):
        load_neighbour_table(path, k=13)


def test_round_trip_of_a_built_table(tmp_path):
    codebook = torch.randn(128, 8, generator=torch.Generator().manual_seed(8))
    table = build_neighbour_table(codebook, 16)
    path = save_neighbour_table(tmp_path / "llamagen_top16.safetensors", table, {"metric": "l2", "k": 16})
    assert torch.equal(load_neighbour_table(path, k=10), table[:, :10])


def test_reads_the_original_dense_uint16_format(tmp_path):
    codebook = torch.randn(200, 8, generator=torch.Generator().manual_seed(9))
    n = codebook.shape[0]
    dense = brute_force(codebook, n - 1, "l2").numpy().astype(np.uint16)  # as the original stores it
    path = tmp_path / f"top_{n - 1}_indices.npy"
    np.save(path, dense)
    full = load_neighbour_table(path)
    assert full.shape == (n, n - 1) and full.dtype == torch.long
    assert torch.equal(full, build_neighbour_table(codebook, n - 1))
    assert torch.equal(load_neighbour_table(path, k=20), build_neighbour_table(codebook, 20))
    # a variant that kept the code itself in column 0 is read without it
    with_self = np.concatenate([np.arange(n, dtype=np.uint16)[:, None], dense], axis=1)
    np.save(tmp_path / "with_self.npy", with_self)
    assert torch.equal(load_neighbour_table(tmp_path / "with_self.npy", k=20), full[:, :20])


def test_unsupported_extension(tmp_path):
    with pytest.raises(ValueError):
        save_neighbour_table(tmp_path / "nb.pt", torch.zeros(2, 1, dtype=torch.long), {})
    with pytest.raises(ValueError):
        load_neighbour_table(tmp_path / "nb.pt")


def test_chameleon_token_ids():
    table = torch.tensor([[1, 2], [0, 2], [1, 0]])
    assert chameleon_to_token_ids(table).tolist() == [[5, 6], [4, 6], [5, 4]]
    by_token = chameleon_to_token_ids(table, offset=4, vocab_size=10)
    assert by_token.shape == (10, 2)
    assert by_token[4:7].tolist() == [[5, 6], [4, 6], [5, 4]]  # row = token id = VQ index + 4
    assert bool((by_token[:4] == -1).all()) and bool((by_token[7:] == -1).all())
    with pytest.raises(ValueError):
        chameleon_to_token_ids(table, offset=8, vocab_size=10)
