"""Speculative Jacobi Decoding on the Chameleon family (Anole, Lumina-mGPT): greedy SJD / MC-SJD == greedy AR in
both CFG layouts, and chi-square losslessness with CFG and a forced (Lumina-style newline) token."""

from __future__ import annotations

import pytest
import torch
from test_chameleon_family import GREEDY, assert_forced_token_lossless, ckpts, family, forced_token_case  # noqa: F401 (fixture)

from models.drafters.jacobi import JacobiProposer
from models.ea_model import SpeculativeDecoder
from models.generation import generate_ar


@pytest.mark.parametrize("model", ["anole", "lumina_mgpt"])
@pytest.mark.parametrize("cfg_mode", ["parallel", "sequential"])
def test_greedy_sjd_equals_greedy_ar(ckpts, model, cfg_mode):  # noqa: F811
    fam = family(ckpts, model, cfg_mode)
    prefix = fam.build_prefix(["a red cat", "the blue dog on a photo"], 3.0)
    ar, _ = generate_ar(fam.target, prefix, fam.num_image_tokens, GREEDY, None, fam.allowed_tokens)
    for coupling in (False, True):
        dec = SpeculativeDecoder(fam.target, None, fam.num_image_tokens, GREEDY, 3.0, allowed_tokens=fam.allowed_tokens,
                                 proposer=JacobiProposer(6, coupling))
        tokens, _ = dec.generate(prefix)
        assert torch.equal(tokens, ar)
        fam.tokens_to_codes(tokens)  # Lumina: raises unless every newline / end token is in place


@pytest.mark.parametrize("coupling", [False, True], ids=["sjd", "mc-sjd"])
def test_sjd_with_cfg_and_forced_token_is_lossless(coupling):
    case = forced_token_case()
    target, _, allowed, sampling = case
    dec = SpeculativeDecoder(target, None, 3, sampling, 2.0, allowed_tokens=allowed,
                             proposer=JacobiProposer(2, coupling))
    assert_forced_token_lossless(dec, case)


@pytest.mark.parametrize("model", ["anole", "lumina_mgpt"])
def test_generate_images_sjd_command_line(ckpts, model, tmp_path):  # noqa: F811
    """``--model_type sjd`` (plain, MC-SJD, GSD, LANTERN) on tiny checkpoints in the real formats: forced tokens
    stay in place and neighbours are mapped to Chameleon token ids."""
    import json

    import numpy as np

    from entrypoints.generate_images import main

    p = ckpts[model]
    runs = {"sjd": [], "mc": ["--sjd_coupling"], "gsd": ["--gsd", "--gsd_dist", "1e9", "--gsd_prob_gap", "1"],
            "lantern": ["--lantern_tvd", "0.2", "--lantern_k", "8"]}
    for name, flags in runs.items():
        out = tmp_path / name
        main(["--model", model, "--model_type", "sjd", "--sjd_window", "5", *flags, "--model_path", str(p["model"]),
              "--vq_path", str(p["vq"]), "--codebook_path", str(p["codebook"]), "--image_size", "8", "--prompt",
              "a red cat", "--num_images", "2", "--output_dir", str(out), "--device", "cpu", "--set_seed",
              "--save_tokens"])
        stats = json.loads((out / "global_statistics_0_2.json").read_text())
        assert stats["prompt_0"]["step_compression"] >= 1.0
        tokens = np.load(out / "prompt_0_tokens.npy")
        if model == "lumina_mgpt":
            assert tokens[4::5][:4].tolist() == [8803] * 4 and int(tokens[-1]) == 8196
        else:
            assert bool(((tokens >= 4) & (tokens <= 8195)).all())
