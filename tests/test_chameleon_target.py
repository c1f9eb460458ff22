"""Our Chameleon target agrees with transformers' Chameleon classes; both real layouts load; manifests match."""

from __future__ import annotations

import json

import pytest
import torch
from chameleon_fixtures import hf_config, write_anole_folder, write_lumina_folder
from conftest import conformance_dir, manifest_entries, read_json

from models.base_models.chameleon.loading import load_chameleon_target
from models.base_models.chameleon.model import ChameleonCausalLM, ChameleonTargetConfig
from models.checkpoints import CheckpointError
from models.generation import Prefix, prefill

TOL = 1e-4


def reference_outputs(hf, ids):
    with torch.no_grad():
        hidden = hf.model(input_ids=ids).last_hidden_state
        logits = hf.lm_head(hidden)
    return hidden, logits


def lumina_as_hf(ours: ChameleonCausalLM):
    """The transformers model holding the Lumina weights (each [1, D] norm row repeated over the heads)."""
    from transformers import ChameleonForConditionalGeneration

    hf = ChameleonForConditionalGeneration(hf_config()).eval()
    sd = ours.state_dict()
    heads = ours.config.num_attention_heads
    sd = {k: (v.repeat_interleave(heads, 0) if "_norm." in k and "self_attn" in k else v) for k, v in sd.items()}
    missing = hf.load_state_dict(sd, strict=False).missing_keys
    assert all(k.startswith("model.vqmodel.") for k in missing)
    return hf


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cham")
    anole_dir = write_anole_folder(root / "anole")
    lumina_dir = write_lumina_folder(root / "lumina")
    anole = load_chameleon_target(anole_dir)
    lumina = load_chameleon_target(lumina_dir)
    from transformers import ChameleonForConditionalGeneration

    return {"anole": (anole, ChameleonForConditionalGeneration.from_pretrained(anole_dir).eval()),
            "lumina": (lumina, lumina_as_hf(lumina))}


@pytest.mark.parametrize("layout", ["anole", "lumina"])
def test_full_sequence_hidden_states_and_logits(layouts, layout):
    ours, hf = layouts[layout]
    assert ours.config.qk_norm_rows == (4 if layout == "anole" else 1)
    ids = torch.randint(0, ours.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    ref_h, ref_l = reference_outputs(hf, ids)
    with torch.no_grad():
        h = ours.forward_hidden(ours.embed_tokens(ids), torch.arange(11))
    assert float((h - ref_h).abs().max()) < TOL
    assert float((ours.lm_head(h) - ref_l).abs().max()) < TOL


@pytest.mark.parametrize("layout", ["anole", "lumina"])
def test_cached_step_by_step_decoding(layouts, layout):
    """Prefill 5 tokens through the pre-allocated cache, then one token per call: equals the full causal pass."""
    ours, hf = layouts[layout]
    ids = torch.randint(0, ours.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    ref_h, ref_l = reference_outputs(hf, ids)
    with torch.no_grad():
        cache = ours.new_cache(2, 16)
        emb = ours.embed_tokens(ids)
        h0 = prefill(ours, Prefix(emb[:, :5], torch.ones(2, 5, dtype=torch.bool)), cache)
        steps = [h0]
        for i in range(5, 9):
            pos = torch.tensor([i])
            mask = torch.ones(2, 1, 1, i + 1, dtype=torch.bool)
            steps.append(ours.forward_hidden(emb[:, i : i + 1], pos, cache, pos, mask))
    h = torch.cat(steps, 1)
    assert float((h - ref_h).abs().max()) < TOL
    assert float((ours.lm_head(h) - ref_l).abs().max()) < TOL


def test_tree_mask_positions_match_separate_branches(layouts):
    """Two sibling tree nodes at the same position, each seeing only the prefix: equal to running each alone."""
    ours, _ = layouts["anole"]
    ids = torch.randint(0, ours.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = ours.new_cache(1, 12)
        prefill(ours, Prefix(ours.embed_tokens(ids[:, :4]), torch.ones(1, 4, dtype=torch.bool)), cache)
        tree = torch.tensor([[True, False], [False, True]])
        mask = torch.cat([torch.ones(2, 4, dtype=torch.bool), tree], 1)[None, None]
        both = ours.forward_hidden(ours.embed_tokens(ids[:, 4:6]), torch.tensor([4, 4]), cache, torch.tensor([4, 5]), mask)
        for j in range(2):
            alone = ours.forward_hidden(ours.embed_tokens(torch.cat([ids[:, :4], ids[:, 4 + j : 5 + j]], 1)), torch.arange(5))
            assert float((both[:, j] - alone[:, -1]).abs().max()) < TOL


@pytest.mark.parametrize("manifest,rows", [("manifest_transformers_5.24.0.json", 32),
                                           ("manifest_lantern_chameleon_modeling_chameleon.json", 1)])
def test_full_size_manifests_match_name_for_name(manifest, rows):
    d = conformance_dir("lumina_mgpt")
    m = read_json(d / manifest)
    cfg = ChameleonTargetConfig(vocab_size=65536, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, qk_norm_rows=rows, vq_config={})
    with torch.device("meta"):
        model = ChameleonCausalLM(cfg)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == manifest_entries(d / manifest)  # same names, shapes and order
    assert sum(v.numel() for v in model.state_dict().values()) == m["total_elements"]


def test_folder_errors_name_the_problem(tmp_path, layouts):
    with pytest.raises(CheckpointError, match="not found"):
        load_chameleon_target(tmp_path / "missing")
    folder = write_anole_folder(tmp_path / "broken")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (folder / first).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_chameleon_target(folder)


def test_loads_in_requested_dtype(tmp_path):
    folder = write_lumina_folder(tmp_path / "l")
    m = load_chameleon_target(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in m.parameters())
