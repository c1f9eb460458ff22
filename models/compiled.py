"""``--compile``: the target's cached forward through ``torch.compile``, with static shapes.

Why: on a small model every decoding step is bound by the dispatch of a few hundred small aten operators (issue
8); a compiled forward fuses them. To compile once and never again, every cached forward gets the same shapes
from call to call: the attention mask is padded with ``-inf`` to the full cache length, so the queries attend
over all ``max_len`` slots and the masked ones get exactly zero weight. A plain-AR step is compiled whole
(:meth:`CompiledTarget.ar_step`, the graph of :func:`models.generation.ar_step`): token ids to the next tokens —
embedding, the mask built inside the graph from the step's position tensor, layers, head, CFG, token
restriction, processing and choice — with no host sync, so only the sampler's Exp(1) draw runs eagerly between
two graph calls; a run compiles one such graph per sampling setting. A speculative round is compiled whole
(:meth:`CompiledTarget.speculative_round`, the graph of :func:`models.drafters.fused_round.speculative_round`): the
drafter's tree levels, the target forward over the tree, the verification, the commit and the drafter's
catch-up, with every position a tensor and every mask over the whole cache — one graph per tree setting, one
call per round. A tree-verification forward outside it (decoders that run the engine's general loop: ``--tree
auto``, drafter-free proposers) keeps the caller's query count (the fixed tree size): one graph per tree size.
The prefill (a boolean mask over the prompt only) and any forward without a cache stay eager.

Outputs: the compiled graph computes the same function; its floating-point results may differ from eager in
the last bits (fused kernels reorder sums), which could only change a token when two logits tie to those bits
or a uniform draw falls on a CDF boundary — the tests check greedy and seeded sampled tokens are equal.

The drafter (``--compile_drafter``, benchmark ``compile=2``): :class:`CompiledDrafter` compiles its cached
forward the same way, with the query count padded to a few fixed sizes (:func:`drafter_q_buckets`), so a run
compiles one graph per size and nothing after the first image. Off by default: on the CPU demo a compiled call
of the one-layer drafter costs about what its eager ops cost (dynamo's guards and the wrapper take ~0.1 ms per
call), measured in the README's "--compile" section.

On CPU inductor's C++ wrapper is used (``cpp_wrapper``): the python wrapper's per-call overhead was a large
part of a compiled demo step. Also on CPU, by default (``--compile_gemm cpp``), the weights are frozen into each
graph and its matrix products are inductor's C++ GEMM template instead of a BLAS call per product
(:data:`CPU_GEMM_PATCHES`); ``--compile_gemm aten`` keeps the library. Op counting (:class:`~models.profiling.OpCounter`) sees a compiled call as the
kernel launches of its graph (:func:`graph_launches`).

``mode="reduce-overhead"`` (CUDA graphs) is offered for CUDA; it cannot be tested on this project's CPU machines.
"""

from __future__ import annotations

import argparse
import functools
import re
import time

import torch

from models.drafters.kv_cache import KVCache
from models.generation import ar_step

# ``gemm="cpp"`` on CPU: inductor freezes the weights (they become constants of the graph, packed once at
# compile time) and computes every product with its C++ GEMM template (micro-kernels generated for the product's
# fixed shape, with the following pointwise ops fused in) instead of calling the BLAS library per product. On the
# demo's small products (2-56 rows by 128-1024 columns) the library's per-call cost dominates: the template took
# half its time in inductor's own benchmark of every shape (README "--compile"). Only the CPP backend is
# offered, so no shape is autotuned (autotuning against the library added ~3.5 s of compilation per shape).
# Frozen weights: a graph keeps the values it was compiled with (another module is another graph; weights
# changed in place after compilation are not seen) -- decoding never changes them.
CPU_GEMM_PATCHES = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}
GEMM_CHOICES = ("cpp", "aten")


def check_gemm(gemm: str) -> None:
    if gemm not in GEMM_CHOICES:
        raise ValueError(f"unknown gemm {gemm!r}: one of {', '.join(GEMM_CHOICES)}")


class CompileCounter:
    """A compile backend that counts how many graphs it compiled (the recompilation test and report).

    ``inner``: ``"inductor"`` (fused kernels, the point of ``--compile``) or ``"eager"`` (the captured graph run
    op by op: dynamo's tracing and guards without code generation — what the fast tests use).

    With inductor it also reads, once per graph, how many kernels one call of the graph launches
    (:func:`graph_launches`) and records in ``last_launches`` the count of the graph that ran last, so that an
    :class:`~models.profiling.OpCounter` can add a compiled call's launches to the aten ops it counts eagerly.
    """

    def __init__(self, inner: str = "inductor"):
        if inner not in ("inductor", "eager"):
            raise ValueError(f"unknown backend {inner!r}")
        self.inner, self.graphs = inner, 0
        self.last_launches: int | None = None
        self.launches: list[int | None] = []  # per compiled graph
        self.sources: list[str | None] = []  # per compiled graph: inductor's generated wrapper code

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        if self.inner == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        # on CPU the C++ wrapper: the python wrapper's per-call overhead (argument asserts, buffer handles)
        # costs about as much as a small graph's kernels (measured: README "--compile")
        cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))
        compiled = compile_fx(gm, example_inputs, config_patches={"cpp_wrapper": True} if cpu else None)
        source = _graph_source(compiled)
        n = graph_launches(source)
        self.launches.append(n)
        self.sources.append(source)

        def run(*args):
            self.last_launches = n
            return compiled(*args)

        return run


# statements of inductor's wrapper that launch work: its generated kernels (C++ on CPU, Triton on GPU), the
# extern kernels it calls (mm, addmm, attention) and aten fallbacks. Python wrapper (``def call``):
_LAUNCH_PY = re.compile(r"^(?:\w+(?:, \w+)* = )?(?:cpp_fused_\w+|\w+\.run|extern_kernels\.\w+|torch\.ops\.[\w.]+"
                        r"|aten\.[\w.]+)\(")
# C++ wrapper (``inductor_entry_impl``): kernel calls, aoti shims of aten ops, dispatcher fallbacks
_LAUNCH_CPP = re.compile(r"^(?:AOTI_TORCH_ERROR_CODE_CHECK\()?(?:cpp_fused_\w+|call_triton_\w+|aoti_torch_cpu_\w+"
                         r"|aoti_torch_cuda_\w+|aoti_torch_call_dispatcher|aoti_torch_proxy_executor_call_function)\(")


def _graph_source(compiled, depth: int = 6) -> str | None:
    """The generated wrapper code of what ``compile_fx`` returned: its ``source_code``, or, when it returned a
    wrapper function (frozen weights: :data:`CPU_GEMM_PATCHES`), that of the compiled graph the wrapper holds
    (searched through closures and attributes, a few levels deep)."""
    todo, seen = [(compiled, 0)], set()
    while todo:
        obj, d = todo.pop()
        if id(obj) in seen or d > depth:
            continue
        seen.add(id(obj))
        source = getattr(obj, "source_code", None)
        if isinstance(source, str):
            return source
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                todo.append((cell.cell_contents, d + 1))
            except ValueError:  # an empty cell
                pass
        if hasattr(obj, "__dict__") and not isinstance(obj, type):
            todo += [(v, d + 1) for v in vars(obj).values()]
    return None


def graph_launches(source: str | None) -> int | None:
    """Kernel launches in one call of an inductor graph, counted in its generated wrapper code: every
    generated-kernel call, extern-kernel call and aten fallback (views such as ``view_as_complex`` included,
    as the eager count includes views). Allocations, tensor reinterpretations and asserts launch nothing.
    None when the code is neither inductor's python wrapper nor its C++ wrapper."""
    if not source:
        return None
    if "def call(" in source and "inductor_entry_impl" not in source:
        body, pattern = source[source.index("def call("):], _LAUNCH_PY
        body = body[: body.find("\nrunner = ")] if "\nrunner = " in body else body
    elif "void inductor_entry_impl(" in source:
        body, pattern = source[source.index("void inductor_entry_impl("):], _LAUNCH_CPP
        body = body[: body.find("} // inductor_entry_impl")]
    else:
        return None
    return sum(1 for line in body.splitlines() if pattern.match(line.strip()))


def _active_op_counter():
    """The innermost :class:`~models.profiling.OpCounter` on the dispatch-mode stack, if any."""
    if not torch._C._len_torch_dispatch_stack():  # the common case: no mode at all
        return None
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from models.profiling import OpCounter

    return next((m for m in reversed(_get_current_dispatch_mode_stack()) if isinstance(m, OpCounter)), None)


class _CompiledFn:
    """``torch.compile(fn, dynamic=False)`` through a counting backend, timing the first call of every new
    input-shape key and, under an :class:`~models.profiling.OpCounter`, counting a graph call as its launches.

    Under a dispatch mode dynamo runs a compiled function's frame eagerly (the mode would see eager aten ops,
    not the graph); with inductor and an op counter active, the call therefore leaves the mode for the graph
    and adds the graph's kernel launches to the counter instead.
    """

    def __init__(self, fn, mode: str | None, backend: str, gemm: str = "cpp"):
        if mode not in (None, "default", "reduce-overhead", "max-autotune"):
            raise ValueError(f"unknown torch.compile mode {mode!r}")
        check_gemm(gemm)
        self.gemm, self.backend = gemm, backend
        if mode in (None, "default"):  # inductor (or eager, for tests) through a counting backend
            self.counter: CompileCounter | None = CompileCounter(backend)
            self.fn = torch.compile(fn, backend=self.counter, dynamic=False)
        else:  # the modes are options of the inductor backend by name (no counting there)
            self.counter = None
            self.fn = torch.compile(fn, mode=mode, dynamic=False)
        self.compile_s = 0.0
        self._seen: set = set()

    def __call__(self, key, *args):
        ops = _active_op_counter()
        if ops is not None and self.counter is not None and self.counter.inner == "inductor" and key in self._seen:
            from torch.utils._python_dispatch import _disable_current_modes

            self.counter.last_launches = None
            with _disable_current_modes():
                out = self.fn(*args)
            if self.counter.last_launches is not None:
                ops.add_graph_call(self.counter.last_launches)
            return out
        if key in self._seen or ops is not None:  # under a dispatch mode dynamo runs the frame eagerly: no compile
            return self.fn(*args)
        t0 = time.perf_counter()
        cpu = all(a.device.type == "cpu" for a in args if isinstance(a, torch.Tensor))
        if cpu and self.gemm == "cpp" and self.backend == "inductor":
            out = self._compile_cpp_gemm(args)
        else:
            out = self.fn(*args)
        self.compile_s += time.perf_counter() - t0
        self._seen.add(key)
        return out


    def _compile_cpp_gemm(self, args):
        """The first call with frozen weights and the C++ GEMM (the patches are read by dynamo, which makes the
        weights constants, and by inductor while it compiles). Where the template has no kernel for a product
        (a dtype or layout it does not cover), inductor finds no choice: this function then compiles with the
        library's products instead, says so once, and keeps that choice for its later graphs."""
        from torch._inductor.exc import InductorError

        try:
            with torch._inductor.config.patch(CPU_GEMM_PATCHES):
                return self.fn(*args)
        except InductorError as e:
            if "NoValidChoicesError" not in str(e):
                raise
        import warnings

        warnings.warn("--compile_gemm cpp: inductor's C++ GEMM template has no kernel for a product of this graph; "
                      "compiling it with the BLAS library's products (--compile_gemm aten)", stacklevel=3)
        self.gemm = "aten"
        return self.fn(*args)


class CompiledTarget:
    """Wraps a target (``forward_hidden``, ``lm_head``, ``embed_tokens``, ``new_cache``, ...): cached forwards
    with an additive mask run compiled over a mask padded to the cache length; everything else is delegated.

    ``compile_s`` is the wall time of the first call for each new query count (tracing + compilation + one
    run), ``graphs`` the number of graphs the backend compiled (recompilations included), both summed with
    those of the drafters compiled beside it (:meth:`compiled_drafter`; ``target_graphs`` / ``drafter_graphs``
    apart).
    """

    def __init__(self, target, mode: str | None = None, backend: str = "inductor", drafter: bool = False,
                 gemm: str = "cpp"):
        self._target, self._mode, self._backend, self._compile_drafter = target, mode, backend, drafter
        self.gemm = gemm  # checked by _CompiledFn
        # one graph per decoding setting of the speculative round (acceptance rule, sampler, tree): the benchmark
        # compares many settings in one process, more than dynamo's default of 8 graphs per function
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._run = _CompiledFn(target.forward_hidden, mode, backend, gemm)
        self._step = _CompiledFn(functools.partial(ar_step, target), mode, backend, gemm)
        from models.drafters.fused_round import speculative_round

        self._round = _CompiledFn(speculative_round, mode, backend, gemm)  # a round, whole (fused_round)
        self._drafters: dict[int, CompiledDrafter] = {}

    def with_drafter(self, drafter: bool = True) -> CompiledTarget:
        """The same compiled target (same graphs and counts) with the drafter's compilation switched on/off:
        the benchmark runs ``compile=1`` and ``compile=2`` settings side by side on one set of graphs."""
        twin = object.__new__(CompiledTarget)
        twin.__dict__.update(self.__dict__)
        twin._compile_drafter = drafter
        return twin

    @property
    def target_graphs(self) -> int | None:
        if self._run.counter is None:
            return None
        return self._run.counter.graphs + self._step.counter.graphs + self._round.counter.graphs

    @property
    def drafter_graphs(self) -> int | None:
        counts = [d._run.counter.graphs for d in self._drafters.values() if d._run.counter is not None]
        return sum(counts) if counts else (0 if self._run.counter is not None else None)

    @property
    def graphs(self) -> int | None:
        if self.target_graphs is None:
            return None
        return self.target_graphs + (self.drafter_graphs or 0)

    @property
    def compile_s(self) -> float:
        return self._run.compile_s + self._step.compile_s + self._round.compile_s + sum(d._run.compile_s for d in self._drafters.values())

    def __getattr__(self, name):  # lm_head, embed_tokens, new_cache, config, embed_condition, ...
        return getattr(self._target, name)

    def compiled_drafter(self, drafter) -> CompiledDrafter | None:
        """The drafter's cached forward compiled with the same mode and backend (one wrapper per drafter, shared
        by every decoder of this target, so settings with the same query counts share graphs); None unless the
        target was made with ``drafter=True`` (``--compile_drafter``: off by default, it does not pay on CPU)."""
        if not self._compile_drafter:
            return None
        if id(drafter) not in self._drafters:
            self._drafters[id(drafter)] = CompiledDrafter(drafter, self._mode, self._backend, self.gemm)
        return self._drafters[id(drafter)]

    def forward_hidden(self, h, rope_pos, cache=None, cache_pos=None, attn_mask=None):
        if cache is None or not isinstance(cache, KVCache) or attn_mask is None or attn_mask.dtype == torch.bool:
            return self._target.forward_hidden(h, rope_pos, cache, cache_pos, attn_mask)
        pad = cache.max_len - attn_mask.shape[-1]
        if pad:  # static shape: every slot past the caller's window is masked out
            attn_mask = torch.nn.functional.pad(attn_mask, (0, pad), value=float("-inf"))
        key = (tuple(h.shape), rope_pos.ndim, cache_pos.ndim if cache_pos is not None else None)
        return self._run(key, h, rope_pos, cache, cache_pos, attn_mask)


    def ar_step(self, token, step, cache, keys_valid, kv_len, prefix_len, cfg_scale, sampling, allowed=None,
                noise=None, uniforms=None):
        """:func:`models.generation.ar_step` as one compiled graph (token ids to the next tokens), over the whole
        cache (``kv_len`` becomes the cache length: the step's position is a tensor, its shapes fixed)."""
        if not isinstance(cache, KVCache):
            return ar_step(self._target, token, step, cache, keys_valid, kv_len, prefix_len, cfg_scale, sampling,
                           allowed, noise, uniforms)
        key = ("ar_step", tuple(token.shape), keys_valid.shape[0], cache.max_len, noise is None, uniforms is None)
        out = self._step(key, token, step, cache, keys_valid, cache.max_len, prefix_len, cfg_scale, sampling,
                         allowed, noise, uniforms)
        if self._mode == "reduce-overhead":  # CUDA graphs reuse output memory at the next replay: keep copies
            out = tuple(x.clone() for x in out)
        return out

    def speculative_round(self, dec, plan, drafter, *args):
        """:func:`models.drafters.fused_round.speculative_round` as one compiled graph (tree, target forward,
        verify, commit and the drafter's catch-up); one graph per template, batch and cache length."""
        try:  # what a new graph is compiled for: the tree, shapes, rule and sampler (first calls are timed)
            rule = hash((dec.accept, dec.sampling, dec.measure_shift))
        except TypeError:  # a rule holding tensors (GSD's embeddings)
            rule = id(dec.accept)
        key = ("speculative_round", dec.tree_cfg, tuple(args[1].shape), args[5].shape[1], rule)
        out = self._round(key, dec, plan, self._target, drafter, *args)
        if self._mode == "reduce-overhead":  # CUDA graphs reuse output memory at the next replay: keep copies
            out = tuple(x.clone() for x in out)
        return out


class CompiledDrafter:
    """The EAGLE drafter's cached forward compiled with static shapes (the drafter module itself is untouched).

    Static shapes: the boolean mask becomes an additive float mask padded with ``-inf`` to the drafter cache's
    length, cache slots are always given per row ((rows, q)), and the query count is padded up to the smallest
    of the caller's ``q_buckets`` that holds it (catch-up: the longest possible accepted path + 1; tree levels:
    their fixed sizes), so a run compiles one graph per bucket. Padding queries take the slots right after the
    row's last real one (uncommitted slots that the next catch-up or tree overwrites before any real query may
    see them), attend only to themselves, and their outputs are dropped.
    """

    def __init__(self, drafter, mode: str | None = None, backend: str = "inductor", gemm: str = "cpp"):
        self._drafter = drafter
        self._run = _CompiledFn(drafter.forward, mode, backend, gemm)

    @property
    def graphs(self) -> int | None:
        return self._run.counter.graphs if self._run.counter is not None else None

    def __call__(self, feats, ids, rope_pos, cache, cache_pos, mask, q_buckets=()):
        rows, q = ids.shape
        if not isinstance(cache, KVCache) or mask is None or mask.dtype != torch.bool:
            return self._drafter(feats, ids, rope_pos, cache, cache_pos, mask)
        dev, length = ids.device, cache.max_len
        # one layout for every call (dynamo guards on strides too): per-row slots, contiguous inputs
        cache_pos = cache_pos.expand(rows, -1).contiguous()
        rope_pos, ids, feats = rope_pos.expand(rows, -1).contiguous(), ids.contiguous(), feats.contiguous()
        qp = min((b for b in q_buckets if b >= q), default=q)
        if qp > q:
            pad_pos = cache_pos[:, -1:] + torch.arange(1, qp - q + 1, device=dev)  # slots after each row's last
            if int(pad_pos.max()) >= length:  # no room for the padding: this call keeps its own shape
                qp = q
        add = torch.full((rows, 1, qp, length), float("-inf"), dtype=feats.dtype, device=dev)
        add[:, :, :q, : mask.shape[-1]].masked_fill_(mask, 0.0)
        if qp > q:
            add[:, 0, q:].scatter_(-1, pad_pos[:, :, None], 0.0)
            feats = torch.cat([feats, feats.new_zeros(rows, qp - q, feats.shape[-1])], 1)
            ids = torch.cat([ids, ids.new_zeros(rows, qp - q)], 1)
            rope_pos = torch.cat([rope_pos, rope_pos[:, -1:].expand(-1, qp - q)], 1)
            cache_pos = torch.cat([cache_pos, pad_pos], 1)
        out = self._run((rows, qp), feats, ids, rope_pos, cache, cache_pos, add)
        return out[:, :q] if qp > q else out


def drafter_q_buckets(tree_cfg, template=None) -> tuple[int, ...]:
    """The drafter query counts of a tree setting (:class:`CompiledDrafter` pads every call up to one of them):
    the catch-up feeds at most the longest accepted path + 1 entries; a static tree feeds each level's nodes
    (the level sizes of its template), a dynamic tree ``top_k_draft`` frontier nodes per level."""
    if template is not None:
        off = template.depth_offsets.tolist()
        levels = {off[d + 1] - off[d] for d in range(1, template.max_depth)}
        return tuple(sorted(levels | {template.max_depth + 1}))
    return tuple(sorted({tree_cfg.top_k_draft, tree_cfg.depth + 1}))


def compile_target(family, mode: str | None = None, check_only: bool = False,
                   drafter: bool = False, gemm: str = "cpp") -> CompiledTarget | None:
    """Replace ``family.target`` by its compiled wrapper (idempotent); families with other caches are refused.
    ``check_only``: only refuse (the caller wraps the target itself). ``drafter``: decoders built on it compile
    the drafter's forward too."""
    if isinstance(family.target, CompiledTarget):
        return family.target
    probe = family.target.new_cache(1, 1)
    if not isinstance(probe, KVCache):
        from entrypoints.common import UserError

        raise UserError(f"--compile supports targets with the shared KV cache (LlamaGen, the demo); "
                        f"{type(family.target).__name__} has {type(probe).__name__}: run without --compile")
    if check_only:
        return None
    family.target = CompiledTarget(family.target, mode, drafter=drafter, gemm=gemm)
    return family.target


class _CompileDrafter(argparse.Action):
    """``--compile_drafter`` sets ``--compile`` too (a compiled drafter beside an eager target is not offered)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.compile_drafter = namespace.compile = True


def add_compile_args(parser) -> None:
    """``--compile`` / ``--compile_mode`` (generate_images, benchmark)."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the AR step (token ids to next tokens, one graph) and the speculative "
                        "round (drafter levels, target forward, verify, commit, catch-up: one graph a round) with "
                        "static shapes; off by default (compile time: 1-3 min; on the CPU demo plain AR ran 4.7x and "
                        "the chain of 6 3.4x faster than eager plain AR; README '--compile')")
    parser.add_argument("--compile_drafter", action=_CompileDrafter, nargs=0, default=False,
                        help="compile the drafter's cached forward too (implies --compile; static shapes, query "
                        "counts padded to the tree's level sizes); off by default: on the CPU demo it is slower")
    parser.add_argument("--compile_mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode; reduce-overhead = CUDA graphs (CUDA only, untested here)")
    parser.add_argument("--compile_gemm", default="cpp", choices=list(GEMM_CHOICES),
                        help="matrix products of compiled graphs on CPU: cpp (default: weights frozen into the graph, "
                        "inductor's C++ GEMM template, faster on small products) or aten (the BLAS library per "
                        "product); ignored on CUDA")


def compile_report(target) -> str | None:
    """One line on what compilation cost, or None when the target is not compiled."""
    if not isinstance(target, CompiledTarget):
        return None
    graphs = ""
    if target.graphs is not None:
        graphs = f", {target.graphs} graph(s) (target {target.target_graphs}, drafter {target.drafter_graphs})"
    return f"compile: {target.compile_s:.1f} s in first calls{graphs}"
