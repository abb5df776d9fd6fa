"""Feature extractors, FID/KID plumbing, morphology statistics and image quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from spatia.errors import InputDataError
from spatia.flow.features import FIDInceptionV3, RandomConvFeatures, extract, resize_bilinear_tf1
from spatia.flow.metrics import distribution_scores, fid_kid, nucleus_masks, zscore_on_real
from spatia.flow.quality import psnr, ssim

# a sample of torchvision Inception3 state-dict names (aux_logits=False) with shapes
TORCHVISION_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7c.branch3x3dbl_3b.bn.running_var": (384,),
    "fc.weight": (1008, 2048),
}


def test_inception_key_names_forward_shape_and_weight_loading(tmp_path):
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    state = model.state_dict()
    for key, shape in TORCHVISION_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert not any("AuxLogits" in k for k in state)
    n_params = sum(p.numel() for p in model.parameters())
    # torchvision's inception_v3 has 27,161,264 parameters; less AuxLogits (3,326,696) = 23,834,568, whose
    # fc has 1,000 classes; the FID weights' fc has 1,008
    assert n_params == 23_834_568 - (2048 * 1000 + 1000) + (2048 * 1008 + 1008)
    images = torch.randint(0, 256, (2, 40, 40), dtype=torch.uint8)
    feats = model(images)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    loaded = FIDInceptionV3.from_weights(path)
    assert torch.allclose(loaded(images), feats)
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(InputDataError):
        FIDInceptionV3.from_weights(tmp_path / "bad.pth")
    with pytest.raises(InputDataError):
        FIDInceptionV3.from_weights(tmp_path / "missing.pth")


def test_tf1_bilinear_resize_by_hand():
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    y = resize_bilinear_tf1(x, 4)
    # source coordinate dst * 2 / 4 = 0, 0.5, 1, 1.5 (edge-clamped): no half-pixel offset
    row = torch.tensor([0.0, 5.0, 10.0, 10.0])
    assert torch.allclose(y[0, 0, 0], row)
    assert torch.allclose(y[0, 0, :, 0], torch.tensor([0.0, 10.0, 20.0, 20.0]))
    assert torch.allclose(resize_bilinear_tf1(x, 2), x)


def test_random_features_are_fixed_by_the_seed():
    images = torch.randint(0, 256, (4, 64, 64), dtype=torch.uint8)
    a, b, c = RandomConvFeatures(0), RandomConvFeatures(0), RandomConvFeatures(1)
    assert torch.equal(a(images), b(images))
    assert not torch.allclose(a(images), c(images))
    assert extract(a, images, batch_size=3).shape == (4, a.num_features)


def test_fid_kid_known_answers():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    same = fid_kid(real, real.clone(), kid_subsets=20, kid_subset_size=100, seed=0)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    # FID of a pure mean shift = ||shift||^2 (same covariance)
    shifted = fid_kid(real, real + 2.0, kid_subsets=20, kid_subset_size=100, seed=0)
    assert shifted["fid"] == pytest.approx(20.0, rel=1e-6)
    assert abs(same["kid"]) < 0.1 * shifted["kid"]  # unbiased KID: ~0 for one distribution
    k1 = fid_kid(real, real + 0.5, kid_subsets=5, kid_subset_size=50, seed=7)
    k2 = fid_kid(real, real + 0.5, kid_subsets=5, kid_subset_size=50, seed=7)
    k3 = fid_kid(real, real + 0.5, kid_subsets=5, kid_subset_size=50, seed=8)
    assert k1["kid"] == k2["kid"] != k3["kid"]  # seeded subset draws
    assert fid_kid(real[:1], real, kid_subsets=1, kid_subset_size=1, seed=0)["fid"] is None


def test_ks_and_wasserstein_match_scipy():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 3))
    fake = rng.normal(0.5, 2.0, size=(150, 3))
    fake[3, 1] = np.nan  # an empty mask: dropped from that feature only
    scores = distribution_scores(real, fake)
    ks = [stats.ks_2samp(real[:, f], fake[np.isfinite(fake[:, f]), f]).statistic for f in range(3)]
    w1 = [stats.wasserstein_distance(real[:, f], fake[np.isfinite(fake[:, f]), f]) for f in range(3)]
    assert scores["ks"] == pytest.approx(np.mean(ks)) and scores["wasserstein"] == pytest.approx(np.mean(w1))
    assert scores["n_features"] == 3
    same = distribution_scores(real, real)
    assert same["ks"] == 0.0 and same["wasserstein"] == 0.0


def test_zscore_uses_the_real_statistics_and_drops_constant_features():
    import pandas as pd

    real = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [5.0, 5.0, 5.0]})
    fake = pd.DataFrame({"a": [2.0, 4.0], "b": [1.0, 2.0]})
    rz, fz = zscore_on_real(real, fake)
    assert rz.shape == (3, 1) and np.allclose(fz[:, 0], [0.0, 2.0])


def test_nucleus_masks_keep_the_largest_bright_blob():
    img = np.zeros((1, 32, 32), np.uint8)
    yy, xx = np.mgrid[:32, :32]
    img[0][(yy - 12) ** 2 + (xx - 12) ** 2 < 36] = 200
    img[0][28:30, 28:30] = 220  # a small bright speck
    img[0][(yy - 12) ** 2 + (xx - 12) ** 2 >= 100] = np.maximum(img[0][(yy - 12) ** 2 + (xx - 12) ** 2 >= 100], 20)
    m = nucleus_masks(img, 0.5)
    assert m[0, 12, 12] and not m[0, 28, 28] and m[0].sum() == ((yy - 12) ** 2 + (xx - 12) ** 2 < 36).sum()
    assert not nucleus_masks(np.zeros((1, 8, 8), np.uint8)).any()


def test_psnr_ssim_match_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 40, 40)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    ref_ssim = [skm.structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                          data_range=255) for i in range(3)]
    ref_psnr = [skm.peak_signal_noise_ratio(a[i], b[i], data_range=255) for i in range(3)]
    assert np.allclose(ssim(a, b), ref_ssim, atol=1e-5)
    assert np.allclose(psnr(a, b), ref_psnr)
    assert ssim(a, a) == pytest.approx(np.ones(3), abs=1e-6)


def _ellipse_crops(semi_major_px: np.ndarray, size_px: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[:size_px, :size_px] - size_px / 2 + 0.5
    return np.stack([np.where((xx / a) ** 2 + (yy / 6.0) ** 2 <= 1, 200, 0).astype(np.uint8) for a in semi_major_px])


def _write_generated(path, generated, target, control, target_ids, transitions):
    path.mkdir()
    np.savez(path / "generated.npz", generated_images=generated, tgt_images=target, ctrl_images=control,
             x_tgt_id=np.asarray(target_ids), transition_tag=np.asarray(transitions))


def test_niche_dependence_ranks_crops_that_follow_the_ground_truth_strength(tmp_path):
    """Known answer: targets elongate with the recorded shift strength s; a generator that copies
    that dependence scores a niche Spearman near the real targets', one that ignores s near 0."""
    import pandas as pd

    from spatia.flow.niche import niche_dependence

    rng = np.random.default_rng(0)
    n = 60
    s = rng.uniform(0.0, 2.0, n)
    ids = [f"cell{i}" for i in range(n)]
    pd.DataFrame({"cell_id": ids, "morphology_shift_strength": s}).to_parquet(tmp_path / "truth.parquet")
    target = _ellipse_crops(8 + 5 * s)
    follows = _ellipse_crops(8 + 5 * s + rng.normal(0, 0.5, n))
    ignores = _ellipse_crops(np.full(n, 13.0) + rng.normal(0, 2.0, n))
    control = _ellipse_crops(np.full(n, 8.0))
    transitions = ["t1"] * n
    _write_generated(tmp_path / "follows", follows, target, control, ids, transitions)
    _write_generated(tmp_path / "ignores", ignores, target, control, ids, transitions)
    out = niche_dependence({"follows": tmp_path / "follows", "ignores": tmp_path / "ignores"}, tmp_path / "truth.parquet")
    rho = {k: v["mean_per_transition"] for k, v in out["niche_spearman"].items()}
    assert rho["target"] > 0.9 and rho["follows"] > 0.8
    assert abs(rho["ignores"]) < 0.35
    assert out["n_pairs"] == {"t1": n}
    pd.DataFrame({"cell_id": ids[:-1], "morphology_shift_strength": s[:-1]}).to_parquet(tmp_path / "short.parquet")
    with pytest.raises(InputDataError, match="not in the ground truth"):
        niche_dependence({"follows": tmp_path / "follows"}, tmp_path / "short.parquet")
