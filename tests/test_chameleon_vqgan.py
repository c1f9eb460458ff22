"""Chameleon VQGAN reproduces the reference (conformance ``chameleon_vqgan/``) and loads Meta's file layout."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import conformance_dir, load_io, manifest_entries, read_json

from models.base_models.chameleon.vqgan import (
    ChameleonVQGAN,
    VQGANConfig,
    load_chameleon_vqgan,
    preprocess_image,
)
from models.checkpoints import CheckpointError


def write_vqgan_folder(folder, params: dict, weights: dict[str, torch.Tensor]) -> None:
    """Meta's layout: vqgan.yaml (model.params incl. a lossconfig) + vqgan.ckpt (weights under state_dict, loss keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    params = {**params, "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}
    (folder / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel",
                                                                  "params": params}}))
    sd = {**weights, "loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4)}
    torch.save({"state_dict": sd, "global_step": 1}, folder / "vqgan.ckpt")


@pytest.fixture(scope="module")
def vqgan(tmp_path_factory):
    d = conformance_dir("chameleon_vqgan")
    folder = tmp_path_factory.mktemp("tok")
    write_vqgan_folder(folder, read_json(d / "config.json")["model.params"], load_io(d / "weights.safetensors"))
    return load_chameleon_vqgan(folder), load_io(d / "io.safetensors")


def close(a, b, tol=1e-4):
    return a.shape == b.shape and float((a - b).abs().max()) <= tol


def test_encoder_quantiser_decoder_match_reference(vqgan):
    model, io = vqgan
    with torch.no_grad():
        enc = model.encoder(io["x"])
        assert close(enc, io["encoder_out"])
        assert close(model.quant_conv(enc), io["pre_quant"])
        quant, idx = model.encode(io["x"])
        assert close(quant, io["quant"])
        assert torch.equal(idx, io["encode_indices"])
        entry = model.quantize.get_codebook_entry(idx, (2, 8, 8, 8))
        assert close(entry, io["codebook_entry"])
        assert close(model.decode(entry), io["decode_from_indices"])
        assert close(model(io["x"]), io["reconstruction"])
        assert close(model.decode_codes(idx.view(2, -1)), io["decode_from_indices"])


def test_real_size_matches_manifest_exactly():
    d = conformance_dir("chameleon_vqgan")
    m = read_json(d / "manifest_vqgan_real.json")
    with torch.device("meta"):
        model = ChameleonVQGAN(VQGANConfig.from_params({"embed_dim": 256, "n_embed": 8192, "ddconfig": m["ddconfig"]}))
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == manifest_entries(d / "manifest_vqgan_real.json")
    assert sum(v.numel() for v in model.state_dict().values()) == m["total_elements"]


def test_missing_model_key_and_missing_files_are_named(tmp_path):
    d = conformance_dir("chameleon_vqgan")
    weights = load_io(d / "weights.safetensors")
    weights.pop("decoder.conv_out.weight")
    write_vqgan_folder(tmp_path / "tok", read_json(d / "config.json")["model.params"], weights)
    with pytest.raises(CheckpointError, match="decoder.conv_out.weight"):
        load_chameleon_vqgan(tmp_path / "tok")
    with pytest.raises(CheckpointError, match="vqgan.yaml"):
        load_chameleon_vqgan(tmp_path / "nothing")


def test_preprocessing_resizes_crops_and_scales():
    from PIL import Image

    img = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # fully transparent -> white
    img.paste((255, 0, 0, 255), (0, 0, 20, 20))
    x = preprocess_image(img, 16)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[:, 8, -1], torch.ones(3), atol=1e-6)  # right half: white
    assert float(x[0, 8, 0]) == pytest.approx(1.0) and float(x[1, 8, 0]) == pytest.approx(-1.0)


def test_legacy_and_object_holding_checkpoints(tmp_path):
    """Legacy (non-zip) files load without mmap; files with pickled objects stop with a way out."""
    d = conformance_dir("chameleon_vqgan")
    params = read_json(d / "config.json")["model.params"]
    weights = load_io(d / "weights.safetensors")
    write_vqgan_folder(tmp_path / "legacy", params, weights)
    torch.save({"state_dict": weights}, tmp_path / "legacy" / "vqgan.ckpt", _use_new_zipfile_serialization=False)
    assert load_chameleon_vqgan(tmp_path / "legacy").quantize.embedding.weight.shape == (64, 8)
    write_vqgan_folder(tmp_path / "obj", params, weights)
    torch.save({"state_dict": weights, "callbacks": _Opaque()}, tmp_path / "obj" / "vqgan.ckpt")
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_chameleon_vqgan(tmp_path / "obj")


class _Opaque:
    pass
