"""extract_code: image + caption folders -> code shards (format 1 of models/train_data.py), resumable.

The helpers at the top (original-format checkpoints from the conformance fixtures, a T5 feature cache,
reading a shard folder back) are shared with test_self_distill.py and test_generate_train_data.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_checkpoints
from PIL import Image

from entrypoints import extract_code
from models.base_models.llamagen.loading import load_llamagen_vq
from models.base_models.llamagen.t5 import save_text_cache
from models.base_models.llamagen.vq_model import VQModel
from models.train_data import CODES_FORMAT, CODES_PREFIX, list_shard_files, read_manifest, read_shard

# ------------------------------------------------------------------------------------------ shared helpers


def model_args(folder: Path, kind: str) -> list[str]:
    """CLI flags for the tiny checkpoints (``llamagen_c2i`` / ``llamagen`` with an explicit 8 px size)."""
    model = "llamagen_c2i" if kind == "c2i" else "llamagen"
    args = ["--model", model, "--model_path", str(folder / f"{kind}.pt"), "--device", "cpu"]
    return args + (["--image_size", "8"] if kind == "c2i" else [])


def write_caption_cache(path: Path, prompts: list[str], caption_dim: int = 32, seed: int = 0) -> tuple:
    """Random right-padded "T5 features" for ``prompts`` in a feature cache; returns (embs, masks)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(len(prompts), 120)
    for i in range(len(prompts)):
        masks[i, : 3 + 2 * i] = 1
    embs = torch.randn(len(prompts), 120, caption_dim, generator=g) * masks[..., None]
    save_text_cache(path, prompts, embs, masks)
    return embs, masks


def fixture_caption_features(io: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The T2I fixture's left-padded captions as T5 returns them (right-padded)."""
    n_valid = io["emb_masks"].sum(1).long()
    embs = torch.zeros_like(io["caption_raw"])
    for i, n in enumerate(n_valid.tolist()):
        embs[i, :n] = io["caption_raw"][i, -n:]
    return embs, io["emb_masks"].flip(-1)


def read_folder(folder: Path, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """Every shard of ``folder`` concatenated and sorted by sample_id; also per-sample metadata lists."""
    parts, lists = [], {}
    for _, _, path in list_shard_files(folder, prefix):
        tensors, meta = read_shard(path)
        parts.append(tensors)
        for k, v in meta.items():
            if isinstance(v, list):
                lists.setdefault(k, []).extend(v)
    merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    order = merged["sample_id"].argsort()
    return {k: v[order] for k, v in merged.items()}, {k: [v[i] for i in order.tolist()] for k, v in lists.items()}


def assert_complete_and_unique(folder: Path, prefix: str, expected: set[int]) -> None:
    ids = [i for _, _, p in list_shard_files(folder, prefix) for i in read_shard(p, ["sample_id"])[0]["sample_id"].tolist()]
    assert len(ids) == len(set(ids)), "a sample was written twice"
    assert set(ids) == expected
    manifest = read_manifest(folder)
    assert manifest["num_samples"] == len(expected)
    assert sum(s["num_samples"] for s in manifest["shards"]) == len(expected)


def interrupt_on_call(monkeypatch, owner, name: str, n: int):
    """Make ``owner.name`` raise KeyboardInterrupt (Ctrl-C) on its ``n``-th call; returns the original."""
    original, calls = getattr(owner, name), []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(owner, name, flaky)
    return original


# ------------------------------------------------------------------------------------------ data folders


def make_image_folder(folder: Path, n: int, texts: list[str], corrupt: bool = True) -> list[str]:
    """``n`` small images of assorted sizes and modes with captions; optionally broken ones. Returns good names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    modes = ["RGB", "L", "RGBA"]
    for i in range(n):
        h, w = 8 + 3 * i, 12 + i
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(arr).convert(modes[i % 3])
        name = f"img{i:02d}." + ("jpg" if i % 4 == 3 else "png")
        img.save(folder / name)
        (folder / name).with_suffix(".txt").write_text(texts[i % len(texts)] + "\n")
        names.append(name)
    if corrupt:
        (folder / "img90.jpg").write_bytes(b"this is not an image")
        (folder / "img90.txt").write_text(texts[0])
        good = (folder / names[0]).read_bytes()
        (folder / "img91.png").write_bytes(good[: len(good) // 2])  # truncated file
        (folder / "img91.txt").write_text(texts[0])
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "zz_no_caption.png")
    return names


def run(argv: list[str]) -> dict:
    args = extract_code.parse_args().parse_args(argv)
    return extract_code.run_extract_code(args)


# ------------------------------------------------------------------------------------------ tests


def test_c2i_codes_equal_direct_vq_encoding_and_bad_files_are_skipped(tmp_path, capsys):
    write_checkpoints(tmp_path, "c2i")
    names = make_image_folder(tmp_path / "data", 5, ["3", "7", "0"])
    out = tmp_path / "codes"
    manifest = run([*model_args(tmp_path, "c2i"), "--vq_path", str(tmp_path / "vq.pt"), "--data_path",
                    str(tmp_path / "data"), "--output_dir", str(out), "--batch_size", "2", "--shard_size", "2"])
    printed = capsys.readouterr().out
    assert "skipped 2 of 7 samples" in printed and "img90.jpg" in printed and "img91.png" in printed
    assert "1 images have no .txt caption" in printed

    assert manifest == read_manifest(out)
    assert manifest["format"] == CODES_FORMAT and manifest["source"] == "extract_code"
    assert manifest["model_type"] == "c2i" and manifest["num_image_tokens"] == 16 and manifest["num_samples"] == 5
    assert [s["num_samples"] for s in manifest["shards"]] == [2, 2, 1]

    data, lists = read_folder(out, CODES_PREFIX)
    assert data["sample_id"].tolist() == list(range(5))  # sorted file order; the broken files come after
    assert lists["names"] == names
    assert data["labels"].tolist() == [3, 7, 0, 3, 7] and lists["prompts"] == ["3", "7", "0", "3", "7"]
    assert data["tokens"].dtype == torch.int64 and data["tokens"].shape == (5, 16)

    vq = load_llamagen_vq(tmp_path / "vq.pt")
    pixels = torch.stack([extract_code.load_image(tmp_path / "data" / n, 8) for n in names])
    assert pixels.shape == (5, 3, 8, 8) and pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(data["tokens"], vq.encode_to_codes(pixels))


def test_center_crop_takes_the_middle_of_the_shorter_side():
    arr = np.zeros((40, 20, 3), np.uint8)
    arr[10:30] = 255  # the central 20x20 square is white
    out = extract_code.center_crop_arr(Image.fromarray(arr), 10)
    assert out.shape == (10, 10, 3) and out.min() == 255


def test_t2i_stores_t5_features_right_padded_as_t5_returns_them(tmp_path):
    write_checkpoints(tmp_path, "t2i")
    captions = ["a red cube", "two dogs in the snow", "a lighthouse at night"]
    embs, masks = write_caption_cache(tmp_path / "t5.safetensors", captions)
    make_image_folder(tmp_path / "data", 4, captions, corrupt=False)
    out = tmp_path / "codes"
    manifest = run([*model_args(tmp_path, "t2i"), "--vq_path", str(tmp_path / "vq.pt"), "--t5_path",
                    str(tmp_path / "t5.safetensors"), "--data_path", str(tmp_path / "data"), "--output_dir", str(out)])
    assert manifest["model_type"] == "t2i" and manifest["num_samples"] == 4
    data, lists = read_folder(out, CODES_PREFIX)
    assert lists["prompts"] == [captions[i % 3] for i in range(4)]
    rows = [i % 3 for i in range(4)]
    assert data["caption_embs"].dtype == torch.float16 and data["caption_embs"].shape == (4, 120, 32)
    assert torch.equal(data["caption_embs"], embs[rows].half())
    assert data["emb_masks"].dtype == torch.uint8 and torch.equal(data["emb_masks"], masks[rows].to(torch.uint8))
    assert "labels" not in data


def test_vq_alone_is_enough_when_the_image_size_is_given(tmp_path, capsys):
    if (Path(extract_code.__file__).resolve().parents[1] / "ckpts/llamagen/c2i_B_256.pt").exists():
        pytest.skip("a real default GPT checkpoint is present")
    write_checkpoints(tmp_path, "c2i")
    make_image_folder(tmp_path / "data", 3, ["1", "2"], corrupt=False)
    common = ["--model", "llamagen_c2i", "--vq_path", str(tmp_path / "vq.pt"), "--device", "cpu",
              "--data_path", str(tmp_path / "data"), "--image_size", "8"]
    run([*common, "--model_path", str(tmp_path / "c2i.pt"), "--output_dir", str(tmp_path / "with_gpt")])
    run([*common, "--output_dir", str(tmp_path / "vq_only")])
    assert "VQ only" in capsys.readouterr().out
    a, _ = read_folder(tmp_path / "with_gpt", CODES_PREFIX)
    b, _ = read_folder(tmp_path / "vq_only", CODES_PREFIX)
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])


def test_interrupted_run_resumes_without_losing_or_duplicating_samples(tmp_path, monkeypatch):
    write_checkpoints(tmp_path, "c2i")
    make_image_folder(tmp_path / "data", 9, ["4", "5", "6"], corrupt=False)
    base = [*model_args(tmp_path, "c2i"), "--vq_path", str(tmp_path / "vq.pt"), "--data_path",
            str(tmp_path / "data"), "--batch_size", "2", "--shard_size", "3"]
    run([*base, "--output_dir", str(tmp_path / "straight")])

    out = tmp_path / "resumed"
    # 1) a shorter run, 2) a run killed by Ctrl-C in its third batch, 3) the full run
    run([*base, "--output_dir", str(out), "--num_samples", "2"])
    assert_complete_and_unique(out, CODES_PREFIX, {0, 1})
    original = interrupt_on_call(monkeypatch, VQModel, "encode_to_codes", 3)
    with pytest.raises(KeyboardInterrupt):
        run([*base, "--output_dir", str(out)])
    assert_complete_and_unique(out, CODES_PREFIX, set(range(6)))  # finished batches were flushed
    monkeypatch.setattr(VQModel, "encode_to_codes", original)
    run([*base, "--output_dir", str(out)])
    assert_complete_and_unique(out, CODES_PREFIX, set(range(9)))
    a, _ = read_folder(tmp_path / "straight", CODES_PREFIX)
    b, _ = read_folder(out, CODES_PREFIX)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_file_list(tmp_path):
    write_checkpoints(tmp_path, "c2i")
    make_image_folder(tmp_path / "data", 3, ["1"], corrupt=False)
    base = [*model_args(tmp_path, "c2i"), "--vq_path", str(tmp_path / "vq.pt"), "--data_path",
            str(tmp_path / "data"), "--output_dir", str(tmp_path / "codes")]
    run(base)
    (tmp_path / "data" / "img00.png").rename(tmp_path / "data" / "img99.png")
    (tmp_path / "data" / "img00.txt").rename(tmp_path / "data" / "img99.txt")
    with pytest.raises(extract_code.UserError, match="different file list"):
        run(base)


def test_shuffled_subset_grows_consistently(tmp_path):
    write_checkpoints(tmp_path, "c2i")
    make_image_folder(tmp_path / "data", 9, ["2"], corrupt=False)
    base = [*model_args(tmp_path, "c2i"), "--vq_path", str(tmp_path / "vq.pt"), "--data_path",
            str(tmp_path / "data"), "--output_dir", str(tmp_path / "codes"), "--shuffle_seed", "42"]
    run([*base, "--num_samples", "3"])
    first, _ = read_folder(tmp_path / "codes", CODES_PREFIX)
    run([*base, "--num_samples", "5"])
    second, names = read_folder(tmp_path / "codes", CODES_PREFIX)
    small, large = set(first["sample_id"].tolist()), set(second["sample_id"].tolist())
    assert len(small) == 3 and len(large) == 5 and small < large and small != {0, 1, 2}
    assert names["names"] == [f"img{i:02d}.png" if i % 4 != 3 else f"img{i:02d}.jpg" for i in sorted(large)]
