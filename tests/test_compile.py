"""--compile: the compiled target decodes the same tokens as eager, and compiles once (counted)."""

from __future__ import annotations

import pytest
import torch
from test_engine import TREES, _fixture_gpt, _prefix, _random_drafter

from models.compiled import CompiledTarget, compile_target
from models.drafters.choices import get_tree_choices
from models.ea_model import SpeculativeDecoder, TreeConfig
from models.generation import generate_ar
from models.sampling import SamplingConfig

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
    compiled = CompiledTarget(model, backend=backend)
    first, second = _prefixes(model, io)
    for tree in (None, TREES["dynamic"], CHAIN):  # AR step, dynamic tree, chain
        for sampling in (GREEDY, SAMPLED):
            want = _decode(model, drafter, first, sampling, tree, 3)
            assert torch.equal(_decode(compiled, drafter, first, sampling, tree, 3), want), (tree, sampling)
    graphs = compiled.graphs  # one per query count: AR (1), dynamic tree (12 nodes), chain (7 nodes)
    assert graphs == 3
    for tree in (None, TREES["dynamic"], CHAIN):  # new images, new caches: no recompilation
        for sampling in (GREEDY, SAMPLED):
            want = _decode(model, drafter, second, sampling, tree, 5)
            assert torch.equal(_decode(compiled, drafter, second, sampling, tree, 5), want)
    assert compiled.graphs == graphs
    assert compiled.compile_s > 0


def test_compiled_graph_decodes_like_eager_and_never_recompiles():
    """Dynamo capture with static padded shapes (eager backend: fast); tokens equal, graphs counted."""
    _check_same_tokens_and_no_recompile("eager")


@pytest.mark.slow
def test_inductor_compiled_target_decodes_like_eager_and_never_recompiles():
    _check_same_tokens_and_no_recompile("inductor")


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
              "ar:compile=1", "lantern++:lam=20,tree=chain_6", "lantern++:lam=20,tree=chain_6,compile=1"])
    report = json.loads((tmp_path / "benchmark.json").read_text())
    rows = {r["setting"]: r for r in report["results"]}
    assert rows["ar:compile=1"]["compiled"] and not rows["ar"]["compiled"]
    assert rows["ar:compile=1"]["speedup_vs_ar_same_compile"] == 1.0
    for eager, comp in (("ar", "ar:compile=1"), ("lantern++:lam=20,tree=chain_6",
                                                  "lantern++:lam=20,tree=chain_6,compile=1")):
        assert rows[eager]["tau"] == rows[comp]["tau"] and rows[eager]["accuracy"] == rows[comp]["accuracy"]
    assert "round_over_ar_step_same_compile" in rows["lantern++:lam=20,tree=chain_6,compile=1"]["profile"]
