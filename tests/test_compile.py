"""--compile: the compiled target decodes the same tokens as eager, and compiles once (counted)."""

from __future__ import annotations

import pytest
import torch
from test_engine import TREES, _fixture_gpt, _prefix, _random_drafter

from models.compiled import CompiledDrafter, CompiledTarget, compile_target, drafter_q_buckets, graph_launches
from models.drafters.choices import get_tree_choices
from models.drafters.tree import StaticTreeTemplate
from models.ea_model import SpeculativeDecoder, TreeConfig
from models.generation import draw_noise, generate_ar
from models.profiling import OpCounter, profile_ar_step
from models.sampling import SamplingConfig, sample_from_probs
from models.token_masks import PositionalTokenMask

GREEDY = SamplingConfig(temperature=0)
SAMPLED = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0)
CHAIN = TreeConfig(static_choices=tuple(tuple(c) for c in get_tree_choices("chain_6")))


def _prefixes(model, io):
    return [_prefix(model, io["gen_cond"][i : i + 1], torch.ones(1, 1, dtype=torch.bool), 4.0) for i in range(2)]


def _decode(target, drafter, prefix, sampling, tree, seed):
    gens = [torch.Generator().manual_seed(seed)]
    if tree is None:
        return generate_ar(target, prefix, 16, sampling, gens)[0]
    return SpeculativeDecoder(target, drafter, 16, sampling, 4.0, tree=tree).generate(prefix, gens)[0]


def _check_same_tokens_and_no_recompile(backend: str):
    torch._dynamo.reset()
    model, io = _fixture_gpt("c2i")
    drafter = _random_drafter(model, 0)
    compiled = CompiledTarget(model, backend=backend, drafter=True)
    first, second = _prefixes(model, io)
    for tree in (None, TREES["dynamic"], CHAIN):  # AR step, dynamic tree, chain
        for sampling in (GREEDY, SAMPLED):
            want = _decode(model, drafter, first, sampling, tree, 3)
            assert torch.equal(_decode(compiled, drafter, first, sampling, tree, 3), want), (tree, sampling)
    # target: the AR step (token ids to next tokens, so one graph per sampling setting: greedy, sampled) and
    # the whole round of the dynamic tree and of the chain (models/drafters/fused_round.py: one graph per tree
    # and sampling setting); drafter: the prefix catch-up before the first round, one per tree (its other
    # calls run inside the round's graph)
    assert (compiled.target_graphs, compiled.drafter_graphs) == (6, 2)
    graphs = compiled.graphs
    for tree in (None, TREES["dynamic"], CHAIN):  # new images, new caches: no recompilation
        for sampling in (GREEDY, SAMPLED):
            want = _decode(model, drafter, second, sampling, tree, 5)
            assert torch.equal(_decode(compiled, drafter, second, sampling, tree, 5), want)
    assert compiled.graphs == graphs
    assert compiled.compile_s > 0
    return model, drafter, compiled, second


def test_compiled_graph_decodes_like_eager_and_never_recompiles():
    """Dynamo capture with static padded shapes (eager backend: fast); tokens equal, graphs counted."""
    _check_same_tokens_and_no_recompile("eager")


@pytest.mark.slow
def test_inductor_compiled_target_decodes_like_eager_and_never_recompiles():
    """Inductor graphs (target and drafter); under an op counter the graphs run compiled and are counted by
    their kernel launches (the benchmark's launches per round), with the same tokens."""
    model, drafter, compiled, prefix = _check_same_tokens_and_no_recompile("inductor")
    want = _decode(model, drafter, prefix, SAMPLED, CHAIN, 7)
    with OpCounter() as eager_ops:
        _decode(model, drafter, prefix, SAMPLED, CHAIN, 7)
    graphs = compiled.graphs
    with OpCounter() as ops:
        got = _decode(compiled, drafter, prefix, SAMPLED, CHAIN, 7)
    assert torch.equal(got, want) and compiled.graphs == graphs
    assert eager_ops.graph_calls == 0 and ops.graph_calls > 0 and ops.graph_launches > 0
    assert ops.total < eager_ops.total  # a compiled forward launches fewer kernels than eager dispatches ops
    # a compiled AR step is one graph call; outside it the sampler's Exp(1) draw is dispatched eagerly, plus
    # (spread over the 15 steps) the first token's eager choice after the prefill and the final stack
    step = profile_ar_step(compiled, prefix, 16, SAMPLED, lambda: [torch.Generator().manual_seed(1)])
    assert step["graph_calls_per_step"] == 1
    assert step["ops_per_step"] - step["graph_launches_per_step"] <= 4, step
    assert compiled.graphs == graphs


@pytest.mark.slow
def test_cpu_gemm_template_freezes_weights_and_decodes_like_the_library():
    """--compile_gemm cpp (the CPU default): weights frozen into the graph, every product inductor's C++ GEMM
    template (no BLAS call left in the wrapper); the same tokens as eager and as --compile_gemm aten, launches
    still counted, and another model of the same shapes gets its own graph (its weights are not the first's)."""
    torch._dynamo.reset()
    model, io = _fixture_gpt("c2i")
    drafter = _random_drafter(model, 0)
    first, second = _prefixes(model, io)
    cpp, lib = CompiledTarget(model, gemm="cpp"), CompiledTarget(model, gemm="aten")
    for tree in (None, CHAIN):
        for sampling in (GREEDY, SAMPLED):
            want = _decode(model, drafter, first, sampling, tree, 3)
            assert torch.equal(_decode(cpp, drafter, first, sampling, tree, 3), want), (tree, sampling)
            assert torch.equal(_decode(lib, drafter, first, sampling, tree, 3), want), (tree, sampling)
    for compiled, gemm in ((cpp, "cpp"), (lib, "aten")):
        for fn in (compiled._step, compiled._round):
            assert fn.counter.sources and all(n for n in fn.counter.launches), gemm
            for source in fn.counter.sources:
                assert ("aoti_torch_cpu_mm_out" in source) == (gemm == "aten"), gemm
                assert ("_frozen_param" in source) == (gemm == "cpp"), gemm
    other, _ = _fixture_gpt("c2i")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    step_graphs = cpp._step.counter.graphs
    twin = CompiledTarget(other, gemm="cpp")
    want = _decode(other, drafter, second, SAMPLED, None, 5)
    assert torch.equal(_decode(twin, drafter, second, SAMPLED, None, 5), want)
    assert twin._step.counter.graphs == 1 and cpp._step.counter.graphs == step_graphs


@pytest.mark.slow
def test_cpu_gemm_falls_back_to_the_library_where_the_template_has_no_kernel():
    """A product the template does not cover (float64) compiles with the library's products, with a warning,
    and computes the same."""
    from models.compiled import _CompiledFn

    torch._dynamo.reset()
    layer = torch.nn.Linear(64, 32, dtype=torch.float64)
    fn = _CompiledFn(lambda mod, x: mod(x).softmax(-1), None, "inductor", "cpp")
    x = torch.randn(3, 64, dtype=torch.float64)
    with torch.inference_mode():
        with pytest.warns(UserWarning, match="compiling it with the BLAS library"):
            got = fn("k", layer, x)
        assert torch.allclose(got, layer(x).softmax(-1), atol=1e-12) and fn.gemm == "aten"


def test_gemm_choice_is_checked_and_needs_a_compiled_setting():
    from entrypoints.benchmark import parse_setting
    from entrypoints.common import UserError

    assert parse_setting("ar:compile=1,gemm=aten", 20, "chain_6")["gemm"] == "aten"
    with pytest.raises(UserError, match="gemm is one of cpp, aten"):
        parse_setting("ar:compile=1,gemm=mkl", 20, "chain_6")
    with pytest.raises(UserError, match="applies to compiled settings"):
        parse_setting("lantern++:lam=20,gemm=cpp", 20, "chain_6")
    with pytest.raises(ValueError, match="unknown gemm"):
        CompiledTarget(_fixture_gpt("c2i")[0], gemm="blas")


def test_exponential_noise_argmax_draws_what_torch_multinomial_draws():
    """The AR step samples ``argmax(p / q)`` with ``q`` from :func:`draw_noise`: the same tokens as
    ``torch.multinomial(p, 1, generator)`` from the same generator state (shared generator over a batch, one
    generator per prompt), zero-probability tokens never drawn, and the generators left in the same state."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    probs = torch.softmax(logits.index_fill(1, torch.tensor([0, 7, 49]), float("-inf")), -1)
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    pa = [torch.Generator().manual_seed(s) for s in (2, 3, 4)]
    pb = [torch.Generator().manual_seed(s) for s in (2, 3, 4)]
    for _ in range(300):
        want = sample_from_probs(probs, a)
        assert torch.equal((probs / draw_noise(torch.empty_like(probs), b)).argmax(-1), want)
        want = torch.cat([sample_from_probs(probs[r : r + 1], g) for r, g in enumerate(pa)])
        assert torch.equal((probs / draw_noise(torch.empty_like(probs), pb)).argmax(-1), want)
        assert not torch.isin(want, torch.tensor([0, 7, 49])).any()
    assert torch.equal(a.get_state(), b.get_state())
    assert all(torch.equal(x.get_state(), y.get_state()) for x, y in zip(pa, pb))


def test_ar_decoding_reads_nothing_back_to_the_host():
    """No ``.item()`` / ``int()`` in the AR loop, nor inside the ops it calls (``torch.multinomial`` reads its
    input's validity back, twice per call): a read-back stalls a GPU every step, and a compiled step could not
    be one graph. The profiler sees nested aten calls: no ``_local_scalar_dense`` in an eager greedy, seeded
    (one generator per prompt / shared) or inverse-CDF decode."""
    from torch.profiler import ProfilerActivity, profile

    model, io = _fixture_gpt("c2i")
    first, _ = _prefixes(model, io)
    for sampling, gens, uniforms in ((GREEDY, None, None), (SAMPLED, [torch.Generator().manual_seed(0)], None),
                                     (SAMPLED, torch.Generator().manual_seed(0), None),
                                     (SAMPLED, None, torch.rand(1, 16))):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate_ar(model, first, 16, sampling, gens, uniforms=uniforms)
        names = {e.key: e.count for e in prof.key_averages()}
        assert names.get("aten::mm", 0) + names.get("aten::addmm", 0) > 0  # the profiler saw the decode
        assert "aten::_local_scalar_dense" not in names, (sampling, names.get("aten::_local_scalar_dense"))


def _ar_settings(model, io):
    """Plain-AR settings the compiled step must decode like eager: name, prefix, sampling config (built anew at
    every call: value-equal configs share a graph), generators for a seed shift, allowed tokens, uniforms."""
    first, second = _prefixes(model, io)
    pair = _prefix(model, io["gen_cond"][:2], torch.ones(2, 1, dtype=torch.bool), 4.0)
    v = model.config.vocab_size
    classes = torch.ones(2, v, dtype=torch.bool)
    classes[0, v // 2 :] = False  # class 0: the lower half of the vocabulary; class 1: one forced token
    classes[1] = torch.arange(v) == 3
    positional = PositionalTokenMask(classes, (torch.arange(16) % 5 == 4).long()[None])

    def per_prompt(*seeds):
        return lambda shift: [torch.Generator().manual_seed(s + shift) for s in seeds]

    def sampled(**kw):
        return lambda: SamplingConfig(**{"temperature": 1.0, **kw})

    def uniforms(shift):
        return torch.rand(1, 16, generator=torch.Generator().manual_seed(8 + shift))

    return [
        ("greedy", first, lambda: SamplingConfig(temperature=0), lambda shift: None, None, None),
        ("seeded", first, sampled(), per_prompt(3), None, None),
        ("shared generator", first, sampled(), lambda shift: torch.Generator().manual_seed(4 + shift), None, None),
        ("batch of two", pair, sampled(), per_prompt(5, 6), None, None),
        ("top-k/top-p", second, sampled(temperature=0.9, top_k=20, top_p=0.8), per_prompt(7), None, None),
        ("uniforms", second, sampled(), lambda shift: None, None, uniforms),
        ("positional mask", second, sampled(), per_prompt(9), positional, None),
    ]


def test_compiled_ar_step_decodes_like_eager_as_one_graph_per_setting():
    """The compiled AR step (token ids to next tokens: embedding, mask from the position tensor, layers, head,
    CFG, token restriction, processing, choice — one graph): greedy and seeded tokens equal eager's, and the
    logits ``on_step`` observes too; exactly one graph per setting (no graph break), none for new images."""
    torch._dynamo.reset()
    model, io = _fixture_gpt("c2i")
    compiled = CompiledTarget(model, backend="eager")
    for shift in (0, 100):  # the second pass: new seeds and uniforms, new caches, new configs: no new graph
        for name, prefix, sampling, gens, allowed, uniforms in _ar_settings(model, io):
            seen = {"eager": [], "compiled": []}
            runs = {}
            for label, target in (("eager", model), ("compiled", compiled)):
                runs[label] = generate_ar(target, prefix, 16, sampling(), gens(shift), allowed,
                                          None if uniforms is None else uniforms(shift),
                                          on_step=lambda i, logits, tok, log=seen[label]: log.append(logits))[0]
            assert torch.equal(runs["compiled"], runs["eager"]), name
            assert len(seen["compiled"]) == 16, name
            assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(seen["compiled"], seen["eager"])), name
            if allowed is not None:  # the restriction held: forced positions forced, the rest in the lower half
                forced = allowed.forced[0]
                tokens = runs["compiled"][0]
                assert (tokens[forced] == 3).all() and (tokens[~forced] < model.config.vocab_size // 2).all()
        # greedy; sampled batch 1 (seeded and shared generator: one graph); batch 2; top-k/top-p; uniforms;
        # positional mask
        assert compiled.target_graphs == 6, shift
    assert compiled.compile_s > 0


def test_compiled_drafter_in_a_batch_decodes_like_eager():
    """Batch of two prompts (rows accept different lengths: per-row catch-up slots, padded; a finished prompt
    drops out: fewer rows, counted new graphs) — tokens equal eager's for greedy and seeded sampling."""
    torch._dynamo.reset()
    model, io = _fixture_gpt("c2i")
    drafter = _random_drafter(model, 1)
    compiled = CompiledTarget(model, backend="eager", drafter=True)
    assert SpeculativeDecoder(compiled.with_drafter(False), drafter, 16, GREEDY, 4.0)._compiled_drafter is None
    cond = io["gen_cond"][:2]
    prefix = _prefix(model, cond, torch.ones(2, 1, dtype=torch.bool), 4.0)
    for sampling, tree in ((GREEDY, TREES["dynamic"]), (SAMPLED, CHAIN)):
        gens = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
        want = SpeculativeDecoder(model, drafter, 16, sampling, 4.0, tree=tree).generate(prefix, gens)[0]
        gens = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
        dec = SpeculativeDecoder(compiled, drafter, 16, sampling, 4.0, tree=tree)
        assert dec._compiled_drafter is not None
        assert torch.equal(dec.generate(prefix, gens)[0], want), (sampling, tree)


def test_drafter_query_buckets_and_padding_stay_inside_the_cache():
    """Buckets: static template levels + longest accepted path + 1; dynamic top_k_draft and depth + 1. A call
    padded past the cache's end keeps its own shape instead (nothing written out of range)."""
    assert drafter_q_buckets(CHAIN, StaticTreeTemplate.from_choices(CHAIN.static_choices)) == (1, 7)
    assert drafter_q_buckets(TreeConfig(top_k_draft=10, depth=4, total_token=59)) == (5, 10)
    model, _ = _fixture_gpt("c2i")
    drafter = _random_drafter(model, 0)
    cd = CompiledDrafter(drafter, backend="eager")
    feats, ids = torch.randn(2, 2, model.config.dim), torch.randint(0, 10, (2, 2))
    pos = torch.tensor([[5, 6], [6, 7]])
    mask = torch.arange(8) <= pos[:, None, :, None]  # (2, 1, 2, 8): causal over each row's slots
    for length, padded in ((16, True), (8, False)):  # room for 2 padding queries per row / none
        with torch.inference_mode():
            want_cache, cache = drafter.new_cache(2, length), drafter.new_cache(2, length)
            want = drafter(feats, ids, pos, want_cache, pos, mask)
            got = cd(feats, ids, pos, cache, pos, mask, q_buckets=(4,))
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
        rows = torch.arange(2)[:, None]
        assert torch.allclose(cache.k[0][rows, :, pos], want_cache.k[0][rows, :, pos], atol=1e-6)
        assert cd._run._seen == {(2, 4 if padded else 2)}
        cd._run._seen.clear()


def test_graph_launches_counts_kernel_calls_in_inductor_wrapper_code():
    src = """
def call(self, args):
        arg0_1, arg1_1 = args
        assert_size_stride(arg0_1, (8, 8), (8, 1), 'input')
        buf0 = empty_strided_cpu((8, 8), (8, 1), torch.float32)
        extern_kernels.mm(arg0_1, arg1_1, out=buf0)
        cpp_fused_add_relu_0(buf0, arg1_1)
        buf1 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(buf0, buf0, buf0)
        buf2 = buf1[0]
        triton_poi_fused_mul_1.run(buf2, 64, stream=stream0)
        buf3 = reinterpret_tensor(buf0, (64,), (1,), 0); del buf0
        return (buf3, )

runner = Runner(partitions=[])
"""
    assert graph_launches(src) == 4
    cpp = """
void inductor_entry_impl(AtenTensorHandle* input_handles, AtenTensorHandle* output_handles) {
    AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(3, int_array_0, int_array_1, dt, dev, 0, &buf0_handle));
    cpp_fused_cat_embedding_0((const int64_t*)(arg2_1.data_ptr()), (float*)(buf0.data_ptr()));
    AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_new_tensor_handle(buf3, &tmp_buf3_0));
    AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_mm_out(buf4, RAIIAtenTensorHandle(tmp_buf3_0), arg8_1));
        AOTI_TORCH_ERROR_CODE_CHECK(
            aoti_torch_call_dispatcher("aten::unsqueeze", "", dispatch_vars.data())
        );
} // inductor_entry_impl
"""
    assert graph_launches(cpp) == 3
    assert graph_launches(None) is None and graph_launches("extern \"C\" void kernel() {}") is None


def test_compile_refuses_other_caches_and_is_idempotent():
    from entrypoints.common import UserError

    model, _ = _fixture_gpt("c2i")

    class Fam:
        target = model

    fam = Fam()
    t = compile_target(fam)
    assert isinstance(t, CompiledTarget) and compile_target(fam) is t and t.config is model.config

    class Other:
        def new_cache(self, batch, max_len):
            return object()

    fam.target = Other()
    with pytest.raises(UserError, match="--compile supports"):
        compile_target(fam)


@pytest.mark.slow
def test_benchmark_runs_eager_and_compiled_settings_interleaved(tmp_path):
    import json

    import main as cli

    cli.main(["benchmark", "--num_images", "2", "--repeats", "1", "--output_dir", str(tmp_path), "--settings", "ar",
              "ar:compile=1", "lantern++:lam=20,tree=chain_6", "lantern++:lam=20,tree=chain_6,compile=1",
              "lantern++:lam=20,tree=chain_6,compile=2", "ar:compile=1,gemm=aten"])
    report = json.loads((tmp_path / "benchmark.json").read_text())
    rows = {r["setting"]: r for r in report["results"]}
    assert rows["ar:compile=1"]["compiled"] and not rows["ar"]["compiled"]
    assert rows["ar:compile=1"]["speedup_vs_ar_same_compile"] == 1.0
    # each matrix-product choice is its own compiled target, compared with the AR compiled the same way
    assert rows["ar:compile=1,gemm=aten"]["speedup_vs_ar_same_compile"] == 1.0
    assert rows["ar:compile=1,gemm=aten"]["tau"] == 1 and rows["ar:compile=1,gemm=aten"]["compiled"]
    assert report["compile_gemm"]["ar:compile=1"] == "cpp" and report["compile_gemm"]["ar:compile=1,gemm=aten"] == "aten"
    for eager, comp in (("ar", "ar:compile=1"), ("lantern++:lam=20,tree=chain_6",
                                                  "lantern++:lam=20,tree=chain_6,compile=1")):
        assert rows[eager]["tau"] == rows[comp]["tau"] and rows[eager]["accuracy"] == rows[comp]["accuracy"]
    both = rows["lantern++:lam=20,tree=chain_6,compile=2"]
    assert both["tau"] == rows["lantern++:lam=20,tree=chain_6"]["tau"] and both["compiled"]
    assert both["profile"]["graph_calls_per_round"] > rows["lantern++:lam=20,tree=chain_6,compile=1"]["profile"][
        "graph_calls_per_round"] > 0  # the drafter's graphs are called (and their launches counted) too
    assert "round_over_ar_step_same_compile" in rows["lantern++:lam=20,tree=chain_6,compile=1"]["profile"]


def test_compile_drafter_flag_implies_compile():
    import argparse

    from models.compiled import add_compile_args

    parser = argparse.ArgumentParser()
    add_compile_args(parser)
    assert vars(parser.parse_args(["--compile_drafter"])) == {"compile": True, "compile_drafter": True,
                                                               "compile_mode": "default", "compile_gemm": "cpp"}
    assert not parser.parse_args(["--compile"]).compile_drafter
