"""``--compile``: the target's cached forward through ``torch.compile``, with static shapes.

Why: on a small model every decoding step is bound by the dispatch of a few hundred small aten operators (issue
8); a compiled forward fuses them. To compile once and never again, every cached forward gets the same shapes
from call to call: the attention mask is padded with ``-inf`` to the full cache length, so the queries attend
over all ``max_len`` slots and the masked ones get exactly zero weight. The query count stays what the caller
gives — 1 for an AR step, the (fixed) tree size for a verification forward — so a run compiles one graph per
query count it uses (AR: one; a speculative setting: its tree size, plus the drafter-free AR step if any).
The prefill (a boolean mask over the prompt only) and any forward without a cache stay eager.

Outputs: the compiled graph computes the same function; its floating-point results may differ from eager in
the last bits (fused kernels reorder sums), which could only change a token when two logits tie to those bits
or a uniform draw falls on a CDF boundary — the tests check greedy and seeded sampled tokens are equal.

``mode="reduce-overhead"`` (CUDA graphs) is offered for CUDA; it cannot be tested on this project's CPU machines.
"""

from __future__ import annotations

import time

import torch

from models.drafters.kv_cache import KVCache


class CompileCounter:
    """A compile backend that counts how many graphs it compiled (the recompilation test and report).

    ``inner``: ``"inductor"`` (fused kernels, the point of ``--compile``) or ``"eager"`` (the captured graph run
    op by op: dynamo's tracing and guards without code generation — what the fast tests use).
    """

    def __init__(self, inner: str = "inductor"):
        if inner not in ("inductor", "eager"):
            raise ValueError(f"unknown backend {inner!r}")
        self.inner, self.graphs = inner, 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        if self.inner == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)


class CompiledTarget:
    """Wraps a target (``forward_hidden``, ``lm_head``, ``embed_tokens``, ``new_cache``, ...): cached forwards
    with an additive mask run compiled over a mask padded to the cache length; everything else is delegated.

    ``compile_s`` is the wall time of the first call for each new query count (tracing + compilation + one
    run), ``graphs`` the number of graphs the backend compiled (recompilations included).
    """

    def __init__(self, target, mode: str | None = None, backend: str = "inductor"):
        if mode not in (None, "default", "reduce-overhead", "max-autotune"):
            raise ValueError(f"unknown torch.compile mode {mode!r}")
        self._target = target
        if mode in (None, "default"):  # inductor (or eager, for tests) through a counting backend
            self._counter = CompileCounter(backend)
            self._fn = torch.compile(target.forward_hidden, backend=self._counter, dynamic=False)
        else:  # the modes are options of the inductor backend by name (no counting there)
            self._counter = None
            self._fn = torch.compile(target.forward_hidden, mode=mode, dynamic=False)
        self.compile_s = 0.0
        self._seen: set = set()

    @property
    def graphs(self) -> int | None:
        return self._counter.graphs if self._counter is not None else None

    def __getattr__(self, name):  # lm_head, embed_tokens, new_cache, config, embed_condition, ...
        return getattr(self._target, name)

    def forward_hidden(self, h, rope_pos, cache=None, cache_pos=None, attn_mask=None):
        if cache is None or not isinstance(cache, KVCache) or attn_mask is None or attn_mask.dtype == torch.bool:
            return self._target.forward_hidden(h, rope_pos, cache, cache_pos, attn_mask)
        pad = cache.max_len - attn_mask.shape[-1]
        if pad:  # static shape: every slot past the caller's window is masked out
            attn_mask = torch.nn.functional.pad(attn_mask, (0, pad), value=float("-inf"))
        key = (tuple(h.shape), rope_pos.ndim, cache_pos.ndim if cache_pos is not None else None)
        if key in self._seen:
            return self._fn(h, rope_pos, cache, cache_pos, attn_mask)
        t0 = time.perf_counter()
        out = self._fn(h, rope_pos, cache, cache_pos, attn_mask)
        self.compile_s += time.perf_counter() - t0
        self._seen.add(key)
        return out


def compile_target(family, mode: str | None = None, check_only: bool = False) -> CompiledTarget | None:
    """Replace ``family.target`` by its compiled wrapper (idempotent); families with other caches are refused.
    ``check_only``: only refuse (the caller wraps the target itself)."""
    if isinstance(family.target, CompiledTarget):
        return family.target
    probe = family.target.new_cache(1, 1)
    if not isinstance(probe, KVCache):
        from entrypoints.common import UserError

        raise UserError(f"--compile supports targets with the shared KV cache (LlamaGen, the demo); "
                        f"{type(family.target).__name__} has {type(probe).__name__}: run without --compile")
    if check_only:
        return None
    family.target = CompiledTarget(family.target, mode)
    return family.target


def add_compile_args(parser) -> None:
    """``--compile`` / ``--compile_mode`` (generate_images, benchmark)."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the target's cached forward (AR step, tree verification) with static "
                        "shapes; off by default (on the CPU demo it speeds plain AR up 1.4x but speculative rounds hardly; "
                        "README 'Speed')")
    parser.add_argument("--compile_mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode; reduce-overhead = CUDA graphs (CUDA only, untested here)")


def compile_report(target) -> str | None:
    """One line on what compilation cost, or None when the target is not compiled."""
    if not isinstance(target, CompiledTarget):
        return None
    graphs = f", {target.graphs} graph(s)" if target.graphs is not None else ""
    return f"compile: {target.compile_s:.1f} s in first calls{graphs}"
