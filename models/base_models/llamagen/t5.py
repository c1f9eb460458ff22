"""FLAN-T5 text encoder for LlamaGen T2I, loaded from a local folder only (never from a hub)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoints import CheckpointError

T5_LAYOUT_HINT = "  ckpts/llamagen/t5/flan-t5-xl/{config.json, model-0000x-of-0000y.safetensors, spiece.model / tokenizer.json, ...}"


class T5Embedder:
    """Prompts -> (caption features (B, max_length, d_model), mask (B, max_length)), right-padded as T5 returns them.

    Mirrors LlamaGen's ``T5Embedder.get_text_embeddings``: tokenise with padding to ``max_length`` (120) and
    truncation, run the encoder, return ``last_hidden_state`` and the attention mask.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_length: int = 120):
        path = Path(path)
        if not (path / "config.json").exists():
            raise CheckpointError(f"FLAN-T5 encoder not found at {path}\nExpected layout:\n{T5_LAYOUT_HINT}")
        from transformers import AutoTokenizer, T5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(str(path), local_files_only=True, dtype=dtype).to(device).eval()
        self.device, self.max_length = torch.device(device), max_length

    @torch.no_grad()
    def get_text_embeddings(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(texts, max_length=self.max_length, padding="max_length", truncation=True,
                             return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask


def to_left_padding(caption_embs: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded T5 output -> LlamaGen's left-padded layout (valid tokens last, padded rows zeroed)."""
    n_valid = masks.sum(dim=1).long()
    t = masks.shape[1]
    idx = (torch.arange(t, device=masks.device)[None, :] + n_valid[:, None]) % t  # roll each row left by n_valid
    rolled = torch.gather(caption_embs, 1, idx[..., None].expand(-1, -1, caption_embs.shape[-1]))
    new_masks = masks.flip(-1)
    return rolled * new_masks[..., None].to(rolled.dtype), new_masks


class CachedTextEncoder:
    """Precomputed T5 features looked up by prompt (a ``.safetensors`` file written by :func:`save_text_cache`).

    Lets a run reuse caption features (e.g. for benchmarks) without loading the 3B-parameter encoder.
    Tensors ``caption_embs`` (P, T, C) and ``emb_masks`` (P, T), right-padded as T5 returns them; the prompts
    are in the metadata, in the same order.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
            self.embs = f.get_tensor("caption_embs").to(device, dtype)
            self.masks = f.get_tensor("emb_masks").to(device)
        self.index = {p: i for i, p in enumerate(prompts)}
        self.path = path

    def get_text_embeddings(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [t for t in texts if t not in self.index]
        if missing:
            raise ValueError(f"prompt {missing[0]!r} is not in the caption cache {self.path}")
        rows = torch.tensor([self.index[t] for t in texts])
        return self.embs[rows], self.masks[rows]


def save_text_cache(path: str | Path, prompts: list[str], caption_embs: torch.Tensor, emb_masks: torch.Tensor) -> None:
    """Write a caption-feature cache readable by :class:`CachedTextEncoder`."""
    import json

    from models.checkpoints import save_safetensors_atomic

    save_safetensors_atomic({"caption_embs": caption_embs, "emb_masks": emb_masks.float()}, path,
                            metadata={"prompts": json.dumps(prompts)})


def load_text_encoder(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A FLAN-T5 folder -> :class:`T5Embedder`; a ``.safetensors`` feature cache -> :class:`CachedTextEncoder`."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        return CachedTextEncoder(path, device, dtype)
    return T5Embedder(path, device, dtype)
