"""Prompt sets (named sets read from a folder, files, literals, slices) and the local FLAN-T5 wrapper."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED

from entrypoints.common import UserError, load_prompts, parse_slice
from models.base_models.llamagen.t5 import T5Embedder, to_left_padding

PROMPTS = SHARED / "data" / "prompts"


def _need_prompts():
    if not PROMPTS.exists():
        pytest.skip(f"public prompt sets not found at {PROMPTS}")


def test_named_sets_read_from_prompt_dir():
    _need_prompts()
    parti = load_prompts("PartiPrompts", str(PROMPTS), None, None)
    assert len(parti) > 1000 and parti[0] == (0, "bond")
    coco = load_prompts("MSCOCO2017Val", str(PROMPTS), 5, "100-200")
    assert [i for i, _ in coco] == [100, 101, 102, 103, 104]  # indices stay global
    assert all(isinstance(p, str) and p for _, p in coco)
    sjd = load_prompts("SJDPrompts", str(PROMPTS), None, None)
    assert sjd[0][1] == "A hawk-man with a red head"


def test_missing_named_set_says_where_to_put_it(tmp_path):
    with pytest.raises(UserError, match="--prompt_dir"):
        load_prompts("PartiPrompts", str(tmp_path), None, None)


def test_literal_prompt_repeats_and_files(tmp_path):
    assert load_prompts("a cat", None, 3, None) == [(0, "a cat"), (1, "a cat"), (2, "a cat")]
    f = tmp_path / "p.txt"
    f.write_text("one\n\ntwo\nthree\n")
    assert load_prompts(str(f), None, None, "1-3") == [(1, "two"), (2, "three")]


@pytest.mark.parametrize("bad", ["5-2", "x-3", "3"])
def test_bad_slices(bad):
    with pytest.raises(UserError):
        parse_slice(bad)


def test_left_padding_matches_llamagen():
    """LlamaGen flips T5's right padding: valid tokens last, padded rows zero."""
    embs = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1) + 1
    masks = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    cond, new = to_left_padding(embs, masks)
    assert new.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    assert cond[0, :, 0].tolist() == [0, 0, 0, 1, 2]
    assert cond[1, :, 0].tolist() == [0, 6, 7, 8, 9]


def test_t5_embedder_loads_a_local_folder(tmp_path):
    """A tiny random T5 encoder + tokenizer saved in the HF layout loads offline and gives LlamaGen's shapes."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4},
                                                           unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=8, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(tmp_path)
    enc = T5Embedder(tmp_path, max_length=12)
    embs, mask = enc.get_text_embeddings(["a cat", "cat"])
    assert embs.shape == (2, 12, 16) and mask.tolist()[0][:4] == [1, 1, 1, 0] and int(mask[1].sum()) == 2


def test_t5_missing_folder_names_the_layout(tmp_path):
    from models.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="flan-t5-xl"):
        T5Embedder(tmp_path / "flan-t5-xl")
