"""A speculative round as one fixed-shape function (models/drafters/fused_round.py): the engine's tokens,
statistics and random draws, eagerly and compiled, for chains and trees, batch 1 and B, padded prefixes."""

from __future__ import annotations

import pytest
import torch
from test_engine import MC_SIM, _fixture_gpt, _fixture_prefix, _random_drafter

from models.compiled import CompiledTarget
from models.drafters.acceptance import AcceptConfig
from models.drafters.choices import get_tree_choices
from models.drafters.fused_round import fused_supported
from models.ea_model import SpeculativeDecoder, TreeConfig
from models.generation import Prefix
from models.profiling import OpCounter, profile_speculative
from models.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0)
SAMPLED = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0)
CHAIN = TreeConfig(static_choices=tuple(tuple(c) for c in get_tree_choices("chain_6")))
TREE = TreeConfig(static_choices=MC_SIM)
DYNAMIC = TreeConfig(top_k_draft=4, depth=3, total_token=12)
TREE_CFGS = {"chain": CHAIN, "tree": TREE, "dynamic": DYNAMIC}
RULES = {"exact": AcceptConfig(), "lantern++": AcceptConfig(relax="lantern++", k=4, lam=5.0),
         "lantern": AcceptConfig(relax="lantern", k=4, delta=0.2, budget="node")}


def _batch_prefix(model, io, kind: str, idx: list[int], cfg: float) -> Prefix:
    count = (io["gen_cond"] if kind == "c2i" else io["cond_idx"]).shape[0]
    parts = [_fixture_prefix(model, io, kind, i % count, cfg) for i in idx]  # prompts repeat, seeds differ
    if len(parts) == 1:
        return parts[0]
    b = len(parts)
    emb = torch.cat([p.embeddings[:1] for p in parts] + [p.embeddings[1:] for p in parts])
    valid = torch.cat([p.valid[:1] for p in parts] + [p.valid[1:] for p in parts])
    assert emb.shape[0] == 2 * b
    return Prefix(emb, valid, cfg)


def _neighbours(vocab: int, k: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(vocab)])


def _decoder(model, drafter, tree, sampling, rule, n_tok=16):
    accept = RULES[rule]
    nb = _neighbours(model.config.vocab_size) if accept.needs_neighbours else None
    return SpeculativeDecoder(model, drafter, n_tok, sampling, 4.0, accept, tree, nb)


def _run(dec, prefix, fused, seeds, shared=False):
    dec.fused_round = fused
    gens = torch.Generator().manual_seed(seeds[0]) if shared else [torch.Generator().manual_seed(s) for s in seeds]
    return dec.generate(prefix, gens)


def _same(a, b):
    (ta, sa), (tb, sb) = a, b
    assert torch.equal(ta, tb)
    assert sa.target_forwards == sb.target_forwards
    for key in ("accept_lengths", "step_compression", "acceptance_by_depth"):
        assert sa.extra[key] == pytest.approx(sb.extra[key], nan_ok=True), key
    if "node_tvd_mean" in sa.extra:
        assert sa.extra["node_tvd_mean"] == pytest.approx(sb.extra["node_tvd_mean"], abs=1e-6)


@pytest.mark.parametrize("kind", ["c2i", "t2i"])  # t2i: padded caption prefixes (masked prefix slots)
@pytest.mark.parametrize("tree", list(TREE_CFGS))
def test_fused_round_gives_the_engines_tokens_and_statistics(kind, tree):
    """Same tokens, accepted lengths and TVD as the engine's general loop, for every rule, greedy and seeded
    sampling, batch 1 and 3 (prompts finish in different rounds: the finished ones freeze)."""
    model, io = _fixture_gpt(kind)
    drafter = _random_drafter(model, 1)
    cfg = TREE_CFGS[tree]
    for rule in RULES:
        for sampling in (SAMPLED, GREEDY):
            dec = _decoder(model, drafter, cfg, sampling, rule)
            for idx in ([0], [0, 1, 2]):
                prefix = _batch_prefix(model, io, kind, idx, 4.0)
                assert fused_supported(dec, prefix)
                seeds = [11 + i for i in idx]
                _same(_run(dec, prefix, True, seeds), _run(dec, prefix, False, seeds))
    # one generator shared by the batch: the same draws in the same order as the engine's
    dec = _decoder(model, drafter, cfg, SAMPLED, "lantern++")
    prefix = _batch_prefix(model, io, kind, [1, 2], 4.0)
    _same(_run(dec, prefix, True, [5], shared=True), _run(dec, prefix, False, [5], shared=True))


def test_fused_round_batch_equals_batch_one_per_prompt():
    """Per-image seeds: a prompt's tokens from the fused round do not depend on the batch it ran in."""
    model, io = _fixture_gpt("c2i")
    drafter = _random_drafter(model, 2)
    dec = _decoder(model, drafter, CHAIN, SAMPLED, "lantern++")
    batch = _run(dec, _batch_prefix(model, io, "c2i", [0, 1, 2], 4.0), True, [3, 4, 5])[0]
    for j, i in enumerate([0, 1, 2]):
        alone = _run(dec, _batch_prefix(model, io, "c2i", [i], 4.0), True, [3 + j])[0]
        assert torch.equal(batch[j : j + 1], alone)


def test_fused_round_is_off_where_it_does_not_apply():
    """``--tree auto``'s observer and eager decoding by default use the general loop."""
    model, io = _fixture_gpt("c2i")
    drafter = _random_drafter(model, 0)
    prefix = _batch_prefix(model, io, "c2i", [0], 4.0)
    assert fused_supported(_decoder(model, drafter, DYNAMIC, SAMPLED, "exact"), prefix)
    static = _decoder(model, drafter, CHAIN, SAMPLED, "exact")
    assert fused_supported(static, prefix)
    static.round_observer = lambda trees, results: None
    assert not fused_supported(static, prefix)
    # eager target, fused_round None: the general loop (its profiler phases are the five of the round)
    static.round_observer = None
    prof = profile_speculative(static, prefix, lambda: [torch.Generator().manual_seed(0)])
    assert prof["seconds_per_round"]["fused"] == 0 and prof["seconds_per_round"]["target"] > 0
    static.fused_round = True
    prof = profile_speculative(static, prefix, lambda: [torch.Generator().manual_seed(0)])
    assert prof["seconds_per_round"]["target"] == 0 and prof["seconds_per_round"]["fused"] > 0
    assert prof["rounds"] > 0


def _compiled_check(backend: str):
    torch._dynamo.reset()
    model, io = _fixture_gpt("c2i")
    drafter = _random_drafter(model, 0)
    compiled = CompiledTarget(model, backend=backend)
    first, second = (_batch_prefix(model, io, "c2i", [i], 4.0) for i in (0, 1))
    for sampling in (GREEDY, SAMPLED):
        eager = _decoder(model, drafter, CHAIN, sampling, "lantern++")
        comp = _decoder(compiled, drafter, CHAIN, sampling, "lantern++")
        assert comp.fused_round is None and fused_supported(comp, first)  # on by default when compiled
        _same(_run(comp, first, None, [3]), _run(eager, first, False, [3]))
    graphs = compiled.graphs
    assert compiled.target_graphs == 2  # the round: one graph per sampling setting (greedy, sampled)
    for sampling in (GREEDY, SAMPLED):  # a new image: no recompilation
        eager = _decoder(model, drafter, CHAIN, sampling, "lantern++")
        comp = _decoder(compiled, drafter, CHAIN, sampling, "lantern++")
        _same(_run(comp, second, None, [8]), _run(eager, second, False, [8]))
    assert compiled.graphs == graphs
    return model, drafter, compiled, second


def test_compiled_fused_round_decodes_like_eager_and_never_recompiles():
    """Dynamo capture of the whole round (eager backend: fast): one graph per setting, the engine's tokens."""
    _compiled_check("eager")


@pytest.mark.slow
def test_inductor_fused_round_decodes_like_eager_with_one_graph_call_per_round():
    """Inductor: the same tokens; under the op counter a round is one graph call plus the uniforms' draws."""
    model, drafter, compiled, prefix = _compiled_check("inductor")
    comp = _decoder(compiled, drafter, CHAIN, SAMPLED, "lantern++")
    with OpCounter() as ops:
        tokens, stats = _run(comp, prefix, None, [9])
    rounds = stats.target_forwards - 1
    assert ops.graph_calls == rounds and ops.graph_launches > 0
    eager = _decoder(model, drafter, CHAIN, SAMPLED, "lantern++")
    with OpCounter() as eager_ops:
        want = _run(eager, prefix, False, [9])[0]
    assert torch.equal(tokens, want) and ops.total < eager_ops.total / 4
