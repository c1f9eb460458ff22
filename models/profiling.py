"""Measuring tools for the benchmark: aten ops per phase, wall time per phase, and robust summaries.

Why: a speculative round on a small model is bound by the dispatch of hundreds of tiny operators, not by its
matmuls (issue 8). The benchmark therefore reports, from the program itself, how many aten operators one round
and one AR step issue and where a round's time goes (drafter catch-up, tree building, target forward, verify,
commit), with medians and spreads over interleaved repeats instead of one mean.

:class:`PhaseProfiler` is attached to a :class:`~models.ea_model.SpeculativeDecoder` (``decoder.profiler``);
the engine calls :meth:`PhaseProfiler.mark` at each phase boundary only when one is attached, so decoding
without a profiler pays one ``is None`` test per phase. Ops are counted by :class:`OpCounter`, a
``TorchDispatchMode`` that sees every aten operator call below autograd (views and in-place ops included).
Op counting and timing are done in separate runs: the dispatch mode slows every op down.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROUND_PHASES = ("drafter", "tree", "target", "verify", "commit", "fused")


class OpCounter(TorchDispatchMode):
    """Counts aten operator calls (total and by name) while active (``with OpCounter() as c: ...``).

    Compiled graphs (``--compile``, :mod:`models.compiled`) are counted by their kernel launches: dynamo would
    run a compiled frame eagerly under a dispatch mode, so the compiled wrappers leave the mode for the graph
    call and report the launches of the graph (:meth:`add_graph_call`). ``total`` = eager aten ops + launches
    inside compiled graphs (``graph_launches``, over ``graph_calls`` calls); with nothing compiled they agree.
    """

    def __init__(self, record_products: bool = False):
        super().__init__()
        self.total = 0
        self.by_op: Counter = Counter()
        self.graph_calls = 0
        self.graph_launches = 0
        # (rows, K, N, dtype, device, weight) of every matrix product (linear / mm / addmm), for replay_products
        self.products: list[tuple] | None = [] if record_products else None

    def add_graph_call(self, launches: int) -> None:
        """One call of a compiled graph that launches ``launches`` kernels (generated + extern + fallbacks)."""
        self.total += launches
        self.graph_calls += 1
        self.graph_launches += launches
        self.by_op["<compiled graph launches>"] += launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        self.by_op[str(func.overloadpacket)] += 1
        if self.products is not None:
            shape = _product_shape(func, args)
            if shape is not None:
                self.products.append(shape)
        return func(*args, **(kwargs or {}))


_PRODUCTS = {"aten.linear": (0, 1, True), "aten.mm": (0, 1, False), "aten.addmm": (1, 2, False)}


def _product_shape(func, args) -> tuple | None:
    """(rows, K, N, dtype, device, weight) of a matrix product call (x @ w), None for any other op; ``weight``
    identifies the right-hand matrix (its storage, offset, shape and strides), so that a replay multiplies by
    one matrix per weight of the model, as the model does every step."""
    spec = _PRODUCTS.get(str(func.overloadpacket))
    if spec is None:
        return None
    x, w = args[spec[0]], args[spec[1]]
    k = x.shape[-1]
    n = w.shape[0] if spec[2] else w.shape[-1]  # linear: weight (N, K); mm: (K, N)
    weight = (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), tuple(w.stride()))
    return (x.numel() // max(k, 1), k, n, x.dtype, x.device, weight)


def replay_products(products: list[tuple], repeats: int = 20) -> float:
    """Seconds that the recorded matrix products take by themselves (median of ``repeats`` passes): the
    arithmetic floor of what recorded them, whatever its dispatch or bookkeeping costs.

    Each product gets fresh activations of its recorded rows and the random stand-in of its recorded weight —
    one stand-in per weight of the model, reused wherever the model reused it (a layer's weight every step), so
    weights come from the caches or from memory as they do in the model."""
    if not products:
        return 0.0
    weights: dict[tuple, torch.Tensor] = {}
    ops = []
    for m, k, n, dt, dev, key in products:
        if key not in weights:  # the key holds the matrix's shape: one stand-in per weight
            weights[key] = torch.randn(n, k, dtype=dt, device=dev)
        ops.append((torch.randn(m, k, dtype=dt, device=dev), weights[key]))
    sync = products[0][4].type == "cuda"
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x, w in ops:
            torch.nn.functional.linear(x, w)
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class PhaseProfiler:
    """Wall time and (optionally) aten ops per phase of the speculative loop, summed over a generate call.

    ``mark(name)`` closes the phase running since the previous mark and opens ``name``; ``mark(None)`` closes
    without opening (end of the loop). ``rounds`` counts marks of ``"drafter"`` (the first phase of a round) or
    ``"fused"`` (a speculative round run as one function, :mod:`models.drafters.fused_round`: one phase).
    With ``counter`` set, op counts per phase are read from it; on CUDA every mark synchronises the device so
    the time lands in the phase that launched the kernels.
    """

    def __init__(self, counter: OpCounter | None = None, sync_device: torch.device | None = None):
        self.counter, self.sync_device = counter, sync_device
        self.seconds: dict[str, float] = {}
        self.ops: dict[str, int] = {}
        self.rounds = 0
        self._open: str | None = None
        self._t = 0.0
        self._n = 0

    def mark(self, name: str | None) -> None:
        if self.sync_device is not None and self.sync_device.type == "cuda":
            torch.cuda.synchronize(self.sync_device)
        now = time.perf_counter()
        n = self.counter.total if self.counter is not None else 0
        if self._open is not None:
            self.seconds[self._open] = self.seconds.get(self._open, 0.0) + now - self._t
            self.ops[self._open] = self.ops.get(self._open, 0) + n - self._n
        if name in ("drafter", "fused"):  # a round starts (``fused``: the whole round as one call)
            self.rounds += 1
        self._open, self._t, self._n = name, now, n

    def per_round(self, table: dict[str, float] | dict[str, int]) -> dict[str, float]:
        """The round phases of ``table`` divided by the number of rounds."""
        r = max(self.rounds, 1)
        return {p: table.get(p, 0) / r for p in ROUND_PHASES}


def machine_info(device: torch.device) -> dict:
    """What a timing was measured on: the CPU's model name, its logical cores and widest vector extension
    (the demo's small products are bound by it), torch's version, and the GPU's name on CUDA. Benchmarks record
    it because sessions land on different machines and ratios move with them (README "Measuring")."""
    import os
    import platform

    cpu, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:  # the first processor's entries
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name" and cpu is None:
                    cpu = value
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the platform's name only
        pass
    cpu = cpu or platform.processor() or platform.machine()
    isa = next((name for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"),
                                       ("avx", "AVX")) if flag in flags), None)
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "cpu_isa": isa, "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_machine(info: dict) -> str:
    """One line: ``AMD EPYC (2 cores, AVX2), torch 2.x`` (+ the GPU)."""
    isa = f", {info['cpu_isa']}" if info.get("cpu_isa") else ""
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return f"{info['cpu']} ({info['cpu_cores']} cores{isa}){gpu}, torch {info['torch']}"


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles (IQR), min and max of a sample (the quartiles equal the value for one value)."""
    vals = sorted(values)
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {"median": statistics.median(vals), "q1": q1, "q3": q3, "min": vals[0], "max": vals[-1], "n": len(vals)}


def profile_speculative(decoder, prefix, generators_fn) -> dict:
    """One generate call timed per phase, then one with ops counted per phase -> per-round numbers.

    ``generators_fn()`` returns fresh generators (same seeds) so both calls decode the same tokens.
    """
    timer = PhaseProfiler(sync_device=prefix.embeddings.device)
    decoder.profiler = timer
    try:
        decoder.generate(prefix, generators_fn())
        counter = OpCounter(record_products=True)
        ops = PhaseProfiler(counter)
        decoder.profiler = ops
        with counter:
            decoder.generate(prefix, generators_fn())
    finally:
        decoder.profiler = None
    sec = timer.per_round(timer.seconds)
    opr = ops.per_round(ops.ops)
    r = max(ops.rounds, 1)
    # the matrix products one round computes (eager decoding only: a compiled graph's are not seen), timed alone
    products = counter.products if not counter.graph_calls else []
    return {"rounds": timer.rounds, "seconds_per_round": sec, "round_s": sum(sec.values()),
            "products_per_round": len(products) / r if products else None,
            "products_s_per_round": replay_products(products) / r if products else None,
            "ops_per_round_by_phase": opr, "ops_per_round": sum(opr.values()),
            "graph_calls_per_round": counter.graph_calls / r, "graph_launches_per_round": counter.graph_launches / r,
            "time_share": {p: v / max(sum(sec.values()), 1e-12) for p, v in sec.items()}}


def profile_ar_step(target, prefix, num_tokens: int, sampling, generators_fn, allowed_tokens=None) -> dict:
    """Aten ops and wall time of one plain-AR step: a whole ``generate_ar`` minus its prefill, over the steps."""
    from models.generation import generate_ar, prefill

    dev = prefix.embeddings.device

    def run_prefill():
        cache = target.new_cache(prefix.rows, prefix.length + num_tokens)
        hidden = prefill(target, prefix, cache)
        target.lm_head(hidden[:, -1]).float()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with torch.inference_mode():
        _, st = generate_ar(target, prefix, num_tokens, sampling, generators_fn(), allowed_tokens)
        t0 = time.perf_counter()
        run_prefill()
        sync()
        t_prefill = time.perf_counter() - t0
        c = OpCounter(record_products=True)
        with c:
            generate_ar(target, prefix, num_tokens, sampling, generators_fn(), allowed_tokens)
        p = OpCounter(record_products=True)
        with p:
            run_prefill()
    steps = max(num_tokens - 1, 1)
    # a step = one forward of one token + sampling; the prefill's ops and time are taken out
    products = c.products[len(p.products):] if not c.graph_calls else []  # the prefill's come first
    return {"ops_per_step": (c.total - p.total) / steps, "steps": steps,
            "products_per_step": len(products) / steps if products else None,
            "products_s_per_step": replay_products(products) / steps if products else None,
            "graph_calls_per_step": (c.graph_calls - p.graph_calls) / steps,
            "graph_launches_per_step": (c.graph_launches - p.graph_launches) / steps,
            "step_s": max(st.latency - t_prefill, 0.0) / steps}
