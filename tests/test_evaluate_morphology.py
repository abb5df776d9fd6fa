"""Morphology features against scikit-image's regionprops, perimeter and graycoprops."""

import numpy as np
import pytest
from skimage.draw import ellipse
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import regionprops

from spatia.errors import InputDataError
from spatia.evaluate.morphology import TEXTURE_PROPS, glcm_batch, glcm_props, morphology_features


@pytest.fixture(scope="module")
def crops():
    rng = np.random.default_rng(0)
    n, s = 60, 40
    masks = np.zeros((n, s, s), dtype=bool)
    for k in range(n):
        rr, cc = ellipse(20 + rng.integers(-3, 4), 20 + rng.integers(-3, 4), rng.integers(3, 15), rng.integers(3, 15),
                         shape=(s, s), rotation=rng.uniform(0, np.pi))
        masks[k, rr, cc] = True
        masks[k, rng.integers(0, s, 6), rng.integers(0, s, 6)] = False  # holes: non-convex shapes
    images = rng.integers(0, 256, size=(n, s, s)).astype(np.uint8)
    return images, masks


def test_shape_and_intensity_match_skimage(crops):
    images, masks = crops
    df = morphology_features(images, masks, batch_size=16)  # several batches
    assert df.shape[0] == len(images) and np.isfinite(df.to_numpy()).all()
    for k in range(len(images)):
        props = regionprops(masks[k].astype(np.uint8))[0]
        values = images[k][masks[k]]
        expected = {
            "area_px": props.area, "perimeter_px": props.perimeter, "major_axis_px": props.axis_major_length,
            "minor_axis_px": props.axis_minor_length, "eccentricity": props.eccentricity, "extent": props.extent,
            "mean": values.mean(), "std": values.std(), "min": values.min(), "max": values.max(),
            "q10": np.quantile(values, 0.1), "median": np.median(values), "q75": np.quantile(values, 0.75),
            "integrated": values.sum(),
        }
        for name, value in expected.items():
            assert df.loc[k, name] == pytest.approx(value, rel=1e-9, abs=1e-9), name
        # solidity uses the hull of pixel squares: close to skimage's, never above 1
        assert 0 < df.loc[k, "solidity"] <= 1.0
        assert df.loc[k, "solidity"] == pytest.approx(props.solidity, abs=0.1)
        assert df.loc[k, "form_factor"] == pytest.approx(4 * np.pi * props.area / props.perimeter**2)


def test_masked_glcm_matches_skimage_with_background_level(crops):
    images, masks = crops
    levels = 16
    q = (images.astype(np.int64) * levels) // 256
    for d in (1, 3):
        p = glcm_batch(q, masks, levels, d)
        for k in range(5):
            # reference: shift the cell's levels to 1..L, background 0, drop level 0 and renormalise
            shifted = np.where(masks[k], q[k] + 1, 0).astype(np.uint8)
            ref = graycomatrix(shifted, [d], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=levels + 1,
                               symmetric=True, normed=False)[1:, 1:].astype(np.float64)
            ref /= ref.sum(axis=(0, 1), keepdims=True)
            assert np.allclose(p[k].transpose(1, 2, 0), ref[:, :, 0, :])
            ours = glcm_props(p[k])
            for prop in TEXTURE_PROPS:
                assert np.allclose(ours[prop], graycoprops(ref, prop)[0]), prop


def test_texture_features_with_full_masks_equal_graycoprops(crops):
    images, _ = crops
    full = np.ones(images.shape, dtype=bool)
    df = morphology_features(images[:4], full[:4], levels=32, distances=(2,))
    for k in range(4):
        g = graycomatrix(((images[k].astype(int) * 32) // 256).astype(np.uint8), [2],
                         [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32, symmetric=True, normed=True)
        for prop in TEXTURE_PROPS:
            assert df.loc[k, f"glcm_{prop}_d2"] == pytest.approx(graycoprops(g, prop).mean())


def test_empty_masks_tiny_cells_and_channels():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 2, 16, 16)).astype(np.uint8)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[1, 5, 5] = True  # one pixel: shape and intensity defined, texture undefined
    masks[2, 4:12, 3:9] = True
    df = morphology_features(images, masks, channel_names=["dapi", "membrane"], index=["a", "b", "c"])
    assert list(df.index) == ["a", "b", "c"]
    assert {"dapi_mean", "membrane_glcm_contrast_d1", "area_px"} <= set(df.columns)
    assert df.loc["a"].isna().all()
    assert df.loc["b", "area_px"] == 1 and df.loc["b", "dapi_mean"] == images[1, 0, 5, 5]
    assert np.isnan(df.loc["b", "dapi_glcm_contrast_d1"])
    assert df.loc["c", "extent"] == 1.0 and df.loc["c", "solidity"] == pytest.approx(1.0)
    assert df.loc["c", "area_px"] == 48 and df.loc["c", "perimeter_px"] > 0


def test_bad_inputs_raise_input_errors():
    with pytest.raises(InputDataError, match="uint8"):
        morphology_features(np.zeros((2, 8, 8), np.float32), np.ones((2, 8, 8), bool))
    with pytest.raises(InputDataError, match="does not match"):
        morphology_features(np.zeros((2, 8, 8), np.uint8), np.ones((3, 8, 8), bool))
