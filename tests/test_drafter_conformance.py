"""The EAGLE drafter reproduces LANTERN's llamagen drafter (conformance fixture) and loads its released format."""

from __future__ import annotations

import json

import torch
from conftest import conformance_dir, load_io, manifest_entries, read_json

from models.drafters.cnets import DrafterConfig, EagleDrafter, load_drafter, save_drafter


def test_llamagen_drafter_outputs_and_rope_table():
    d = conformance_dir("lantern_drafter")
    model = EagleDrafter(DrafterConfig.from_dict(read_json(d / "config_llamagen_t2i.json"))).eval()
    model.load_state_dict(load_io(d / "weights_llamagen_t2i.safetensors"), strict=True)
    io = load_io(d / "io_llamagen_t2i.safetensors")
    assert torch.equal(model.freqs_cis[:160], io["freqs_cis_used"])
    with torch.no_grad():
        out = model(io["hidden_states"], io["input_ids"])
    assert (out - io["output_hidden_states"]).abs().max() <= 1e-4


def test_llamagen_drafter_with_cache_matches_full_call():
    d = conformance_dir("lantern_drafter")
    model = EagleDrafter(DrafterConfig.from_dict(read_json(d / "config_llamagen_t2i.json"))).eval()
    model.load_state_dict(load_io(d / "weights_llamagen_t2i.safetensors"))
    io = load_io(d / "io_llamagen_t2i.safetensors")
    h, ids = io["hidden_states"], io["input_ids"]
    cache = model.new_cache(2, 200)
    outs = []
    with torch.no_grad():
        for a, b in [(0, 150), (150, 151), (151, 160)]:
            pos = torch.arange(a, b)
            mask = torch.ones(b - a, b, dtype=torch.bool).tril(a)[None, None]
            outs.append(model(h[:, a:b], ids[:, a:b], pos, cache, pos, mask))
    assert (torch.cat(outs, 1) - io["output_hidden_states"]).abs().max() <= 1e-4


def test_released_folder_format_loads(tmp_path):
    """config.json as LANTERN ships it + pytorch_model.bin, strict names; save_drafter round-trips."""
    d = conformance_dir("lantern_drafter")
    folder = tmp_path / "llamagen_drafter"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(read_json(d / "config_llamagen_t2i.json")["config_json"]))
    torch.save(load_io(d / "weights_llamagen_t2i.safetensors"), folder / "pytorch_model.bin")
    model = load_drafter(folder)
    assert model.config.block_size == 256 and model.config.cls_token_num == 120
    io = load_io(d / "io_llamagen_t2i.safetensors")
    with torch.no_grad():
        assert (model(io["hidden_states"], io["input_ids"]) - io["output_hidden_states"]).abs().max() <= 1e-4
    save_drafter(model, tmp_path / "ours")
    again = load_drafter(tmp_path / "ours")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_full_size_manifest():
    d = conformance_dir("lantern_drafter")
    cfg = DrafterConfig.from_dict({"hidden_size": 1280, "intermediate_size": 3584, "num_attention_heads": 20,
                                   "num_key_value_heads": 20, "vocab_size": 16384, "num_hidden_layers": 1,
                                   "input_type": "t2i"})
    with torch.device("meta"):
        model = EagleDrafter(cfg)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == manifest_entries(d / "manifest_llamagen_t2i_drafter.json")
