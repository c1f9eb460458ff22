"""Linears over the same input computed as one product (models/base_models/merged_linear.py): the same outputs
as the separate layers, and checkpoints that keep the separate layers' keys, order and tensors."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.base_models.llamagen.gpt import FeedForward, GPTConfig
from models.base_models.merged_linear import MergedLinear, merge_linears
from models.drafters.cnets import DrafterConfig, EagleDrafter


class Separate(nn.Module):
    """The layout before the merge: q, k, v as three layers (with biases), then an unrelated one."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 6)
        self.k = nn.Linear(8, 4)
        self.v = nn.Linear(8, 4)
        self.o = nn.Linear(6, 8)


class Merged(nn.Module):
    def __init__(self):
        super().__init__()
        merge_linears(self, "qkv", 8, {"q": 6, "k": 4, "v": 4}, bias=True)
        self.o = nn.Linear(6, 8)


def test_merged_outputs_equal_the_separate_layers():
    torch.manual_seed(0)
    ref, merged = Separate(), Merged()
    merged.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 8)
    q, k, v = merged.qkv(x)
    for got, layer in ((q, ref.q), (k, ref.k), (v, ref.v)):
        torch.testing.assert_close(got, layer(x), rtol=1e-6, atol=1e-6)
    assert isinstance(merged.qkv, MergedLinear) and merged.qkv.weight.shape == (14, 8)


def test_state_dict_keeps_the_parts_keys_order_and_tensors(tmp_path):
    torch.manual_seed(1)
    ref, merged = Separate(), Merged()
    merged.load_state_dict(ref.state_dict())
    ours, theirs = merged.state_dict(), ref.state_dict()
    assert list(ours) == list(theirs)  # q, k, v (weight, bias) where they were, then o
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    save_file(ours, str(tmp_path / "m.safetensors"))  # every part has its own storage
    back = Merged()
    back.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    assert torch.equal(back.qkv.weight, merged.qkv.weight) and torch.equal(back.qkv.bias, merged.qkv.bias)
    # a state dict of the merged model alone does not alias its parameters: editing it changes nothing
    ours["q.weight"].zero_()
    assert not torch.equal(merged.qkv.weight[:6], torch.zeros(6, 8))


def test_a_missing_part_is_reported():
    sd = Separate().state_dict()
    del sd["v.weight"]
    with pytest.raises(RuntimeError, match="qkv.weight"):
        Merged().load_state_dict(sd)


def test_real_layers_keep_their_checkpoint_names():
    ffn = FeedForward(GPTConfig(dim=32, n_layer=1, n_head=2, multiple_of=8))
    assert [k for k in ffn.state_dict()] == ["w1.weight", "w3.weight", "w2.weight"]
    drafter = EagleDrafter(DrafterConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                         vocab_size=16, block_size=16, cls_token_num=1))
    keys = [k for k in drafter.state_dict() if k.startswith("layers.0.")]
    assert keys == ["layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
                    "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight",
                    "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight",
                    "layers.0.mlp.down_proj.weight", "layers.0.post_attention_layernorm.weight"]
