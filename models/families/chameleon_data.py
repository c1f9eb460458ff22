"""Drafter-data pieces of the Chameleon family (extract_code, generate_train_data), kept out of the entry points.

Code shards of Anole / Lumina-mGPT (``model_type: "chameleon"``) hold ``tokens`` = the family's generated token
ids (Anole: VQ index + 4; Lumina: rows of codes with their newline tokens and the end token) and the prompts as
metadata; there is no condition tensor, because the condition is the prompt's own token prefix.

Hidden-state shards add, because a token prefix (unlike LlamaGen's condition embeddings) carries real ids and
cond/uncond prefixes differ in length: ``prefix_ids`` (n, T) and, with the uncond stream,
``prefix_ids_uncond`` / ``prefix_valid_uncond`` (n, T). Every prefix is left-padded with id 1 to the run's
``prefix_len`` T. The drafter at prefix position p then reads (f_p, prefix id p+1), exactly as the engine feeds
it at decoding time (:class:`models.generation.Prefix` ``token_ids``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.families.chameleon import PAD, ChameleonFamily
from models.generation import prefix_attention_mask


def skeleton_family(spec, model_path, vq_path, image_size, device, dtype=torch.float32) -> ChameleonFamily:
    """The family with its VQGAN and tokenizer but the target only on the meta device (for extract_code).

    Encoding images needs the vocabulary layout, not 7 B weights: the target's sizes come from the model
    folder's ``config.json`` when it exists, else Chameleon's defaults.
    """
    from models.base_models.chameleon.model import ChameleonCausalLM, ChameleonTargetConfig
    from models.base_models.chameleon.vqgan import load_chameleon_vqgan
    from models.families.chameleon import load_text_tokenizer
    from models.registry import resolve_path

    model_dir = resolve_path(spec, "model", model_path)
    raw = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").exists() else {}
    cfg = ChameleonTargetConfig.from_dict({**raw, "vq_config": None, "num_hidden_layers": 0})
    with torch.device("meta"):
        target = ChameleonCausalLM(cfg)
    tok_dir = resolve_path(spec, "vq", vq_path)
    vq = load_chameleon_vqgan(tok_dir, device, torch.float32)
    tokenizer = load_text_tokenizer(Path(tok_dir), model_dir if model_dir.exists() else None)
    layout = "lumina" if spec.name == "lumina_mgpt" else "anole"
    return ChameleonFamily(spec.name, layout, target, vq, tokenizer, spec.defaults, image_size or spec.image_size)


def padded_prefixes(rows: list[list[int]], prefix_len: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids, valid) (n, prefix_len), left-padded with id 1; a longer row is an error."""
    longest = max(len(r) for r in rows)
    if longest > prefix_len:
        raise ValueError(f"a {what} prefix has {longest} tokens, more than --prefix_len {prefix_len}; raise it")
    ids = torch.full((len(rows), prefix_len), PAD, dtype=torch.long)
    valid = torch.zeros(len(rows), prefix_len, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, prefix_len - len(r) :] = torch.tensor(r, dtype=torch.long)
        valid[i, prefix_len - len(r) :] = True
    return ids, valid


@torch.no_grad()
def chameleon_hidden_states(
    family: ChameleonFamily, prompts: list[str], tokens: torch.Tensor, prefix_len: int, with_uncond: bool = True
) -> dict[str, torch.Tensor]:
    """One target forward over [prefix (T, left-padded); tokens[:, :-1]] for the cond (and uncond) rows.

    Returns ``hidden`` (n, T+N-1, H) and ``prefix_ids`` / ``prefix_valid`` (n, T), plus ``hidden_uncond``,
    ``prefix_ids_uncond`` and ``prefix_valid_uncond`` with the uncond stream (all on the CPU except hidden).
    The mask is the engine's prefill mask (causal, padding hidden, diagonal visible), so the features are the
    ones decoding produces.
    """
    target, dev = family.base_target, family.device
    ids, valid = padded_prefixes([family.prompt_ids(p) for p in prompts], prefix_len, "prompt")
    out = {"prefix_ids": ids, "prefix_valid": valid}
    rows_ids, rows_valid = [ids], [valid]
    if with_uncond:
        u_ids, u_valid = padded_prefixes([family.uncond_ids()] * len(prompts), prefix_len, "uncond")
        out.update(prefix_ids_uncond=u_ids, prefix_valid_uncond=u_valid)
        rows_ids.append(u_ids)
        rows_valid.append(u_valid)
    n_streams = len(rows_ids)
    body = tokens[:, :-1].to(dev).repeat(n_streams, 1)
    seq = torch.cat([torch.cat(rows_ids).to(dev), body], dim=1)
    keys = torch.cat([torch.cat(rows_valid).to(dev), torch.ones_like(body, dtype=torch.bool)], dim=1)
    hidden = target.forward_hidden(target.embed_tokens(seq), torch.arange(seq.shape[1], device=dev),
                                   attn_mask=prefix_attention_mask(keys))
    parts = hidden.chunk(n_streams)
    out["hidden"] = parts[0]
    if with_uncond:
        out["hidden_uncond"] = parts[1]
    return out
