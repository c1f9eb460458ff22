"""Chameleon family: Anole-7B and Lumina-mGPT-7B-768 (SPEC §5). Only what differs from LlamaGen lives here.

Token layouts (ids of the real Chameleon vocabulary):

* **Anole**: cond = ``[0] + text + [8710, 8197]`` (8710 ends the text turn, 8197 starts the image), batches
  left-padded with id 1 (padding is masked, never attended to); uncond = ``[0, 8197]``; the image is
  ``grid²`` codes (32×32 at 512 px), only image ids (VQ index + 4 = 4..8195) may be sampled.
* **Lumina-mGPT**: cond = ``[0] + text("Generate an image of {S}x{S} according to the following prompt:\\n{p}")
  + [8710]`` followed by the image header ``8197, 8804+g, 8804+g`` (g = S/32: the height/width tokens);
  uncond = the header only (Lumina's CFG context starts at 8197). The generated sequence is ``grid`` rows of
  ``grid`` codes each followed by the newline 8803, then the end-of-image 8196: those are *forced* by a
  :class:`~models.token_masks.PositionalTokenMask`, so every Lumina image has them in place and they are
  never sampled wrong, drafted wrong or rejected.

CFG streams with prefixes of different lengths: ``cfg_mode="parallel"`` (default) lays cond and uncond out in
one batch, the shorter one left-padded and masked (RoPE is relative, so the padding offset does not change the
scores); ``"sequential"`` runs each stream alone in its own cache without padding, as the original does
(:class:`SequentialCFGTarget`). Text is tokenised with the checkpoint's own ``text_tokenizer.json`` (or the HF
folder's ``tokenizer.json``) through the ``tokenizers`` library. Pixels come from the Chameleon VQGAN.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.base_models.chameleon.model import ChameleonCausalLM
from models.base_models.chameleon.vqgan import IMAGE_TOKEN_OFFSET, ChameleonVQGAN
from models.checkpoints import CheckpointError
from models.drafters.kv_cache import KVCache
from models.families.base import ImageFamily, SamplerDefaults
from models.generation import Prefix
from models.token_masks import PositionalTokenMask

BOS, PAD = 0, 1
END_OF_TURN = 8710  # <reserved08706>: closes the text turn
BOI, EOI = 8197, 8196  # begin / end of image
NEWLINE = 8803  # Lumina: after each row of codes
SIZE_TOKEN_BASE = 8804  # Lumina: height/width tokens 8804 + size/32
LUMINA_TEMPLATE = "Generate an image of {w}x{h} according to the following prompt:\n{prompt}"


def image_token_ids_from_vocab(vocab: dict[str, int], n_codes: int) -> torch.Tensor | None:
    """VQ index -> token id from a Chameleon vocabulary (``IMGIMG<code in letters A..J>Z`` names), if present.

    The letters spell the decimal code with A=0 … J=9 (as transformers' ``ChameleonImageVocabularyMapping``
    reads them). Returns None when the vocabulary has no such names (then id = index + 4).
    """
    table = torch.full((n_codes,), -1, dtype=torch.long)
    found = 0
    for name, tid in vocab.items():
        if name.startswith("IMGIMG") and len(name) > 7:
            digits = "".join(str(ord(c) - ord("A")) for c in name[6:-1])
            if digits.isdigit() and int(digits) < n_codes:
                table[int(digits)] = tid
                found += 1
    if found == 0:
        return None
    if found != n_codes or int(table.min()) < 0:
        raise CheckpointError(f"the text tokenizer names {found} image tokens but the VQGAN has {n_codes} codes")
    return table


class SequentialCFGTarget:
    """Runs the [cond; uncond] rows of a left-padded prefix one at a time, each in its own unpadded cache.

    The original's ``--cfg_mode sequential``: the uncond stream never stores or attends padding. Row r with
    ``pad[r]`` leading padding slots sees slot s of the shared layout at its own slot ``s − pad[r]``; queries at
    padding positions (prefill only) are skipped and return zeros. Same interface as the wrapped target.
    """

    def __init__(self, target: ChameleonCausalLM, pad: list[int] | None = None):
        self.target, self.pad = target, pad or [0]  # set by ChameleonFamily.build_prefix for every prompt batch
        self.config, self.lm_head = target.config, target.lm_head

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.target.embed_tokens(ids)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> RowCaches:
        if batch != len(self.pad):
            raise ValueError(f"sequential CFG target built for {len(self.pad)} rows, asked for {batch}")
        return RowCaches([self.target.new_cache(1, max_len - p, device, dtype) for p in self.pad], self.pad)

    def forward_hidden(self, h, rope_pos, cache=None, cache_pos=None, attn_mask=None):
        """Positions and slots may be shared (q,) or per row (rows, q) (the batched speculative engine)."""
        if cache is None:
            raise ValueError("the sequential CFG layout needs a cache")
        cache_pos = rope_pos if cache_pos is None else cache_pos
        out = torch.zeros_like(h)
        for r, (c, p) in enumerate(zip(cache.caches, cache.pad)):
            cp = cache_pos[r] if cache_pos.dim() == 2 else cache_pos
            rp = rope_pos[r] if rope_pos.dim() == 2 else rope_pos
            keep = cp >= p
            if not bool(keep.any()):
                continue
            rows_mask = attn_mask[r : r + 1] if attn_mask.shape[0] > 1 else attn_mask
            mask = rows_mask[:, :, keep, p:]
            res = self.target.forward_hidden(h[r : r + 1, keep], rp[keep] - p, c, cp[keep] - p, mask)
            out[r : r + 1, keep] = res
        return out


class RowCaches:
    """One :class:`KVCache` per CFG row, addressed in the shared (padded) slot numbering."""

    def __init__(self, caches: list[KVCache], pad: list[int]):
        self.caches, self.pad = caches, pad
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, value: int) -> None:
        self._length = value
        for c, p in zip(self.caches, self.pad):
            c.length = value - p

    def commit(self, src_pos: torch.Tensor, dst_start: int) -> None:
        for c, p in zip(self.caches, self.pad):
            c.commit(src_pos - p, dst_start - p)
        self._length = dst_start + int(src_pos.numel())

    def commit_rows(self, src_pos: torch.Tensor, dst_pos: torch.Tensor) -> None:
        """Per-row commit (rows, n) in the shared numbering (see :meth:`KVCache.commit_rows`)."""
        for r, (c, p) in enumerate(zip(self.caches, self.pad)):
            c.commit_rows(src_pos[r : r + 1] - p, dst_pos[r : r + 1] - p)

    def select_batch(self, rows: torch.Tensor) -> None:
        """Keep only rows ``rows`` (finished prompts drop out of a batch)."""
        keep = rows.tolist()
        self.caches, self.pad = [self.caches[i] for i in keep], [self.pad[i] for i in keep]


class ChameleonFamily(ImageFamily):
    """Anole (``layout="anole"``) or Lumina-mGPT (``layout="lumina"``) around one Chameleon target."""

    def __init__(
        self,
        name: str,
        layout: str,
        target: ChameleonCausalLM,
        vq: ChameleonVQGAN,
        text_tokenizer,
        defaults: SamplerDefaults,
        image_size: int,
        cfg_mode: str = "parallel",
    ):
        if layout not in ("anole", "lumina"):
            raise ValueError(f"unknown Chameleon layout {layout!r} (anole or lumina)")
        if cfg_mode not in ("parallel", "sequential"):
            raise ValueError(f"--cfg_mode must be parallel or sequential, got {cfg_mode!r}")
        factor = vq.config.downsample_factor
        if image_size % factor:  # (Lumina's size token 8804 + size/32 assumes multiples of 32 for real sizes)
            raise ValueError(f"image size {image_size} must be a multiple of the VQGAN's downsampling ({factor})")
        self.name, self.layout, self.base_target, self.vq, self.tokenizer = name, layout, target, vq, text_tokenizer
        self.defaults, self.image_size, self.cfg_mode = defaults, image_size, cfg_mode
        self.grid = image_size // factor
        vocab = target.config.vocab_size
        n_codes = vq.config.n_embed
        mapping = image_token_ids_from_vocab(text_tokenizer.get_vocab(), n_codes) if text_tokenizer is not None else None
        self.vq_to_token = mapping if mapping is not None else torch.arange(n_codes) + IMAGE_TOKEN_OFFSET
        needed = max(int(self.vq_to_token.max()), NEWLINE, SIZE_TOKEN_BASE + image_size // 32, END_OF_TURN)
        if needed >= vocab:
            raise CheckpointError(f"the model's vocabulary ({vocab}) lacks Chameleon's special/image ids (up to {needed})")
        self.token_to_vq = torch.full((vocab,), -1, dtype=torch.long)
        self.token_to_vq[self.vq_to_token] = torch.arange(n_codes)
        image_ids = torch.zeros(vocab, dtype=torch.bool)
        image_ids[self.vq_to_token] = True
        dev = target.lm_head.weight.device
        if layout == "anole":
            self.allowed_tokens = image_ids.to(dev)
        else:  # classes: 0 = image code, 1 = newline, 2 = end of image
            classes = torch.zeros(3, vocab, dtype=torch.bool)
            classes[0], classes[1, NEWLINE], classes[2, EOI] = image_ids, True, True
            per_row = torch.zeros(self.grid + 1, dtype=torch.long)
            per_row[-1] = 1
            pos = torch.cat([per_row.repeat(self.grid), torch.tensor([2])])
            self.allowed_tokens = PositionalTokenMask(classes, pos[None]).to(dev)
        # the engine's target; in sequential mode a wrapper whose per-row padding each build_prefix sets
        self.target = SequentialCFGTarget(target) if cfg_mode == "sequential" else target

    # ------------------------------------------------------------------------------------------ layout
    @property
    def num_image_tokens(self) -> int:
        if self.layout == "anole":
            return self.grid * self.grid
        return self.grid * (self.grid + 1) + 1

    @property
    def device(self) -> torch.device:
        return self.base_target.lm_head.weight.device

    def text_ids(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise CheckpointError("no text tokenizer loaded (text_tokenizer.json / tokenizer.json)")
        if self.layout == "lumina":
            prompt = LUMINA_TEMPLATE.format(w=self.image_size, h=self.image_size, prompt=prompt)
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def image_header(self) -> list[int]:
        if self.layout == "anole":
            return [BOI]
        g = SIZE_TOKEN_BASE + self.image_size // 32
        return [BOI, g, g]

    def prompt_ids(self, prompt: str) -> list[int]:
        """The conditional token prefix of one prompt."""
        return [BOS, *self.text_ids(prompt), END_OF_TURN, *self.image_header()]

    def uncond_ids(self) -> list[int]:
        """The unconditional prefix: Anole ``[0, 8197]``; Lumina the image header from 8197 on."""
        return [BOS, BOI] if self.layout == "anole" else self.image_header()

    def prefix_ids(self, prompts: list[str], cfg_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Token rows [cond; uncond], left-padded with id 1 to one length -> (ids, valid) (rows, T)."""
        rows = [self.prompt_ids(p) for p in prompts]
        if cfg_scale != 1.0:
            rows += [self.uncond_ids()] * len(prompts)
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), PAD, dtype=torch.long)
        valid = torch.zeros(len(rows), t, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, t - len(r) :] = torch.tensor(r)
            valid[i, t - len(r) :] = True
        return ids, valid

    @torch.no_grad()
    def build_prefix(self, prompts: list[str], cfg_scale: float) -> Prefix:
        ids, valid = self.prefix_ids(prompts, cfg_scale)
        ids, valid = ids.to(self.device), valid.to(self.device)
        if isinstance(self.target, SequentialCFGTarget):
            self.target.pad = [int((~v).sum()) for v in valid]
        return Prefix(self.base_target.embed_tokens(ids), valid, cfg_scale, token_ids=ids)

    # ------------------------------------------------------------------------------------------ codes
    def tokens_to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Generated token ids (B, num_image_tokens) -> VQ indices (B, grid²); checks Lumina's newline/end tokens."""
        tokens = tokens.cpu()
        if self.layout == "lumina":
            if tokens.shape[1] != self.num_image_tokens:
                raise ValueError(f"expected {self.num_image_tokens} Lumina tokens, got {tokens.shape[1]}")
            body = tokens[:, :-1].reshape(tokens.shape[0], self.grid, self.grid + 1)
            if not (bool((body[:, :, -1] == NEWLINE).all()) and bool((tokens[:, -1] == EOI).all())):
                raise ValueError("Lumina token sequence lacks its newline / end-of-image tokens")
            tokens = body[:, :, :-1].reshape(tokens.shape[0], -1)
        codes = self.token_to_vq[tokens]
        if bool((codes < 0).any()):
            raise ValueError("generated sequence holds non-image tokens where codes belong")
        return codes

    def codes_to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ indices (B, grid²) -> the family's token sequence (Lumina: with newlines and the end token)."""
        tokens = self.vq_to_token[codes.cpu()]
        if self.layout == "lumina":
            b = tokens.shape[0]
            rows = tokens.reshape(b, self.grid, self.grid)
            rows = torch.cat([rows, torch.full((b, self.grid, 1), NEWLINE)], dim=2).reshape(b, -1)
            tokens = torch.cat([rows, torch.full((b, 1), EOI)], dim=1)
        return tokens

    @torch.no_grad()
    def decode_images(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = self.tokens_to_codes(tokens).to(self.vq.quant_conv.weight.device)
        images = self.vq.decode_codes(codes, (self.grid, self.grid))
        return ((images.float() + 1) / 2).clamp(0, 1)

    @property
    def num_codes(self) -> int:
        """VQGAN codebook size: the rows a neighbour table (in VQ indices) must have."""
        return int(self.vq.config.n_embed)

    def neighbours_for_engine(self, table: torch.Tensor) -> torch.Tensor:
        """A VQ-index neighbour table (N, K) -> indexed by token id (max allowed id + 1, K), -1 elsewhere.

        Only ids that can be candidates need rows (image ids, and Lumina's forced newline / end, whose rows stay
        empty), so the table is ~8.8 k rows rather than the 65 k vocabulary.
        """
        rows = max(int(self.vq_to_token.max()), NEWLINE if self.layout == "lumina" else 0) + 1
        vq2tok = self.vq_to_token.to(table.device)
        out = torch.full((rows, table.shape[1]), -1, dtype=torch.long, device=table.device)
        out[vq2tok] = torch.where(table >= 0, vq2tok[table.clamp(min=0).long()], -1)
        return out


def load_text_tokenizer(tokenizer_dir: Path | None, model_dir: Path | None):
    """``text_tokenizer.json`` of the Chameleon tokenizer folder, else the model folder's ``tokenizer.json``."""
    from tokenizers import Tokenizer

    for p in ([tokenizer_dir / "text_tokenizer.json"] if tokenizer_dir else []) + (
            [model_dir / "tokenizer.json"] if model_dir else []):
        if p.exists():
            return Tokenizer.from_file(str(p))
    return None
