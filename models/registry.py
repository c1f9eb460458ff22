"""Model names of the command line -> how to build the family, default checkpoint paths and sampler defaults.

Default paths follow the original README's ``ckpts/`` layout and are resolved against the repository root,
so commands work from any working directory; every path can be overridden on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.checkpoints import CheckpointError
from models.families.base import ImageFamily, SamplerDefaults

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    description: str
    defaults: SamplerDefaults
    paths: dict[str, str] = field(default_factory=dict)  # model / vq / t5 / drafter / codebook
    implemented: bool = True
    image_size: int | None = None
    lantern: tuple[int, float] = (1000, 0.1)  # default (lantern_k, lantern_delta), the original's
    showcase: dict = field(default_factory=dict)  # generate_images flags of the bare command (demo only)
    depth: int = 4  # default dynamic-tree depth (the original: 4; Lumina-mGPT 5)

    def default_path(self, key: str) -> Path | None:
        p = self.paths.get(key)
        return None if p is None else REPO_ROOT / p


# The demo's LANTERN defaults (k, delta) and the bare command's setting (LANTERN++ on a chain of 6 drafts,
# lambda 20), chosen from `python main.py benchmark` on the demo (see the README): the fastest setting whose
# samples the classifier still recognises as well as plain AR's.
DEMO_LANTERN = (20, 0.2)
DEMO_SHOWCASE = {"static_tree": True, "tree_choices": "chain_6", "lantern_k": 20, "lantern_delta": 20.0}

MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec(
            "demo", "llamagen", "built-in digits model (LlamaGen C2I architecture, 32 px, 8x8 tokens, 1024 codes)",
            SamplerDefaults(cfg=4.0, temperature=1.0, top_k=0, top_p=1.0),
            {"model": "ckpts/demo/gpt", "vq": "ckpts/demo/vq", "drafter": "ckpts/demo/drafter",
             "codebook": "ckpts/demo/neighbours.safetensors"},
            lantern=DEMO_LANTERN,
            showcase=DEMO_SHOWCASE,
        ),
        ModelSpec(
            "llamagen", "llamagen", "LlamaGen T2I Stage I (XL, 256 px, 16x16 tokens, FLAN-T5-XL)",
            SamplerDefaults(cfg=7.5, temperature=1.0, top_k=1000, top_p=1.0),
            {"model": "ckpts/llamagen/LlamaGen-T2I", "vq": "ckpts/llamagen/vq_ds16_t2i.pt",
             "t5": "ckpts/llamagen/t5/flan-t5-xl", "drafter": "ckpts/llamagen/trained_drafters/llamagen_drafter",
             "codebook": "ckpts/llamagen/vq_distances/neighbours.safetensors"},
        ),
        ModelSpec(
            "llamagen2", "llamagen", "LlamaGen T2I Stage II (XL, 512 px, 32x32 tokens, FLAN-T5-XL)",
            SamplerDefaults(cfg=7.5, temperature=1.0, top_k=1000, top_p=1.0),
            {"model": "ckpts/llamagen/LlamaGen-T2I-2", "vq": "ckpts/llamagen/vq_ds16_t2i.pt",
             "t5": "ckpts/llamagen/t5/flan-t5-xl", "drafter": "ckpts/llamagen/trained_drafters/llamagen2_drafter",
             "codebook": "ckpts/llamagen/vq_distances/neighbours.safetensors"},
        ),
        ModelSpec(
            "llamagen_c2i", "llamagen", "LlamaGen class-conditional ImageNet (GPT-B ... GPT-3B; prompts are class ids)",
            SamplerDefaults(cfg=4.0, temperature=1.0, top_k=2000, top_p=1.0),
            {"model": "ckpts/llamagen/c2i_B_256.pt", "vq": "ckpts/llamagen/vq_ds16_c2i.pt",
             "drafter": "ckpts/llamagen/trained_drafters/llamagen_c2i_drafter",
             "codebook": "ckpts/llamagen/vq_distances/neighbours_c2i.safetensors"},
            image_size=256,
        ),
        ModelSpec(
            "anole", "chameleon", "Anole-7B (Chameleon, 512 px, 32x32 tokens)",
            SamplerDefaults(cfg=3.0, temperature=1.0, top_k=2000, top_p=1.0),
            {"model": "ckpts/anole/Anole-7b-v0.1-hf", "vq": "ckpts/anole/chameleon/tokenizer",
             "drafter": "ckpts/anole/trained_drafters/anole_drafter",
             "codebook": "ckpts/anole/vq_distances/neighbours.safetensors"},
            image_size=512,
        ),
        ModelSpec(
            "lumina_mgpt", "chameleon", "Lumina-mGPT-7B-768 (Chameleon, 768 px, 48 rows x (48 codes + newline))",
            SamplerDefaults(cfg=3.0, temperature=1.0, top_k=2000, top_p=1.0),
            {"model": "ckpts/lumina_mgpt/Lumina-mGPT-7B-768", "vq": "ckpts/lumina_mgpt/chameleon/tokenizer",
             "drafter": "ckpts/lumina_mgpt/trained_drafters/lumina_mgpt_drafter",
             "codebook": "ckpts/lumina_mgpt/vq_distances/neighbours.safetensors"},
            image_size=768, depth=5,
        ),
    ]
}

CKPT_LAYOUT = """ckpts
├── demo/                      (committed: gpt/, vq/, drafter/, classifier/, neighbours.safetensors)
└── llamagen/
    ├── LlamaGen-T2I/          {config.json, model.safetensors}          (--model llamagen)
    ├── LlamaGen-T2I-2/        {config.json, model.safetensors}          (--model llamagen2)
    ├── c2i_B_256.pt           original LlamaGen C2I checkpoint          (--model llamagen_c2i)
    ├── vq_ds16_t2i.pt, vq_ds16_c2i.pt
    ├── t5/flan-t5-xl/         {config.json, *.safetensors, tokenizer files}
    ├── trained_drafters/llamagen_drafter/ {config.json, pytorch_model.bin | model.safetensors}
    └── vq_distances/          neighbour tables from `python main.py generate_codebook`
├── anole/
│   ├── Anole-7b-v0.1-hf/      {config.json, model.safetensors.index.json, model-0000i-of-0000n.safetensors, tokenizer.json}
│   ├── chameleon/tokenizer/   {text_tokenizer.json, vqgan.yaml, vqgan.ckpt}
│   ├── trained_drafters/anole_drafter/ {config.json, pytorch_model.bin | model.safetensors}
│   └── vq_distances/neighbours.safetensors
└── lumina_mgpt/
    ├── Lumina-mGPT-7B-768/    {config.json, model.safetensors.index.json, model-0000i-of-0000n.safetensors}
    ├── chameleon/tokenizer/   {text_tokenizer.json, vqgan.yaml, vqgan.ckpt}
    ├── trained_drafters/lumina_mgpt_drafter/ {config.json, pytorch_model.bin | model.safetensors}
    └── vq_distances/neighbours.safetensors"""


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    spec = MODELS[name]
    if not spec.implemented:
        raise NotImplementedError(
            f"model {name!r} ({spec.description}) is not implemented in this version yet; "
            f"available: {', '.join(n for n, s in MODELS.items() if s.implemented)}"
        )
    return spec


def resolve_path(spec: ModelSpec, key: str, given: str | None) -> Path:
    """A user-given path wins; otherwise the spec's default under the repository root."""
    if given:
        return Path(given)
    p = spec.default_path(key)
    if p is None:
        raise CheckpointError(f"model {spec.name!r} has no default {key} path; pass it explicitly")
    return p


def demo_class_parser():
    from models.demo.data import prompt_to_class

    return prompt_to_class


def load_family(
    name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_path: str | None = None,
    vq_path: str | None = None,
    t5_path: str | None = None,
    image_size: int | None = None,
    cfg_mode: str = "parallel",
) -> ImageFamily:
    """Build the family adapter for ``name`` with its target, tokenizer and (T2I) text encoder loaded.

    ``vq_path`` is the VQ checkpoint (LlamaGen) or the Chameleon tokenizer folder (vqgan.yaml, vqgan.ckpt,
    text_tokenizer.json); ``cfg_mode`` is the Chameleon CFG layout (parallel / sequential).
    """
    from models.base_models.llamagen.loading import load_llamagen_gpt, load_llamagen_vq
    from models.families.llamagen import LlamaGenFamily

    spec = get_spec(name)
    if spec.family == "chameleon":
        return load_chameleon_family(spec, device, dtype, model_path, vq_path, image_size, cfg_mode)
    # fp16 convolutions are slow or missing on CPU and the VQ is small: decode in fp32 unless bf16 was asked.
    vq = load_llamagen_vq(resolve_path(spec, "vq", vq_path), device, torch.float32 if dtype == torch.float16 else dtype)
    size = image_size or spec.image_size
    ds = vq.config.downsample_factor
    if size is not None and (size < ds or size % ds):
        raise CheckpointError(f"--image_size {size}: must be a positive multiple of the VQ's downsample factor {ds} "
                              f"(e.g. {ds * max(1, size // ds)})")
    block_size = (size // ds) ** 2 if size is not None else None
    target = load_llamagen_gpt(resolve_path(spec, "model", model_path), device, dtype, block_size=block_size)
    if target.config.vocab_size != vq.config.codebook_size:
        raise CheckpointError(f"the target's vocabulary ({target.config.vocab_size} tokens) does not match the VQ "
                              f"codebook ({vq.config.codebook_size} codes): --vq_path belongs to another model")
    text_encoder = None
    if target.config.model_type == "t2i":
        from models.base_models.llamagen.t5 import load_text_encoder

        text_encoder = load_text_encoder(resolve_path(spec, "t5", t5_path), device, dtype)
    class_parser = demo_class_parser() if name == "demo" else None
    return LlamaGenFamily(name, target, vq, spec.defaults, text_encoder, class_parser)


def load_chameleon_family(spec: ModelSpec, device, dtype, model_path, vq_path, image_size, cfg_mode) -> ImageFamily:
    """Anole / Lumina-mGPT: the Chameleon target (sharded safetensors, mmap), VQGAN and text tokenizer."""
    from models.base_models.chameleon.loading import CHAMELEON_LAYOUT_HINT, load_chameleon_target
    from models.base_models.chameleon.vqgan import load_chameleon_vqgan
    from models.families.chameleon import ChameleonFamily, load_text_tokenizer

    model_dir = resolve_path(spec, "model", model_path)
    tok_dir = resolve_path(spec, "vq", vq_path)
    if not (tok_dir / "vqgan.yaml").exists():
        raise CheckpointError(f"Chameleon tokenizer folder {tok_dir} lacks vqgan.yaml (pass --vq_path)\n"
                              f"Expected layout:\n{CHAMELEON_LAYOUT_HINT}")
    target = load_chameleon_target(model_dir, device, dtype)
    # fp16 convolutions are slow or missing on CPU: the VQGAN decodes in fp32 unless bf16 was asked
    vq = load_chameleon_vqgan(tok_dir, device, torch.float32 if dtype == torch.float16 else dtype)
    tokenizer = load_text_tokenizer(tok_dir, model_dir)
    if tokenizer is None:
        raise CheckpointError(f"no text tokenizer: expected {tok_dir / 'text_tokenizer.json'} or "
                              f"{model_dir / 'tokenizer.json'}\nExpected layout:\n{CHAMELEON_LAYOUT_HINT}")
    layout = "lumina" if spec.name == "lumina_mgpt" else "anole"
    return ChameleonFamily(spec.name, layout, target, vq, tokenizer, spec.defaults, image_size or spec.image_size,
                           cfg_mode)
