"""``--tree auto``: pick the static draft tree (or chain length) that maximises expected tokens per second.

Why: the best tree depends on two things that change from machine to machine and model to model — what a
round costs here (a verification forward over n nodes, the drafter's levels, the round's fixed overhead) and how
far drafts get accepted (model, drafter, acceptance rule). Neither can be fixed in advance, so both are measured.

**Cost** (:meth:`AutoTreeDecoder.calibrate`, once at the start): every candidate decodes the calibration prompts
``1 + repeats`` times, candidates interleaved in a rotated order so that a change of machine load hits all alike;
the first pass is warm-up (and, with ``--compile``, the compilation of that tree size). Every round is timed
directly — drafter catch-up, tree building, target forward, verification and commit as the engine runs them —
rather than composed from ``benchmark --verify_cost``'s per-node forward cost alone, because on small models the
drafter's levels and the fixed per-round overhead dominate and a verify-only model would miss them. A
candidate's cost ``round_s`` is its median round (robust to the load spikes of a shared machine), ``setup_s``
(prefill, caches) the median time outside the loop. For the report the medians are also decomposed as
``round_s ≈ c0 + c1 · nodes + c2 · depth`` (:func:`fit_round_cost`: per-round overhead, target cost per verified
node, drafter cost per level); the choice uses the measured medians, since costs need not be linear in the tree
size (on a GPU a forward costs about the same up to some node count).

**Acceptance** (:class:`AcceptanceStats`): for every verified round and every prompt, each sibling test along
the walked path is counted by (depth d, sibling rank r): the children of a node are tested in rank order until
one is accepted, so ranks < r were rejected and r accepted, or all were rejected. The estimate
``a(d, r) = P(rank r accepted | the path reached depth d − 1, ranks < r rejected)`` is the count ratio shrunk
towards a prior with ``prior_weight`` pseudo-tests: ``a(1, 0)`` towards 0.5, ``a(d, 0)`` towards ``a(d − 1, 0)``
(a depth never drafted so far is assumed as good as the one before it), ``a(d, r)`` towards ``a(d, r − 1) / 2``.
The counts start from the calibration runs (the prior) and grow with every image. This is rule-agnostic: it
holds for exact, LANTERN δ, LANTERN++ λ and greedy verification alike, and it assumes a test's outcome depends on
(depth, rank) only — not on which rank the parent was (stated as the model's approximation).

**Expected tokens per round** of a static tree (:func:`expected_tokens`): with ``V(i)`` the expected number of
drafts accepted below node i, ``V(i) = Σ_r Π_{s<r} (1 − a(d+1, s)) · a(d+1, r) · (1 + V(child_r))`` over i's
children in rank order, and ``E = 1 + V(root)`` (one token more: the target's own sample at the end). For a chain
of L drafts this is ``1 + Σ_{d=1..L} Π_{j≤d} a_j`` (:func:`expected_tokens_chain`).

**Choice** (:func:`choose`): an image of N tokens costs ``setup_s + (N − 1) / E · round_s``; the candidate with
the most tokens per second is used for the next image (batch). It is re-picked after every generate call
(switching only when the new best is ``switch_margin`` = 3 % better, so near-ties do not flip back and forth),
printed when it changes, and every image's statistics record the tree it used.

With ``--compile`` each tree size is one compiled graph (compiled in the calibration's warm-up pass); dynamo's
recompile limit is raised to the number of candidate sizes so that none of them falls back to eager.

Candidates: chains of 1..8 drafts and the shipped static trees (``mc_sim_7b_63``, ``naive_extend_57``; among
chains nodes = depth + 1, so the two trees are what separates the per-node from the per-level cost in the fit). The dynamic EAGLE-2 tree is not
a candidate: its drafts are the drafter's top-k, not samples, so the sampled-draft statistics do not predict it.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from models.drafters.choices import get_tree_choices
from models.drafters.tree import StaticTreeTemplate

DEFAULT_CANDIDATES = tuple(f"chain_{n}" for n in range(1, 9)) + ("mc_sim_7b_63", "naive_extend_57")
START_TREE = "mc_sim_7b_63"  # the tree a not-yet-calibrated decoder holds (any candidate would do)


# ---------------------------------------------------------------------------------------------- expected tokens
def expected_tokens_chain(rates: Sequence[float]) -> float:
    """E[tokens per round] of a chain whose d-th draft is accepted with probability ``rates[d-1]`` given that
    the ones before it were: ``1 + Σ_d Π_{j≤d} a_j``."""
    total, reach = 1.0, 1.0
    for a in rates:
        reach *= a
        total += reach
    return total


def expected_tokens(template: StaticTreeTemplate, rate: Callable[[int, int], float]) -> float:
    """E[tokens per round] of a static tree under per-(depth, rank) conditional acceptance ``rate(d, r)``
    (d = depth of the child, 1-based; r = its sibling rank): ``1 + V(root)``, see the module docstring."""
    parents, depths, ranks = template.parents.tolist(), template.depths.tolist(), template.child_rank.tolist()
    n = len(parents)
    kids: list[list[int]] = [[] for _ in range(n)]
    for i in range(1, n):
        kids[parents[i]].append(i)
    value = [0.0] * n
    for i in sorted(range(n), key=lambda j: -depths[j]):  # children before parents
        reach, v = 1.0, 0.0
        for c in sorted(kids[i], key=lambda j: ranks[j]):
            a = rate(depths[c], ranks[c])
            v += reach * a * (1.0 + value[c])
            reach *= 1.0 - a
        value[i] = v
    return 1.0 + value[0]


@dataclass
class AcceptanceStats:
    """Sibling tests counted by (depth, rank), and the shrunk rate estimate (module docstring)."""

    prior_weight: float = 4.0
    tests: dict = field(default_factory=dict)  # (depth, rank) -> [accepted, attempted]

    def add(self, depth: int, rank: int, accepted: bool) -> None:
        c = self.tests.setdefault((depth, rank), [0, 0])
        c[0] += int(accepted)
        c[1] += 1

    def observe(self, template: StaticTreeTemplate, path: Sequence[int]) -> None:
        """One verified round of ``template``: ``path`` = node indices root..last accepted node. At each node
        of the path that has children, ranks 0..r were tested (r accepted, the path's next node) or all its
        children were tested and rejected (the path ends there)."""
        for d, node in enumerate(path):
            c = int(template.num_children[node])
            if c == 0:
                break
            accepted_rank = int(template.child_rank[path[d + 1]]) if d + 1 < len(path) else c
            for r in range(min(accepted_rank + 1, c)):
                self.add(d + 1, r, r == accepted_rank)

    def rate(self, depth: int, rank: int) -> float:
        if depth < 1 or rank < 0:
            raise ValueError(f"depth >= 1 and rank >= 0, got ({depth}, {rank})")
        if rank > 0:
            prior = 0.5 * self.rate(depth, rank - 1)
        else:
            prior = 0.5 if depth == 1 else self.rate(depth - 1, 0)
        acc, att = self.tests.get((depth, rank), (0, 0))
        return (acc + self.prior_weight * prior) / (att + self.prior_weight)

    def summary(self, max_depth: int = 8) -> list[float]:
        """Rank-0 rates by depth 1..max_depth (what a chain sees)."""
        return [round(self.rate(d, 0), 3) for d in range(1, max_depth + 1)]


# ---------------------------------------------------------------------------------------------- choice
@dataclass
class Candidate:
    name: str
    template: StaticTreeTemplate
    round_s: float | None = None  # measured loop time per round
    setup_s: float = 0.0  # measured time outside the loop (prefill, caches)

    @property
    def nodes(self) -> int:
        return self.template.num_nodes


def candidate(name: str) -> Candidate:
    return Candidate(name, StaticTreeTemplate.from_choices(get_tree_choices(name)))


def choose(candidates: Sequence[Candidate], stats: AcceptanceStats, num_tokens: int) -> list[dict]:
    """Every timed candidate scored: expected tokens per round and per second for an image of ``num_tokens``;
    best first."""
    rows = []
    for c in candidates:
        if c.round_s is None:
            continue
        e = expected_tokens(c.template, stats.rate)
        seconds = c.setup_s + (num_tokens - 1) / e * c.round_s
        rows.append({"tree": c.name, "nodes": c.nodes, "expected_tokens_per_round": e, "round_ms": 1000 * c.round_s,
                     "expected_image_s": seconds, "expected_tokens_per_s": num_tokens / seconds})
    if not rows:
        raise ValueError("no candidate has a measured round cost: calibrate first")
    return sorted(rows, key=lambda r: -r["expected_tokens_per_s"])


def fit_round_cost(points: Sequence[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least-squares ``round_s ≈ c0 + c1 · nodes + c2 · depth`` over (nodes, depth, seconds) measurements, every
    coefficient ≥ 0 (a negative one is dropped and the rest refitted): a fixed per-round overhead, the target's
    cost per verified node and the drafter's cost per tree level (the calibration's report of where a round's
    time goes); with fewer points than free coefficients the plain mean is the overhead."""
    active = [0, 1, 2]
    while True:
        if len(points) < len(active) or not active:
            return (statistics.mean(p[2] for p in points), 0.0, 0.0)
        x = torch.tensor([[(1.0, float(n), float(d))[j] for j in active] for n, d, _ in points], dtype=torch.float64)
        y = torch.tensor([[t] for _, _, t in points], dtype=torch.float64)
        sol = torch.linalg.lstsq(x, y).solution.flatten().tolist()
        neg = [j for j, v in zip(active, sol) if v < 0]
        if not neg:
            coef = [0.0, 0.0, 0.0]
            for j, v in zip(active, sol):
                coef[j] = v
            return (coef[0], coef[1], coef[2])
        active = [j for j in active if j != min(neg, key=lambda j: sol[active.index(j)])]


def round_cost(coef: tuple[float, float, float], nodes: int, depth: int) -> float:
    return coef[0] + coef[1] * nodes + coef[2] * depth


class _RoundClock:
    """A phase marker (the engine's ``profiler`` interface) that only times each round of the loop."""

    def __init__(self, device: torch.device):
        self.device, self.rounds = device, []  # seconds of every round, in order
        self.start = self._t = None

    def mark(self, name: str | None) -> None:
        if name != "drafter" and name is not None:
            return
        if name is None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self._t is not None:
            self.rounds.append(now - self._t)
        self.start = now if self.start is None else self.start
        self._t = now if name is not None else None

    @property
    def loop_s(self) -> float:
        return sum(self.rounds)


class AutoTreeDecoder:
    """A :class:`~models.ea_model.SpeculativeDecoder` on a static tree that it re-picks between generate calls.

    ``generate`` has the decoder's signature and results; each image's ``per_prompt`` statistics gain ``tree``
    (the tree it used) and ``stats.extra["auto_tree"]`` holds the choice with its scores. ``report()`` is the
    calibration and the history of choices (for the generation config / benchmark JSON).
    """

    def __init__(self, decoder, candidates: Sequence[str] = DEFAULT_CANDIDATES, repeats: int = 2,
                 prior_weight: float = 4.0, log: Callable[[str], None] | None = None, switch_margin: float = 0.03):
        if decoder.proposer is not None or decoder.template is None:
            raise ValueError("--tree auto picks a static tree: it needs an EAGLE drafter on a static tree")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.decoder, self.repeats, self.switch_margin = decoder, repeats, switch_margin
        self.candidates = [candidate(n) for n in candidates]
        self.stats = AcceptanceStats(prior_weight)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.choice: str | None = None
        self.scores: list[dict] = []
        self.history: list[dict] = []  # one entry per change of choice
        self.calibration: dict | None = None
        self._images = 0
        decoder.round_observer = self._observe
        target = decoder.target
        from models.compiled import CompiledTarget

        if isinstance(target, CompiledTarget):  # one graph per tree size: let dynamo keep them all
            import torch._dynamo.config as dconf

            need = len({c.nodes for c in self.candidates}) + 2
            if dconf.recompile_limit < need:
                dconf.recompile_limit = need

    # the engine's attributes the benchmark sets or reads (profiler, measure_shift, ...) are the decoder's
    def __getattr__(self, name):
        if name == "decoder":  # not set yet (during __init__ or unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.decoder, name)

    @property
    def profiler(self):
        return self.decoder.profiler

    @profiler.setter
    def profiler(self, value):
        self.decoder.profiler = value

    def _observe(self, trees, results) -> None:
        tmpl = self.decoder.template
        for res in results:
            self.stats.observe(tmpl, res.path.tolist())

    def _use(self, name: str) -> None:
        self.decoder.set_static_tree(get_tree_choices(name))

    def calibrate(self, prefix, generators_fn: Callable[[int], object]) -> dict:
        """Time a round of every candidate on ``prefix`` (see the module docstring); the runs' sibling tests
        become the acceptance prior. ``generators_fn(p)`` gives fresh generators for one generate call of pass
        p (other seeds per pass: more distinct rounds for the prior)."""
        dec = self.decoder
        saved = dec.profiler
        dev = prefix.embeddings.device
        rounds: dict[str, list[float]] = {c.name: [] for c in self.candidates}  # every timed round
        setups: list[float] = []
        t0 = time.perf_counter()
        try:
            for p in range(1 + self.repeats):
                k = len(self.candidates)
                for j in range(k):
                    c = self.candidates[(j + p) % k]
                    self._use(c.name)
                    clock = _RoundClock(dev)
                    dec.profiler = clock
                    _, st = dec.generate(prefix, generators_fn(p))
                    if p > 0:  # pass 0: warm-up / compilation
                        rounds[c.name] += clock.rounds
                        setups.append(st.latency - clock.loop_s)
        finally:
            dec.profiler = saved
        # the median round: a load spike on this shared machine hits a few rounds, not the estimate
        measured = {c.name: statistics.median(rounds[c.name]) for c in self.candidates}
        setup = statistics.median(setups)  # the same work for every tree
        coef = fit_round_cost([(c.nodes, c.template.max_depth, measured[c.name]) for c in self.candidates])
        for c in self.candidates:
            c.round_s, c.setup_s = measured[c.name], setup
        self.calibration = {
            "seconds": time.perf_counter() - t0, "repeats": self.repeats, "threads": torch.get_num_threads(),
            "measured_round_ms": {n: round(1000 * v, 3) for n, v in measured.items()},
            "round_cost_ms": {"per_round": 1000 * coef[0], "per_node": 1000 * coef[1], "per_level": 1000 * coef[2]},
            "fitted_round_ms": {c.name: round(1000 * round_cost(coef, c.nodes, c.template.max_depth), 3)
                                for c in self.candidates},
            "setup_ms": 1000 * setup,
            "prior_acceptance_rank0_by_depth": self.stats.summary(),
        }
        self._repick()
        return self.calibration

    def _repick(self) -> None:
        self.scores = choose(self.candidates, self.stats, self.decoder.num_tokens)
        best = self.scores[0]
        current = next((r for r in self.scores if r["tree"] == self.choice), None)
        if current is not None and current["expected_tokens_per_s"] >= (1 - self.switch_margin) * best["expected_tokens_per_s"]:
            best = current  # near-ties do not flip the tree back and forth (each change prints, and compiles once)
        if best["tree"] != self.choice:
            runner = self.scores[1] if len(self.scores) > 1 else None
            why = (f"E[tokens/round] {best['expected_tokens_per_round']:.2f}, round {best['round_ms']:.2f} ms -> "
                   f"{best['expected_tokens_per_s']:.0f} tokens/s")
            if runner is not None:
                why += (f"; next {runner['tree']}: {runner['expected_tokens_per_round']:.2f}, "
                        f"{runner['round_ms']:.2f} ms -> {runner['expected_tokens_per_s']:.0f} tokens/s")
            self.log(f"auto tree: {best['tree']} ({best['nodes']} nodes) after {self._images} image(s): {why}")
            self.history.append({"after_images": self._images, "tree": best["tree"], "why": why,
                                 "acceptance_rank0_by_depth": self.stats.summary()})
            self.choice = best["tree"]
        self._use(self.choice)

    def generate(self, prefix, generator=None):
        """The decoder's ``generate`` on the currently chosen tree, then learn and re-pick (calibrating first,
        on this prefix, if :meth:`calibrate` was not called)."""
        if self.calibration is None:
            self.calibrate(prefix, _fresh_like(generator))
        chosen = next(r for r in self.scores if r["tree"] == self.choice)
        tokens, st = self.decoder.generate(prefix, generator)
        for p in st.extra.get("per_prompt", []):
            p["tree"] = self.choice
        st.extra["auto_tree"] = {"tree": self.choice, "expected_tokens_per_round": chosen["expected_tokens_per_round"],
                                 "round_ms": chosen["round_ms"]}
        self._images += prefix.batch_size
        self._repick()
        return tokens, st

    def report(self) -> dict:
        return {"candidates": [c.name for c in self.candidates], "calibration": self.calibration,
                "choices": self.history, "final_scores": self.scores,
                "acceptance_rank0_by_depth": self.stats.summary()}


def _fresh_like(generator) -> Callable[[int], object]:
    """Generators for calibration pass p: fixed seeds, one per prompt like ``generator`` (left untouched)."""
    seed = 0x5EED

    if generator is None:
        return lambda p: None
    if isinstance(generator, torch.Generator):
        return lambda p: torch.Generator(device=generator.device).manual_seed(seed + p)
    return lambda p: [torch.Generator(device=g.device).manual_seed(seed + 1000 * p + i) for i, g in enumerate(generator)]


# ---------------------------------------------------------------------------------------------- command line
def add_tree_arg(parser) -> None:
    """``--tree auto`` (generate_images)."""
    parser.add_argument("--tree", default=None, choices=["auto"],
                        help="auto: pick the static tree / chain length with the most expected tokens/s from the "
                        "round cost measured here and the acceptance seen so far, re-picked between images "
                        "(implies --static_tree; README 'Automatic tree size')")


def check_tree_args(args, explicit_tree_choices: bool) -> None:
    """``--tree auto`` needs ``--model_type eagle`` and excludes an explicit ``--tree_choices``."""
    if getattr(args, "tree", None) != "auto":
        return
    from entrypoints.common import UserError

    if explicit_tree_choices:
        raise UserError("--tree auto picks the tree itself: drop --tree_choices (or drop --tree auto to use yours)")
    if args.model_type != "eagle":
        raise UserError(f"--tree auto picks an EAGLE draft tree: use --model_type eagle, not {args.model_type}")
    args.static_tree = True  # candidates are static trees of sampled drafts


def auto_tree_for_run(decoder, family, prompts: list[str], cfg_scale: float, repeats: int = 2) -> AutoTreeDecoder:
    """Wrap ``decoder`` and calibrate it on the run's first batch of ``prompts`` (round costs depend on the batch
    size) before the first image; the calibration goes in the generation config."""
    auto = AutoTreeDecoder(decoder, repeats=repeats)
    dev = family.device
    auto.calibrate(family.build_prefix(prompts, cfg_scale), _fresh_like([torch.Generator(device=dev)] * len(prompts)))
    return auto
