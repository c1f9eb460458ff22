"""LANTERN's Anole drafter (``jadohu/anole_drafter`` format) reproduces the reference outputs and manifest."""

from __future__ import annotations

import torch
from conftest import conformance_dir, load_io, manifest_entries, read_json

from models.drafters.cnets import DrafterConfig, EagleDrafter, load_drafter


def test_anole_drafter_reproduces_reference(tmp_path):
    d = conformance_dir("lantern_drafter")
    folder = tmp_path / "anole_drafter"
    folder.mkdir()
    (folder / "config.json").write_text(__import__("json").dumps(read_json(d / "config_anole.json")["config_json"]))
    torch.save(load_io(d / "weights_anole.safetensors"), folder / "pytorch_model.bin")
    model = load_drafter(folder)
    assert model.config.family == "chameleon"
    io = load_io(d / "io_anole.safetensors")
    with torch.no_grad():
        out = model(io["hidden_states"], io["input_ids"])
    assert float((out - io["output_hidden_states"]).abs().max()) < 1e-4
    # the engine's cached call (explicit positions, boolean causal mask) gives the same features
    with torch.no_grad():
        cache = model.new_cache(2, 32)
        n = io["input_ids"].shape[1]
        mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        pos = torch.arange(n)
        out2 = model(io["hidden_states"], io["input_ids"], pos, cache, pos, mask)
    assert float((out2 - io["output_hidden_states"]).abs().max()) < 1e-4


def test_anole_drafter_manifest():
    d = conformance_dir("lantern_drafter")
    cfg = DrafterConfig.from_dict({"model_type": "chameleon", "hidden_size": 4096, "intermediate_size": 11008,
                                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 65536,
                                   "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0})
    with torch.device("meta"):
        model = EagleDrafter(cfg)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == manifest_entries(d / "manifest_anole_drafter.json")  # same names, shapes and order


def test_lumina_layout_drafter_norm_rows_load(tmp_path):
    """A drafter whose q/k-norm rows are per shard ([1, head_dim], Lumina's layout) loads and repeats them."""
    from models.drafters.cnets import save_drafter

    cfg = DrafterConfig(family="chameleon", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                        vocab_size=16, block_size=0, cls_token_num=0, qk_norm_rows=1)
    model = EagleDrafter(cfg)
    assert model.layers[0].self_attn.q_norm.weight.shape == (1, 8)
    save_drafter(model, tmp_path / "d")
    raw = read_json(tmp_path / "d" / "config.json")
    raw.pop("qk_norm_rows")
    (tmp_path / "d" / "config.json").write_text(__import__("json").dumps(raw))
    loaded = load_drafter(tmp_path / "d")
    assert loaded.config.qk_norm_rows == 1
    x, ids = torch.randn(1, 5, 32), torch.randint(0, 16, (1, 5))
    with torch.no_grad():
        assert torch.allclose(loaded(x, ids), model(x, ids))
