"""Anole and Lumina-mGPT through the one engine: token layouts, forced tokens, CFG layouts, greedy identity,
losslessness by statistics, and the command line on tiny checkpoints in the real on-disk formats."""

from __future__ import annotations

import json

import pytest
import torch
from chameleon_fixtures import random_chameleon_drafter, randomise, write_chameleon_ckpts
from test_engine import _assert_matches, exact_joint

from models.base_models.chameleon.model import ChameleonCausalLM, ChameleonTargetConfig
from models.drafters.choices import get_tree_choices
from models.ea_model import SpeculativeDecoder, TreeConfig
from models.generation import Prefix, generate_ar
from models.registry import load_family
from models.sampling import SamplingConfig, target_probs
from models.token_masks import PositionalTokenMask, apply_allowed_tokens

IMAGE_SIZE = 8  # tiny VQGAN downsamples by 2: a 4x4 grid
GREEDY = SamplingConfig(temperature=0.0)
TREES = {"dynamic": TreeConfig(top_k_draft=3, depth=3, total_token=10),
         "static": TreeConfig(static_choices=tuple(tuple(c) for c in get_tree_choices("mc_sim_7b_63")))}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {m: write_chameleon_ckpts(root, m) for m in ("anole", "lumina_mgpt")}


def family(ckpts, model, cfg_mode="parallel"):
    p = ckpts[model]
    return load_family(model, "cpu", torch.float32, str(p["model"]), str(p["vq"]), image_size=IMAGE_SIZE,
                       cfg_mode=cfg_mode)


def test_token_layouts(ckpts):
    anole, lumina = family(ckpts, "anole"), family(ckpts, "lumina_mgpt")
    text = anole.text_ids("a red cat")
    assert len(text) == 3 and all(t >= 4 for t in text)  # tokenised with the checkpoint's own tokenizer file
    assert anole.prompt_ids("a red cat") == [0, *text, 8710, 8197]
    ids, valid = anole.prefix_ids(["a red cat", "dog"], 3.0)
    assert ids.shape == (4, 6) and ids[1, :1].tolist() == [1] and not bool(valid[1, 0])  # left-padded with id 1
    assert ids[2].tolist() == [1, 1, 1, 1, 0, 8197] and valid[2].sum() == 2  # uncond [0, 8197]
    g = 8804 + IMAGE_SIZE // 32
    assert lumina.prompt_ids("cat")[-4:] == [8710, 8197, g, g]
    assert lumina.uncond_ids() == [8197, g, g]
    assert lumina.text_ids("cat") == lumina.tokenizer.encode(
        f"Generate an image of {IMAGE_SIZE}x{IMAGE_SIZE} according to the following prompt:\ncat").ids
    assert anole.num_image_tokens == 16 and lumina.num_image_tokens == 4 * 5 + 1
    codes = torch.randint(0, 8192, (2, 16))
    for fam in (anole, lumina):
        assert torch.equal(fam.tokens_to_codes(fam.codes_to_tokens(codes)), codes)
    assert anole.codes_to_tokens(codes).min() >= 4 and anole.codes_to_tokens(codes).max() <= 8195


def test_positional_mask_forces_newline_and_end(ckpts):
    lumina = family(ckpts, "lumina_mgpt")
    m = lumina.allowed_tokens
    assert isinstance(m, PositionalTokenMask)
    forced = m.forced[0]
    assert forced.tolist() == ([False] * 4 + [True]) * 4 + [True]
    logits = torch.randn(1, 21, lumina.target.config.vocab_size)
    p = target_probs(apply_allowed_tokens(logits, m, torch.arange(21)), SamplingConfig())
    assert torch.allclose(p[0, 4, 8803], torch.tensor(1.0)) and torch.allclose(p[0, 20, 8196], torch.tensor(1.0))
    assert float(p[0, 0, 4:8196].sum()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("model", ["anole", "lumina_mgpt"])
@pytest.mark.parametrize("tree", list(TREES))
def test_greedy_speculative_equals_greedy_ar(ckpts, model, tree):
    fam = family(ckpts, model)
    drafter = random_chameleon_drafter(fam.target, seed=5)
    for prompt in ("a red cat", "the blue dog on a photo"):
        prefix = fam.build_prefix([prompt], 3.0)
        ar, _ = generate_ar(fam.target, prefix, fam.num_image_tokens, GREEDY, None, fam.allowed_tokens)
        dec = SpeculativeDecoder(fam.target, drafter, fam.num_image_tokens, GREEDY, 3.0, tree=TREES[tree],
                                 allowed_tokens=fam.allowed_tokens)
        spec, stats = dec.generate(prefix)
        assert torch.equal(spec, ar)
        fam.tokens_to_codes(spec)  # Lumina: raises unless every newline / end token is in place
        if model == "lumina_mgpt":
            assert stats.extra["step_compression_image"] <= stats.extra["step_compression"]


@pytest.mark.parametrize("model", ["anole", "lumina_mgpt"])
def test_sequential_cfg_equals_parallel(ckpts, model):
    """Two unpadded caches (the original's sequential mode) give the same logits as the padded batch."""
    par, seq = family(ckpts, model), family(ckpts, model, "sequential")
    seen = {}
    for name, fam in (("par", par), ("seq", seq)):
        logits: list[torch.Tensor] = []
        prefix = fam.build_prefix(["a red cat"], 3.0)
        tokens, _ = generate_ar(fam.target, prefix, fam.num_image_tokens, GREEDY, None, fam.allowed_tokens,
                                on_step=lambda i, lg, t, out=logits: out.append(lg.clone()))
        seen[name] = (tokens, torch.stack(logits))
    assert torch.equal(seen["par"][0], seen["seq"][0])
    finite = torch.isfinite(seen["par"][1])
    assert float((seen["par"][1][finite] - seen["seq"][1][finite]).abs().max()) < 1e-4
    drafter = random_chameleon_drafter(seq.target, seed=2)
    dec = SpeculativeDecoder(seq.target, drafter, seq.num_image_tokens, GREEDY, 3.0, tree=TREES["dynamic"],
                             allowed_tokens=seq.allowed_tokens)
    assert torch.equal(dec.generate(seq.build_prefix(["a red cat"], 3.0))[0], seen["par"][0])


# --------------------------------------------------------------------------------------------- losslessness
def _tiny_chameleon(seed=0) -> ChameleonCausalLM:
    torch.manual_seed(seed)
    m = ChameleonCausalLM(ChameleonTargetConfig(vocab_size=6, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                num_attention_heads=2)).eval()
    randomise(m, seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(3.0)  # less flat distributions: more cells with enough expected counts
    return m


def forced_token_case() -> tuple:
    """Tiny Chameleon target, CFG 2 with a padded (shorter) uncond prefix and a forced token at index 1 (a
    Lumina-style newline): (target, prefix, allowed-token mask, sampler)."""
    target = _tiny_chameleon()
    ids = torch.tensor([[0, 3, 2, 1], [5, 5, 0, 1]])  # uncond row left-padded (two padding slots)
    valid = torch.tensor([[True] * 4, [False, False, True, True]])
    prefix = Prefix(target.embed_tokens(ids), valid, 2.0, token_ids=ids)
    classes = torch.tensor([[True, True, True, True, False, False], [False, False, False, False, False, True]])
    return target, prefix, PositionalTokenMask(classes, torch.tensor([[0, 1, 0]])), SamplingConfig(temperature=1.0)


def assert_forced_token_lossless(dec: SpeculativeDecoder, case: tuple, samples: int = 1500) -> None:
    """The decoder's first three tokens on :func:`forced_token_case` follow plain AR's exact joint (chi-square)
    and the forced token is always in place."""
    target, prefix, allowed, sampling = case
    counts = torch.zeros([6] * 3)
    gen = torch.Generator().manual_seed(11)
    for _ in range(samples):
        tokens, _ = dec.generate(prefix, gen)
        assert int(tokens[0, 1]) == 5
        counts[tuple(tokens[0, :3].tolist())] += 1
    _assert_matches(counts, exact_joint(target, prefix, 3, sampling, allowed))


@pytest.mark.parametrize("tree", ["dynamic", pytest.param("static", marks=pytest.mark.slow)])
def test_speculative_sampling_with_cfg_and_forced_token_is_lossless(tree):
    """Exact speculative sampling, CFG 2 with a padded (shorter) uncond prefix and a forced token at index 1
    (a Lumina-style newline), reproduces plain AR's exact joint of the first three tokens (chi-square)."""
    case = forced_token_case()
    target, _, allowed, sampling = case
    trees = {"dynamic": TreeConfig(top_k_draft=2, depth=3, total_token=8),
             "static": TreeConfig(static_choices=((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))}
    dec = SpeculativeDecoder(target, random_chameleon_drafter(target, 3), 3, sampling, 2.0, tree=trees[tree],
                             allowed_tokens=allowed)
    assert_forced_token_lossless(dec, case)


# --------------------------------------------------------------------------------------------- command line
RUNS = {
    "base": ["--model_type", "base"],
    "exact": ["--model_type", "eagle"],
    "lantern": ["--model_type", "eagle", "--lantern", "--lantern_k", "8", "--lantern_delta", "0.2"],
    "lantern++": ["--model_type", "eagle", "--static_tree", "--tree_choices", "chain_3", "--lantern", "--lantern_k",
                  "8", "--lantern_delta", "3"],
}


@pytest.mark.parametrize("model", ["anole", "lumina_mgpt"])
def test_generate_images_command_line(ckpts, model, tmp_path):
    from PIL import Image

    from entrypoints.generate_images import main

    p = ckpts[model]
    for name, flags in RUNS.items():
        out = tmp_path / name
        main(["--model", model, *flags, "--model_path", str(p["model"]), "--vq_path", str(p["vq"]),
              "--drafter_path", str(p["drafter"]), "--codebook_path", str(p["codebook"]), "--image_size",
              str(IMAGE_SIZE), "--prompt", "a red cat", "--num_images", "2", "--output_dir", str(out), "--device",
              "cpu", "--set_seed", "--save_tokens", "--total_token", "10", "--depth", "3", "--top_k_draft", "3"])
        for i in range(2):
            assert Image.open(out / f"prompt_{i}.png").size == (IMAGE_SIZE, IMAGE_SIZE)
        stats = json.loads((out / "global_statistics_0_2.json").read_text())
        assert stats["prompt_0"]["step_compression"] >= 1.0
        import numpy as np

        tokens = torch.from_numpy(np.load(out / "prompt_0_tokens.npy"))[None]
        fam_tokens = tokens[0]
        if model == "lumina_mgpt":
            assert fam_tokens[4::5][:4].tolist() == [8803] * 4 and int(fam_tokens[-1]) == 8196
        else:
            assert bool(((fam_tokens >= 4) & (fam_tokens <= 8195)).all())


def test_missing_checkpoint_names_the_tree(tmp_path, capsys):
    from entrypoints.common import run_cli
    from entrypoints.generate_images import main

    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--model", "anole", "--model_path", str(tmp_path / "nope"), "--vq_path", str(tmp_path),
                       "--output_dir", str(tmp_path / "o"), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "vqgan.yaml" in err and "ckpts/anole/chameleon/tokenizer" in err


def test_neighbour_table_in_token_ids_and_ids_past_it(ckpts):
    """The VQ-index table becomes a token-id table over the candidate ids only; ids past it have no neighbours."""
    from models.drafters.acceptance import relaxed_mass

    lumina = family(ckpts, "lumina_mgpt")
    vq_table = torch.tensor([[1, 2], [0, 2], [1, 0]]).repeat(2731, 1)[:8192]
    tok = lumina.neighbours_for_engine(vq_table)
    assert tok.shape == (8804, 2)  # rows up to the newline id, not the 65 k (here 8.8 k) vocabulary
    assert tok[4].tolist() == [5, 6] and tok[8803].tolist() == [-1, -1] and tok[:4].eq(-1).all()
    probs = torch.zeros(2, lumina.target.config.vocab_size)
    probs[:, 5] = probs[:, 6] = 0.5
    p_tilde, m = relaxed_mass(probs, torch.tensor([4, 8810]), tok, 2, 0.9, None)
    assert p_tilde.tolist() == [0.5, 0.0] and m.tolist() == [1, 0]


def test_image_token_ids_from_a_chameleon_vocabulary():
    """``IMGIMG<letters>Z`` names spell the code in decimal with A=0 .. J=9 (transformers' reading)."""
    from models.checkpoints import CheckpointError
    from models.families.chameleon import image_token_ids_from_vocab

    def name(i: int) -> str:
        return "IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(i)) + "Z"

    vocab = {"<s>": 0, "hello": 3, **{name(i): 100 + (i * 7) % 12 for i in range(12)}}
    table = image_token_ids_from_vocab(vocab, 12)
    assert table.tolist() == [100 + (i * 7) % 12 for i in range(12)]
    assert image_token_ids_from_vocab({"<s>": 0}, 12) is None  # no image names: id = index + 4
    with pytest.raises(CheckpointError, match="names 12 image tokens"):
        image_token_ids_from_vocab(vocab, 16)


def test_benchmark_runs_on_lumina(ckpts, tmp_path):
    from entrypoints.benchmark import main

    p = ckpts["lumina_mgpt"]
    main(["--model", "lumina_mgpt", "--model_path", str(p["model"]), "--vq_path", str(p["vq"]), "--drafter_path",
          str(p["drafter"]), "--codebook_path", str(p["codebook"]), "--image_size", str(IMAGE_SIZE), "--prompt",
          "a red cat", "--num_images", "1", "--lantern_k", "8", "--settings", "ar", "lantern++:lam=3,tree=chain_3",
          "--output_dir", str(tmp_path), "--device", "cpu"])
    results = json.loads((tmp_path / "benchmark.json").read_text())
    rows = results["results"] if isinstance(results, dict) else results
    assert [r["setting"] for r in rows] == ["ar", "lantern++:lam=3,tree=chain_3"]
    assert rows[1]["tau"] >= 1.0
