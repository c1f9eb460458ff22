"""Evaluation metrics (SPEC §8): FID / KID / IS on the FID Inception, improved precision / recall, the demo's
own metrics, and the eval_fid_clip / eval_prec_recall commands end to end (CLIP and HPS: test_eval_clip.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from eval_weights import smooth_images, write_fid_inception, write_images
from PIL import Image
from torch import nn

import main as cli
from models import evaluation as ev

CPU = torch.device("cpu")


class _MeanColour(nn.Module):
    """Stand-in feature extractor: per-channel means and stds (6-d), fast and deterministic."""

    size = 8
    primary = "features"

    @staticmethod
    def preprocess(img, eval_res=None):
        return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)

    def forward(self, images):
        return {"features": torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)}


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return write_fid_inception(tmp_path_factory.mktemp("weights") / "weights-inception-2015-12-05-6726825d.pth")


# --------------------------------------------------------------------------------------------- image folders


def test_generated_folder_is_ordered_by_prompt_index(tmp_path):
    write_images(tmp_path, ["prompt_10.png", "prompt_9.png", "prompt_0.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in ev.list_images(tmp_path)] == ["prompt_0.png", "prompt_9.png", "prompt_10.png"]
    assert [p.name for p in ev.list_images(tmp_path, how_many=2)] == ["prompt_0.png", "prompt_9.png"]


def test_captions_pair_images_by_their_prompt_index(tmp_path):
    paths = ev.list_images(write_images(tmp_path / "imgs", ["prompt_3.png", "prompt_1.png"]))
    stats = {"prompt_1": {"prompt": "a dog"}, "prompt_3": {"prompt": "a cat"}, "prompt_9": {"prompt": "unused"}}
    (tmp_path / "global_statistics_0_10.json").write_text(json.dumps(stats))
    assert ev.load_captions(tmp_path / "global_statistics_0_10.json", paths) == ["a dog", "a cat"]
    (tmp_path / "caps.txt").write_text("zero\none\ntwo\nthree\n")  # prompt_{idx} gets line idx, as the original
    assert ev.load_captions(tmp_path / "caps.txt", paths) == ["one", "three"]
    (tmp_path / "caps.json").write_text(json.dumps(["z", {"caption": "o"}, "t", "th"]))
    assert ev.load_captions(tmp_path / "caps.json", paths) == ["o", "th"]
    (tmp_path / "p.tsv").write_text("Prompt\tCategory\na\tx\nb\tx\n")
    with pytest.raises(ValueError, match="needs index 3"):
        ev.load_captions(tmp_path / "p.tsv", paths)
    with pytest.raises(ValueError, match="no prompt"):
        ev.load_captions(tmp_path / "global_statistics_0_10.json", [tmp_path / "prompt_5.png"])


def test_fid_preprocessing_is_the_originals_crop_lanczos_then_clean_resize():
    # a 60×30 image: red | green | blue strips of 15, 30, 15 columns. The long-edge centre crop keeps green only.
    arr = np.zeros((30, 60, 3), dtype=np.uint8)
    arr[:, :15, 0], arr[:, 15:45, 1], arr[:, 45:, 2] = 255, 255, 255
    cropped = ev.original_eval_resize(Image.fromarray(arr), 256)
    assert cropped.size == (256, 256)
    assert np.array_equal(np.unique(np.asarray(cropped).reshape(-1, 3), axis=0), [[0, 255, 0]])
    x = ev.FIDInception.preprocess(Image.fromarray(smooth_images(1, 64, seed=0)[0]))
    assert x.shape == (3, 299, 299) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 255
    assert (x != x.round()).any(), "clean mode does not quantise after the bicubic resize"
    # clean resize of one channel is PIL's float ("F") bicubic; on a constant image it is exact
    const = np.full((40, 50, 3), 77, dtype=np.uint8)
    assert np.array_equal(ev.clean_resize(const), np.full((299, 299, 3), 77, dtype=np.float32))


# ---------------------------------------------------------------------------------------------- Inception


def test_project_inception_features_equal_torch_fidelity(inception_file):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(inception_file))
    ours = ev.load_inception(inception_file, CPU)
    images = torch.from_numpy(np.stack(smooth_images(2, 299, seed=1))).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        pool3, logits = ref(images)
        got = ours(images.float())
    assert pool3.std(dim=0).mean() > 1e-2, "random weights must give image-dependent features"
    torch.testing.assert_close(got["pool3"], pool3, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["logits_unbiased"], logits, atol=1e-5, rtol=0)


def test_torchvision_imagenet_inception_is_refused(tmp_path):
    from torchvision.models import inception_v3

    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tmp_path / "tv.pth")
    with pytest.raises(ValueError, match="different network"):
        ev.load_inception(tmp_path / "tv.pth", CPU)


def test_frechet_distance_agrees_with_torch_fidelitys(tmp_path):
    """Same formula as clean-fid / pytorch-fid (scipy sqrtm, what the original ran); torch-fidelity takes the
    trace through eigenvalues instead, so the two agree to rounding, not bit for bit."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(40, 12)), rng.normal(size=(50, 12)) * 1.5 + 0.3
    (mu1, s1), (mu2, s2) = ev.feature_statistics(a), ev.feature_statistics(b)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-10)


def test_fid_from_features_low_rank_path_equals_sqrtm():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(10, 30)), rng.normal(size=(14, 30)) + 0.5  # N < D: rank-deficient covariances
    direct = ev.frechet_distance(*ev.feature_statistics(a), *ev.feature_statistics(b))
    assert ev.fid_from_features(a, b) == pytest.approx(direct, rel=1e-6)
    assert ev.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    c, d = rng.normal(size=(40, 5)), rng.normal(size=(45, 5))  # N > D: the libraries' formula itself
    assert ev.fid_from_features(c, d) == ev.frechet_distance(*ev.feature_statistics(c), *ev.feature_statistics(d))


def test_kid_and_inception_score_known_cases():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 8))
    same, _ = ev.kernel_inception_distance(x, x.copy(), subset_size=50, subsets=10)
    far, _ = ev.kernel_inception_distance(x, x + 3.0, subset_size=50, subsets=10)
    assert far > 10 * abs(same)  # unbiased MMD²: ≈ 0 (either sign) for one distribution, large for shifted
    assert ev.inception_score(np.zeros((20, 10)), splits=2)[0] == pytest.approx(1.0)  # no confidence: IS 1
    confident = np.full((100, 10), -50.0)
    confident[np.arange(100), np.arange(100) % 10] = 50.0
    assert ev.inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)  # 10 sure, balanced classes


# ---------------------------------------------------------------------------------------------------- FID


def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 5))
    mu, sigma = ev.feature_statistics(a)
    assert ev.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_one_dimensional_closed_form():
    # d² = (m1 - m2)² + (s1 - s2)² for N(m1, s1²) and N(m2, s2²)
    d = ev.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert d == pytest.approx(3.0**2 + (2.0 - 3.0) ** 2)


def test_frechet_distance_diagonal_closed_form_and_symmetry():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    d12 = ev.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert d12 == pytest.approx(expected)
    assert ev.frechet_distance(mu2, np.diag(s2), mu1, np.diag(s1)) == pytest.approx(d12)


def test_frechet_distance_survives_singular_covariances():
    rng = np.random.default_rng(1)
    mu, sigma = ev.feature_statistics(rng.normal(size=(3, 8)))  # rank 2 covariance in 8-d
    assert ev.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-4)


# ------------------------------------------------------------------------------------- precision / recall


def test_identical_sets_have_full_precision_and_recall():
    x = np.random.default_rng(0).normal(size=(50, 4))
    assert ev.improved_precision_recall(x, x, k=3) == (1.0, 1.0)


def test_far_apart_sets_have_zero_precision_and_recall():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 4)), rng.normal(size=(30, 4)) + 100.0
    assert ev.improved_precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_subset_case_with_known_answer():
    # real: 0..9 on a line, fake: 0..4. k = 1 -> every radius is 1. All fake points are real points (precision 1);
    # real 0..4 are fake points and real 5 is within 1 of fake 4, real 6..9 are outside (recall 6/10).
    real = np.arange(10, dtype=np.float64)[:, None]
    fake = np.arange(5, dtype=np.float64)[:, None]
    precision, recall = ev.improved_precision_recall(real, fake, k=1, batch_size=3)
    assert precision == 1.0 and recall == pytest.approx(0.6)


def test_knn_radii_exclude_the_sample_itself_and_batching_is_exact():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    assert ev.knn_radii(x, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert ev.knn_radii(x, k=2, batch_size=1).tolist() == [3.0, 2.0, 3.0, 6.0]
    with pytest.raises(ValueError, match="more than"):
        ev.knn_radii(x, k=4)


# ------------------------------------------------------------------------------------------- demo metrics


def test_demo_quality_separates_real_digits_from_noise():
    from models.demo.classifier import load_classifier
    from models.demo.data import load_digit_images

    path = ev.default_classifier_path()
    if not path.exists():
        pytest.skip("bundled demo classifier not present")
    clf = load_classifier(path, CPU)
    images, labels = load_digit_images()
    real = ev.demo_quality(clf, images[:60], labels[:60])
    noise = ev.demo_quality(clf, torch.rand(60, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                            labels[:60])
    assert real["accuracy"] > 0.9 and noise["accuracy"] < 0.5
    assert real["demo_fid"] < noise["demo_fid"] / 5
    assert real["precision"] > 0.9 and noise["precision"] < 0.2


# ------------------------------------------------------------------------------------------- entry points


@pytest.fixture
def folders(tmp_path):
    fake = write_images(tmp_path / "fake", [f"prompt_{i}.png" for i in range(5)], seed=1)
    ref = write_images(tmp_path / "ref", [f"{i:012d}.jpg" for i in range(6)], seed=2)
    stats = {f"prompt_{i}": {"prompt": f"a photo number {i}"} for i in range(5)}
    (fake / "global_statistics_0_5.json").write_text(json.dumps(stats))
    return fake, ref


def test_eval_fid_clip_with_the_fid_inception_layout(inception_file, tmp_path, capsys):
    """FID of a folder against itself is 0 and against noise is large; KID and IS come along; the reference
    statistics cached to .npz give the same FID without re-extracting."""
    same = write_images(tmp_path / "a", [f"prompt_{i}.png" for i in range(4)], arrays=smooth_images(4, 48, 7))
    noise = write_images(tmp_path / "noise", [f"n{i}.png" for i in range(4)], size=48, seed=3)
    args = ["eval_fid_clip", "--fake_dir", str(same), "--inception_path", str(inception_file), "--device", "cpu",
            "--batch_size", "2"]
    cli.main(args + ["--ref_dir", str(same), "--output", str(tmp_path / "self.json"),
                     "--save_ref_stats", str(tmp_path / "ref.npz")])
    cli.main(args + ["--ref_dir", str(noise), "--output", str(tmp_path / "noise.json")])
    self_fid = json.loads((tmp_path / "self.json").read_text())
    noise_fid = json.loads((tmp_path / "noise.json").read_text())
    assert abs(self_fid["fid"]) < 1e-6 and noise_fid["fid"] > 1.0
    assert noise_fid["kid_mean"] > self_fid["kid_mean"] and "inception_score_mean" in noise_fid
    assert "FID_256px" in capsys.readouterr().out
    with np.load(tmp_path / "ref.npz") as z:
        assert z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048)
    cli.main(args + ["--ref_dir", str(tmp_path / "ref.npz"), "--output", str(tmp_path / "npz.json")])
    assert json.loads((tmp_path / "npz.json").read_text())["fid"] == pytest.approx(self_fid["fid"], abs=1e-6)
    with pytest.raises(SystemExit):  # statistics made at another --eval_res are refused, not silently compared
        cli.main(args + ["--ref_dir", str(tmp_path / "ref.npz"), "--eval_res", "128"])
    assert "eval_res 256" in capsys.readouterr().err


def test_eval_fid_clip_demo_features_against_the_bundled_digits(tmp_path):
    from models.demo.data import load_digit_images

    if not ev.default_classifier_path().exists():
        pytest.skip("bundled demo classifier not present")
    images, labels = load_digit_images()
    arrays = [((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8) for x in images[:30]]
    real = write_images(tmp_path / "real", [f"prompt_{i}.png" for i in range(30)], arrays=arrays)
    (real / "global_statistics_0_30.json").write_text(json.dumps(
        {f"prompt_{i}": {"prompt": str(int(labels[i]))} for i in range(30)}))
    noise = write_images(tmp_path / "noise", [f"prompt_{i}.png" for i in range(30)], size=32, seed=0)
    out = {}
    for name, folder in (("real", real), ("noise", noise)):
        cli.main(["eval_fid_clip", "--fake_dir", str(folder), "--ref_dir", "digits", "--feature_extractor", "demo",
                  "--caption_path", str(real / "global_statistics_0_30.json"), "--output", str(tmp_path / f"{name}.json")])
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert out["real"]["class_accuracy"] > 0.9 and out["noise"]["class_accuracy"] < 0.5
    assert out["real"]["demo_fid"] < out["noise"]["demo_fid"] / 5 and out["real"]["num_ref"] == 1797
    # reference statistics without features (mu, sigma only, as other tools write them) use the sqrtm path
    feats = ev.digit_reference_features(ev.load_demo_features(None, CPU))
    mu, sigma = ev.feature_statistics(feats)
    np.savez(tmp_path / "digits_stats.npz", mu=mu, sigma=sigma)
    cli.main(["eval_fid_clip", "--fake_dir", str(real), "--ref_dir", str(tmp_path / "digits_stats.npz"),
              "--feature_extractor", "demo", "--output", str(tmp_path / "stats.json")])
    assert json.loads((tmp_path / "stats.json").read_text())["demo_fid"] == pytest.approx(out["real"]["demo_fid"],
                                                                                        rel=1e-4)
    cli.main(["eval_prec_recall", "--fake_dir", str(real), "--ref_dir", "digits", "--feature_extractor", "demo",
              "--output", str(tmp_path / "pr.json")])
    pr = json.loads((tmp_path / "pr.json").read_text())
    assert pr["precision"] > 0.9 and pr["num_ref"] == 1797


def test_eval_prec_recall_cli_reports_precision_and_recall(folders, tmp_path, monkeypatch, capsys):
    fake, ref = folders
    monkeypatch.setattr(ev, "load_vgg16", lambda path, device: _MeanColour())
    cli.main(["eval_prec_recall", "--fake_dir", str(fake), "--ref_dir", str(ref), "--k", "2",
              "--output", str(tmp_path / "pr.json"), "--device", "cpu"])
    report = json.loads((tmp_path / "pr.json").read_text())
    assert 0.0 <= report["precision"] <= 1.0 and 0.0 <= report["recall"] <= 1.0
    assert report["k"] == 2 and report["num_fake"] == 5 and report["num_ref"] == 6
    cli.main(["eval_prec_recall", "--fake_dir", str(fake), "--ref_dir", str(fake), "--k", "2"])
    same = json.loads((fake / "eval_prec_recall.json").read_text())
    assert (same["precision"], same["recall"]) == (1.0, 1.0)
    assert "precision" in capsys.readouterr().out


def test_vgg16_preprocessing_is_the_originals_bilinear_224_squash():
    arr = np.zeros((30, 60, 3), dtype=np.uint8)
    arr[:, :15, 0] = 255  # red strip on the left survives: no crop, the aspect ratio is squashed
    x = ev.VGG16Fc2.preprocess(Image.fromarray(arr))
    assert x.shape == (3, 224, 224) and x[0, :, :40].mean() > 0.9
    expected = np.asarray(Image.fromarray(arr).resize((224, 224), Image.BILINEAR), dtype=np.float32) / 255
    torch.testing.assert_close(x, torch.from_numpy(expected).permute(2, 0, 1))


def test_vgg16_layout_is_checked_key_by_key(tmp_path):
    from torchvision.models import vgg16

    with torch.device("meta"):
        layout = vgg16(weights=None).state_dict()
    ev.check_state_dict(layout, dict(layout), "--vgg_path", tmp_path, "vgg16")  # the real names and shapes pass
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="--vgg_path.*not a torchvision vgg16.*missing"):
        ev.load_vgg16(tmp_path / "partial.pth", CPU)


@pytest.mark.parametrize("task, flag, filename", [
    ("eval_fid_clip", "--inception_path", "weights-inception-2015-12-05-6726825d.pth"),
    ("eval_prec_recall", "--vgg_path", "vgg16-397923af.pth"),
    ("eval_fid_clip", "--clip_path", "ViT-B-32.pt"),
])
def test_missing_weights_exit_2_naming_the_flag_and_file_before_any_extraction(folders, tmp_path, monkeypatch,
                                                                              capsys, inception_file, task, flag,
                                                                              filename):
    fake, ref = folders
    monkeypatch.setattr(ev, "extract_features", lambda *a, **k: pytest.fail("features extracted before the check"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [task, "--fake_dir", str(fake), "--ref_dir", str(ref), flag, str(tmp_path / "missing" / filename)]
    if flag == "--clip_path":
        argv += ["--inception_path", str(inception_file), "--caption_path", str(fake / "global_statistics_0_5.json")]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and filename in err and "never downloaded" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_default_weight_locations_are_named_when_no_flag_is_given(folders, capsys):
    fake, ref = folders
    if ev.INCEPTION_WEIGHTS.default.exists():
        pytest.skip("FID Inception weights are installed at the default location")
    with pytest.raises(SystemExit):
        cli.main(["eval_fid_clip", "--fake_dir", str(fake), "--ref_dir", str(ref)])
    assert "ckpts/eval/weights-inception-2015-12-05-6726825d.pth" in capsys.readouterr().err


@pytest.mark.slow
def test_fid_equals_torch_fidelitys_own_pipeline(inception_file, tmp_path):
    """On 299-px images and --eval_res 0 the project's FID/KID equal torch-fidelity's calculate_metrics."""
    import torch_fidelity

    a = write_images(tmp_path / "a", [f"{i}.png" for i in range(6)], arrays=smooth_images(6, 299, 1))
    b = write_images(tmp_path / "b", [f"{i}.png" for i in range(6)], arrays=smooth_images(6, 299, 2))
    theirs = torch_fidelity.calculate_metrics(input1=str(a), input2=str(b), fid=True, kid=True, cuda=False,
                                              cache=False, verbose=False, kid_subset_size=6,
                                              feature_extractor_weights_path=str(inception_file))
    cli.main(["eval_fid_clip", "--fake_dir", str(a), "--ref_dir", str(b), "--eval_res", "0", "--inception_path",
              str(inception_file), "--kid_subset_size", "6", "--output", str(tmp_path / "ours.json")])
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)


@pytest.mark.slow
def test_eval_prec_recall_with_the_real_vgg16_layout(folders, tmp_path):
    from torchvision.models import vgg16

    fake, ref = folders
    torch.save({"state_dict": vgg16(weights=None).state_dict()}, tmp_path / "vgg.pth")
    cli.main(["eval_prec_recall", "--fake_dir", str(fake), "--ref_dir", str(ref), "--vgg_path",
              str(tmp_path / "vgg.pth"), "--device", "cpu", "--output", str(tmp_path / "pr.json")])
    report = json.loads((tmp_path / "pr.json").read_text())
    assert 0.0 <= report["precision"] <= 1.0 and 0.0 <= report["recall"] <= 1.0
