"""Static draft-tree shapes ("tree choices") for EAGLE-1 style static trees (LANTERN++).

A tree is a list of *paths*; each path lists child ranks from the root: ``[0]`` is the drafter's first
(highest-ranked / first-sampled) child of the root, ``[0, 1]`` the second child of that node, and so on.
The root itself (the last committed token) is implicit. A valid list contains every path's prefix and,
among the children of one node, the ranks ``0 .. c-1`` without gaps.

``mc_sim_7b_63`` (25 nodes) and ``naive_extend_57`` (57 nodes) are the lists the original LANTERN code ships.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

__all__ = [
    "mc_sim_7b_63",
    "naive_extend_57",
    "TREE_CHOICES",
    "chain_N",
    "get_tree_choices",
    "validate_tree_choices",
]

mc_sim_7b_63: list[list[int]] = [
    [0], [1], [2], [3],
    [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [2, 1], [3, 0],
    [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 2, 0], [0, 2, 1], [1, 0, 0],
    [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2],
    [0, 0, 0, 0, 0], [0, 0, 0, 0, 1],
]  # fmt: skip

naive_extend_57: list[list[int]] = [
    [0], [1], [2], [3], [4],
    [0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [2, 2], [3, 0], [3, 1], [4, 0],
    [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 1, 0], [0, 1, 1], [0, 1, 2], [0, 2, 0], [0, 2, 1], [0, 2, 2],
    [0, 3, 0], [0, 3, 1], [1, 0, 0], [1, 0, 1], [1, 1, 0], [2, 0, 0],
    [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 3], [0, 0, 1, 0], [0, 0, 1, 1], [0, 0, 1, 2],
    [0, 0, 2, 0], [0, 0, 2, 1], [0, 0, 3, 0], [0, 1, 0, 0], [0, 1, 0, 1], [0, 1, 1, 0], [0, 2, 0, 0],
    [0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1], [0, 0, 1, 0, 0],
    [0, 0, 1, 0, 1], [0, 0, 1, 1, 0], [0, 0, 2, 0, 0],
]  # fmt: skip

TREE_CHOICES: dict[str, list[list[int]]] = {
    "mc_sim_7b_63": mc_sim_7b_63,
    "naive_extend_57": naive_extend_57,
}


def chain_N(n: int) -> list[list[int]]:
    """A chain of ``n`` drafted tokens: ``[[0], [0, 0], ..., [0]*n]`` (plain speculative decoding)."""
    if n < 1:
        raise ValueError(f"chain length must be >= 1, got {n}")
    return [[0] * d for d in range(1, n + 1)]


def validate_tree_choices(choices: Sequence[Sequence[int]]) -> list[list[int]]:
    """Check a choice list and return it as a list of int lists (order preserved).

    Raises ``ValueError`` when a path is empty, has a negative or non-integer rank, is duplicated, misses its
    parent path, or when sibling ranks are not contiguous from 0.
    """
    if not isinstance(choices, Sequence) or isinstance(choices, str) or len(choices) == 0:
        raise ValueError("tree choices must be a non-empty list of paths, e.g. [[0], [1], [0, 0]]")
    paths: list[list[int]] = []
    for path in choices:
        if not isinstance(path, Sequence) or isinstance(path, str) or len(path) == 0:
            raise ValueError(f"each tree path must be a non-empty list of child ranks, got {path!r}")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in path):
            raise ValueError(f"tree path {list(path)!r} must contain non-negative integers only")
        paths.append([int(r) for r in path])
    seen = {tuple(p) for p in paths}
    if len(seen) != len(paths):
        raise ValueError("tree choices contain duplicate paths")
    for p in paths:
        if len(p) > 1 and tuple(p[:-1]) not in seen:
            raise ValueError(f"tree path {p} has no parent path {p[:-1]} in the list")
        if p[-1] > 0 and tuple(p[:-1] + [p[-1] - 1]) not in seen:
            raise ValueError(
                f"tree path {p}: sibling ranks must be contiguous from 0, but {p[:-1] + [p[-1] - 1]} is missing"
            )
    return paths


def get_tree_choices(name_or_json: str | Sequence[Sequence[int]]) -> list[list[int]]:
    """Resolve a tree-choice specification to a validated list of paths.

    Accepts a known name (``"mc_sim_7b_63"``, ``"naive_extend_57"``), ``"chain_<n>"`` (a chain of n drafts),
    a JSON string of a list of paths (as given on the command line, e.g. ``"[[0],[1],[0,0]]"``), or an
    already-parsed list. Raises ``ValueError`` with the reason when it is none of these or invalid.
    """
    if isinstance(name_or_json, str):
        spec = name_or_json.strip()
        if spec in TREE_CHOICES:
            return [list(p) for p in TREE_CHOICES[spec]]
        if spec.startswith("chain_"):
            try:
                n = int(spec[len("chain_") :])
            except ValueError:
                raise ValueError(f"bad chain spec {spec!r}; expected chain_<n>") from None
            return chain_N(n)
        try:
            parsed = json.loads(spec)
        except json.JSONDecodeError:
            known = ", ".join(sorted(TREE_CHOICES)) + ", chain_<n>"
            raise ValueError(
                f"unknown tree choices {spec!r}: not a known name ({known}) and not a JSON list of paths"
            ) from None
        return validate_tree_choices(parsed)
    return validate_tree_choices(name_or_json)
