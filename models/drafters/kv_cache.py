"""Pre-allocated key/value cache addressed by sequence positions (shared by every family).

One tensor pair per layer of shape (batch, kv_heads, max_len, head_dim). A forward call writes the
new keys/values at ``cache_pos`` and attends over the first ``kv_len`` slots; the caller's attention mask
says which of those slots each query may see. Speculative verification writes the whole draft tree
after the committed prefix, then :meth:`commit` (or :meth:`commit_rows`) moves the accepted path's rows into
place — no recomputation.

Batches whose rows have different committed lengths (batched speculative decoding: every prompt accepts its
own number of drafts per round) use per-row slots: ``cache_pos`` may be (batch, q) — row b writes at its own
slots — and :meth:`commit_rows` copies each row's accepted slots to its own destination. Which slots a row
may attend to is the caller's mask (the cache itself keeps no per-row length).
"""

from __future__ import annotations

import torch

from models.sampling import cast


class KVCache:
    """Static cache for ``n_layers`` attention layers."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # number of committed positions (prefix that later calls may attend to)

    def update(
        self, layer: int, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, q, D) at ``cache_pos`` (q,) or per row (B, q); return the first ``kv_len`` slots."""
        k, v = cast(k, self.k[layer].dtype), cast(v, self.v[layer].dtype)
        if cache_pos.ndim == 1:
            self.k[layer].index_copy_(2, cache_pos, k)
            self.v[layer].index_copy_(2, cache_pos, v)
        else:  # row b writes its q entries at its own slots cache_pos[b]
            rows = torch.arange(k.shape[0], device=cache_pos.device)[:, None]
            self.k[layer][rows, :, cache_pos] = k.transpose(1, 2)
            self.v[layer][rows, :, cache_pos] = v.transpose(1, 2)
        return self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]

    def commit(self, src_pos: torch.Tensor, dst_start: int) -> None:
        """Copy slots ``src_pos`` (n,) to ``dst_start .. dst_start+n`` in every layer; set ``length``.

        Used after verification: the accepted path's rows move from their tree slots to the end of
        the committed prefix.
        """
        n = int(src_pos.numel())
        if n:
            dst = torch.arange(dst_start, dst_start + n, device=src_pos.device)
            for kk, vv in zip(self.k, self.v):
                kk.index_copy_(2, dst, kk.index_select(2, src_pos))
                vv.index_copy_(2, dst, vv.index_select(2, src_pos))
        self.length = dst_start + n

    def commit_rows(self, src_pos: torch.Tensor, dst_pos: torch.Tensor) -> None:
        """Per-row commit: row b's slots ``src_pos[b]`` (B, n) are copied to ``dst_pos[b]`` in every layer.

        Rows with fewer entries pad both tensors by repeating their last (src, dst) pair (the same value is
        written twice). All sources are read before anything is written, so overlapping ranges are safe.
        ``length`` is not meaningful for such a cache (rows differ); the caller tracks per-row lengths.
        """
        rows = torch.arange(src_pos.shape[0], device=src_pos.device)[:, None]
        for kk, vv in zip(self.k, self.v):
            kk[rows, :, dst_pos] = kk[rows, :, src_pos]
            vv[rows, :, dst_pos] = vv[rows, :, src_pos]

    def select_batch(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (e.g. drop finished samples)."""
        self.k = [kk.index_select(0, rows) for kk in self.k]
        self.v = [vv.index_select(0, rows) for vv in self.v]
