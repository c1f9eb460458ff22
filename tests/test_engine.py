"""The speculative engine end to end: greedy identity with AR, losslessness by statistics, oracle drafts.

Statistical tests use fixed seeds; a chi-square goodness-of-fit test must not reject the target's exact
joint distribution at p < 1e-3 (the fixed seed makes the outcome deterministic; the threshold says how
unlikely a correct sampler is to fail).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import conformance_dir, load_io, read_json
from scipy.stats import chisquare

from models.base_models.llamagen.gpt import GPTConfig, LlamaGenGPT
from models.drafters.acceptance import AcceptConfig
from models.drafters.choices import get_tree_choices
from models.drafters.cnets import DrafterConfig, EagleDrafter
from models.ea_model import SpeculativeDecoder, TreeConfig
from models.generation import Prefix, generate_ar, prefix_attention_mask
from models.sampling import SamplingConfig, cfg_combine, target_probs
from models.token_masks import apply_allowed_tokens

MC_SIM = tuple(tuple(c) for c in get_tree_choices("mc_sim_7b_63"))
TREES = {
    "dynamic": TreeConfig(top_k_draft=4, depth=3, total_token=12),
    "static": TreeConfig(static_choices=MC_SIM),
}


def _fixture_gpt(kind: str) -> tuple[LlamaGenGPT, dict]:
    d = conformance_dir("llamagen_gpt")
    model = LlamaGenGPT(GPTConfig.from_dict(read_json(d / f"config_{kind}.json"))).eval()
    model.load_state_dict(load_io(d / f"weights_{kind}.safetensors"))
    return model, load_io(d / f"io_{kind}.safetensors")


def _prefix(model: LlamaGenGPT, cond: torch.Tensor, valid: torch.Tensor, cfg_scale: float) -> Prefix:
    if cfg_scale == 1.0:
        return Prefix(model.embed_condition(cond), valid, 1.0)
    return Prefix(model.embed_condition(torch.cat([cond, model.null_condition(cond)])), torch.cat([valid, valid]),
                  cfg_scale)


def _fixture_prefix(model: LlamaGenGPT, io: dict, kind: str, i: int, cfg_scale: float) -> Prefix:
    """Prefix of the fixture's i-th generation prompt (class id for C2I, padded caption for T2I)."""
    if kind == "c2i":
        cond, valid = io["gen_cond"][i : i + 1], torch.ones(1, 1, dtype=torch.bool)
    else:
        cond, valid = io["cond_idx"][i : i + 1], io["emb_masks"][i : i + 1].bool()
    return _prefix(model, cond, valid, cfg_scale)


def _random_drafter(target: LlamaGenGPT, seed: int, hidden: int | None = None) -> EagleDrafter:
    torch.manual_seed(seed)
    c = target.config
    return EagleDrafter(DrafterConfig(hidden_size=hidden or c.dim, intermediate_size=2 * c.dim, num_attention_heads=c.n_head,
                                      vocab_size=c.vocab_size, block_size=c.block_size,
                                      cls_token_num=c.cls_token_num)).eval()


# --------------------------------------------------------------------------------------------- greedy identity
@pytest.mark.parametrize("kind", ["c2i", "t2i"])
@pytest.mark.parametrize("tree", list(TREES))
def test_greedy_speculative_equals_greedy_ar(kind, tree):
    model, io = _fixture_gpt(kind)
    for seed in (0, 1):
        drafter = _random_drafter(model, seed)
        for i in range(2):
            prefix = _fixture_prefix(model, io, kind, i, 4.0)
            dec = SpeculativeDecoder(model, drafter, 16, SamplingConfig(temperature=0), 4.0, tree=TREES[tree])
            tokens, stats = dec.generate(prefix, torch.Generator().manual_seed(seed))
            ar, _ = generate_ar(model, prefix, 16, SamplingConfig(temperature=0))
            assert torch.equal(tokens, ar)
            assert torch.equal(tokens[0], io["gen_tokens"][i])
            assert stats.target_forwards == 1 + len(stats.extra["accept_lengths"])


def test_dynamic_tree_wider_than_its_node_budget_stays_in_the_drafter_cache():
    """top_k_draft x (depth - 1) frontier nodes exceed total_token: the drafter cache must hold them all."""
    model, io = _fixture_gpt("c2i")
    prefix = _prefix(model, io["gen_cond"][:1], torch.ones(1, 1, dtype=torch.bool), 4.0)
    tree = TreeConfig(top_k_draft=6, depth=4, total_token=5)
    dec = SpeculativeDecoder(model, _random_drafter(model, 0), 16, SamplingConfig(temperature=0), 4.0, tree=tree)
    tokens, _ = dec.generate(prefix)
    assert torch.equal(tokens, generate_ar(model, prefix, 16, SamplingConfig(temperature=0))[0])


# --------------------------------------------------------------------------------------------- oracle drafter
class OracleDrafter(torch.nn.Module):
    """A 'drafter' that runs the target itself (C2I, one condition position), so its drafts are the target's.

    Drafter slot s holds token x_{s+1}, which sits at target position s + 1: the oracle keeps the condition in
    its own slot 0 and shifts every drafter slot and RoPE index by one.
    """

    def __init__(self, target: LlamaGenGPT, cond_emb: torch.Tensor):
        super().__init__()
        self.target, self.cond_emb = target, cond_emb
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def new_cache(self, batch: int, max_len: int):
        cache = self.target.new_cache(batch, max_len + 1)
        pos = torch.zeros(1, dtype=torch.long)
        self.target.forward_hidden(self.cond_emb, pos, cache, pos, torch.ones(batch, 1, 1, 1, dtype=torch.bool))
        return cache

    def forward(self, feats, ids, rope_pos, cache, cache_pos, mask):
        first = torch.ones(*mask.shape[:-1], 1, dtype=torch.bool)
        return self.target.forward_hidden(self.target.embed_tokens(ids), rope_pos + 1, cache, cache_pos + 1,
                                          torch.cat([first, mask], dim=-1))


@pytest.mark.parametrize("tree", list(TREES))
def test_oracle_drafts_are_all_accepted_greedy(tree):
    model, io = _fixture_gpt("c2i")
    cond = io["gen_cond"][:1]
    prefix = _prefix(model, cond, torch.ones(1, 1, dtype=torch.bool), 4.0)
    # a dynamic tree that keeps every expanded node, so the greedy path is always in it
    trees = {"dynamic": TreeConfig(top_k_draft=4, depth=3, total_token=37), "static": TREES["static"]}
    dec = SpeculativeDecoder(model, OracleDrafter(model, prefix.embeddings), 16, SamplingConfig(temperature=0), 4.0,
                             tree=trees[tree])
    tokens, stats = dec.generate(prefix, torch.Generator().manual_seed(0))
    assert torch.equal(tokens[0], io["gen_tokens"][0])
    depth = 3 if tree == "dynamic" else 5
    # every round accepts a full path (the last round may be cut by the end of the image)
    assert all(a == depth for a in stats.extra["accept_lengths"][:-1])
    assert stats.extra["step_compression"] > depth


# --------------------------------------------------------------------------------------------- losslessness
def _tiny_target(seed: int = 0) -> LlamaGenGPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=4, block_size=4, model_type="c2i", num_classes=3,
                    cls_token_num=1, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    model = LlamaGenGPT(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model


def exact_joint(model, prefix: Prefix, n: int, sampling: SamplingConfig, allowed=None) -> torch.Tensor:
    """P(x_1..x_n) of plain AR decoding, by enumerating every sequence (CFG, temperature, top-k/top-p, and the
    family's allowed-token mask ``allowed`` — static or per position — when given)."""
    v = model.config.vocab_size
    joint = torch.zeros([v] * n)
    t = prefix.length
    for seq in itertools.product(range(v), repeat=n):
        ids = torch.tensor(seq[:-1])[None].expand(prefix.rows, -1)
        emb = torch.cat([prefix.embeddings, model.embed_tokens(ids)], dim=1)
        valid = torch.cat([prefix.valid, torch.ones(prefix.rows, n - 1, dtype=torch.bool)], dim=1)
        with torch.no_grad():
            h = model.forward_hidden(emb, torch.arange(t + n - 1), attn_mask=prefix_attention_mask(valid))
            logits = apply_allowed_tokens(cfg_combine(model.lm_head(h[:, t - 1 :]).float(), prefix.cfg_scale), allowed,
                                          torch.arange(n))
            probs = target_probs(logits, sampling)[0]
        joint[seq] = torch.prod(probs[torch.arange(n), torch.tensor(seq)])
    return joint


def _empirical(dec: SpeculativeDecoder, prefix: Prefix, n: int, samples: int, seed: int) -> torch.Tensor:
    """Counts of the first n tokens over ``samples`` sequences; a batched prefix contributes every prompt's
    (each prompt with its own random stream, as generate_images runs them)."""
    v = dec.target.config.vocab_size
    counts = torch.zeros([v] * n)
    batch = prefix.batch_size
    gen = torch.Generator().manual_seed(seed) if batch == 1 else [
        torch.Generator().manual_seed(seed + 1000 * b) for b in range(batch)]
    for _ in range(samples // batch):
        tokens, _ = dec.generate(prefix, gen)
        for row in tokens[:, :n].tolist():
            counts[tuple(row)] += 1
    return counts


def _assert_matches(counts: torch.Tensor, joint: torch.Tensor) -> None:
    """Chi-square goodness of fit; cells expected below 5 are pooled into one so the test stays valid."""
    p = joint.flatten().double()
    c = counts.flatten().double()
    assert c[p == 0].sum() == 0, "a sequence of probability 0 was generated"
    n = c.sum()
    big = p * n >= 5
    obs = torch.cat([c[big], c[~big].sum().view(1)])
    exp = torch.cat([p[big], p[~big].sum().view(1)]) * n
    keep = exp > 0
    stat = chisquare(obs[keep].numpy(), exp[keep].numpy() * (n / exp[keep].sum()).item())
    assert stat.pvalue > 1e-3, f"chi-square p = {stat.pvalue:.2e}"


SAMPLERS = {
    "t1": SamplingConfig(temperature=1.0),
    "topk_topp": SamplingConfig(temperature=0.9, top_k=3, top_p=0.9),
}
CHAIN = TreeConfig(static_choices=((0,), (0, 0), (0, 0, 0)))


TINY_TREES = {
    "dynamic": TreeConfig(top_k_draft=2, depth=3, total_token=8),
    "static": TreeConfig(static_choices=((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))),
    "chain": CHAIN,
}
CASES = [(t, s) for t in TINY_TREES for s in SAMPLERS]


def _check_lossless(tree: str, sampler: str, samples: int, batch: int = 1) -> None:
    """``batch`` > 1: the same prompt B times per call, each with its own stream; every row is a sample."""
    target = _tiny_target()
    prefix = _prefix(target, torch.tensor([1] * batch), torch.ones(batch, 1, dtype=torch.bool), 2.0)
    sampling = SAMPLERS[sampler]
    dec = SpeculativeDecoder(target, _random_drafter(target, seed=3), 4, sampling, 2.0, tree=TINY_TREES[tree])
    _assert_matches(_empirical(dec, prefix, 3, samples, seed=11), exact_joint(target, prefix, 3, sampling))


@pytest.mark.parametrize("tree,sampler", CASES)
def test_speculative_sampling_is_lossless(tree, sampler):
    """Relaxation off, CFG on: the joint of the first three tokens equals plain AR's exact distribution."""
    _check_lossless(tree, sampler, 1500)


@pytest.mark.parametrize("tree", list(TINY_TREES))
def test_batched_speculative_sampling_is_lossless(tree):
    """Batch of 3 prompts per call (one target forward verifies all three trees): still AR's exact joint."""
    _check_lossless(tree, "t1", 1500, batch=3)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("tree,sampler", CASES)
def test_speculative_sampling_is_lossless_many_samples(tree, sampler, batch):
    """The same with 10,000 samples (more power against small biases), alone and in batches of 3."""
    _check_lossless(tree, sampler, 10000, batch)


def test_oracle_sampling_is_lossless_and_fast():
    """Drafts from the target itself: most drafts accepted, distribution still exact."""
    target = _tiny_target()
    cond = torch.tensor([2])
    prefix = _prefix(target, cond, torch.ones(1, 1, dtype=torch.bool), 2.0)
    sampling = SAMPLERS["t1"]
    dec = SpeculativeDecoder(target, OracleDrafter(target, prefix.embeddings), 4, sampling, 2.0,
                             tree=TreeConfig(static_choices=((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))))
    joint = exact_joint(target, prefix, 3, sampling)
    counts = _empirical(dec, prefix, 3, 1500, seed=5)
    _assert_matches(counts, joint)


def test_relaxed_decoding_runs_and_accepts_more():
    """LANTERN on a tiny model: τ rises over exact decoding with the same drafter (same seed, same prompts)."""
    target = _tiny_target()
    cond = torch.tensor([0])
    prefix = _prefix(target, cond, torch.ones(1, 1, dtype=torch.bool), 2.0)
    neighbours = torch.tensor([[1, 2, 3], [0, 2, 3], [3, 1, 0], [2, 0, 1]])
    drafter = _random_drafter(target, seed=3)
    taus = {}
    for name, acc in {"exact": AcceptConfig(), "lantern": AcceptConfig(relax="lantern", k=2, delta=0.3)}.items():
        dec = SpeculativeDecoder(target, drafter, 4, SamplingConfig(), 2.0, accept=acc,
                                 tree=TreeConfig(top_k_draft=2, depth=3, total_token=8), neighbours=neighbours)
        gen = torch.Generator().manual_seed(0)
        taus[name] = sum(dec.generate(prefix, gen)[1].extra["step_compression"] for _ in range(200)) / 200
    assert taus["lantern"] > taus["exact"]


def test_decoder_rejects_bad_configuration():
    target = _tiny_target()
    drafter = _random_drafter(target, 0)
    with pytest.raises(ValueError, match="neighbour table"):
        SpeculativeDecoder(target, drafter, 4, SamplingConfig(), 2.0, accept=AcceptConfig(relax="lantern", k=2, delta=0.1))
    with pytest.raises(ValueError, match="drafter_top_k"):
        SpeculativeDecoder(target, drafter, 4, SamplingConfig(), 2.0, tree=TreeConfig(static_choices=MC_SIM, drafter_top_k=2))
