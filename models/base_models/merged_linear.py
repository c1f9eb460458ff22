"""Several linear layers that read the same input, computed as one matrix product.

A decoder layer's q/k/v projections, or its gate and up projections, all multiply the same activations. Doing
them as one product over the concatenated weight gives the same numbers (each output column is still its own
dot product) in one kernel instead of two or three: at the few rows a decoding step or a speculative round
carries, a product costs mostly its call, so a drafter step goes from 9 products to 6 and a LlamaGen layer from
5 to 4 (the demo's AR step: 31 → 25; measured by ``benchmark``'s matrix-product column).

Checkpoints keep the separate layers' names: :func:`merge_linears` stores one ``weight`` [Σ out, in] under the
merged name and registers hooks on the parent module so that ``state_dict()`` writes, and ``load_state_dict()``
reads, the original keys (``q_proj.weight``, ``k_proj.weight`` ...). Files written before and after the merge
are the same files.
"""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """One linear layer whose output is split into the parts it stands for (``forward`` returns a tuple)."""

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = dict(parts)
        self.sizes = list(parts.values())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(super().forward(x).split(self.sizes, dim=-1))

    def fused(self, x: torch.Tensor, first: int) -> tuple[torch.Tensor, ...]:
        """The output with its first ``first`` parts kept together (one tensor), then the rest one by one: e.g.
        q and k as one block for a joint rotation, then v."""
        return tuple(super().forward(x).split([sum(self.sizes[:first])] + self.sizes[first:], dim=-1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parts={self.parts}"


def merge_linears(parent: nn.Module, name: str, in_features: int, parts: dict[str, int],
                  bias: bool = False) -> MergedLinear:
    """Give ``parent`` a :class:`MergedLinear` ``name`` standing for the linears ``parts`` (name → out features)
    and make its state dict use the parts' keys. Returns the merged layer (also set as ``parent.<name>``)."""
    merged = MergedLinear(in_features, parts, bias)
    setattr(parent, name, merged)
    tensors = ("weight", "bias") if bias else ("weight",)

    def to_parts(module, state_dict, prefix, local_metadata):
        chunks = {t: state_dict[f"{prefix}{name}.{t}"].split(merged.sizes, dim=0) for t in tensors}
        items = list(state_dict.items())
        state_dict.clear()
        for key, value in items:  # the parts take the merged layer's place: the keys keep the original order
            if key == f"{prefix}{name}.weight":
                for i, part in enumerate(parts):  # part.weight, part.bias, next part ... as nn.Linear writes
                    for t in tensors:
                        state_dict[f"{prefix}{part}.{t}"] = chunks[t][i].clone()  # own storage (safetensors)
            elif key != f"{prefix}{name}.bias":
                state_dict[key] = value

    def from_parts(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for t in tensors:
            keys = [f"{prefix}{part}.{t}" for part in parts]
            if all(k in state_dict for k in keys):  # otherwise the strict check reports the merged key missing
                state_dict[f"{prefix}{name}.{t}"] = torch.cat([state_dict.pop(k) for k in keys], dim=0)

    parent.register_state_dict_post_hook(to_parts)
    parent.register_load_state_dict_pre_hook(from_parts)
    return merged
