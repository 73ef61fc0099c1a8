"""Tests for micro_sam.visualization with constructed inputs whose result is known."""
import subprocess
import sys

import imageio.v3 as imageio
import numpy as np
import pytest

from micro_sam import visualization as vis


def _known_embeddings(h=16, w=20, n_channels=8):
    """Embeddings (1, C, h, w) built from 3 spatial patterns with distinct variances along orthonormal axes.

    Returns the embeddings and the expected PCA projection (h, w, 3) under the sign convention
    "largest-magnitude loading positive".
    """
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    patterns = [yy, xx, yy * xx]
    patterns = [p - p.mean() for p in patterns]
    # Make the patterns exactly uncorrelated (Gram-Schmidt) so they are the principal components.
    ortho = []
    for p in patterns:
        for q in ortho:
            p = p - (p * q).sum() / (q * q).sum() * q
        ortho.append(p)
    scales = [5.0, 3.0, 1.0]
    rng = np.random.default_rng(0)
    axes, _ = np.linalg.qr(rng.standard_normal((n_channels, 3)))
    # Fix the signs so that the largest-magnitude loading of each axis is positive.
    axes = axes * np.sign(axes[np.argmax(np.abs(axes), axis=0), np.arange(3)])
    offset = rng.standard_normal(n_channels)
    emb = offset[:, None, None] + sum(s * p[None] * a[:, None, None] for s, p, a in zip(scales, ortho, axes.T))
    expected = np.stack([s * p for s, p in zip(scales, ortho)], axis=-1)
    return emb[None].astype("float64"), expected


def test_compute_pca_recovers_constructed_components():
    emb, expected = _known_embeddings()
    proj = vis.compute_pca(emb, n_components=3, as_rgb=False)
    assert proj.shape == (16, 20, 3) and proj.dtype == np.float32
    np.testing.assert_allclose(proj, expected, atol=1e-4)


def test_compute_pca_as_rgb_and_volume():
    emb, expected = _known_embeddings()
    rgb = vis.compute_pca(emb)
    assert rgb.shape == (16, 20, 3) and rgb.dtype == np.uint8
    assert rgb.min() == 0 and rgb.max() == 255
    # Joint rescaling of all components: 255 * (x - min) / (max - min) with the global min / max.
    lo, hi = expected.min(), expected.max()
    np.testing.assert_allclose(rgb.astype(float), 255 * (expected - lo) / (hi - lo), atol=1.0)

    volume = np.stack([emb, 2 * emb])  # (z, 1, C, h, w)
    out = vis.compute_pca(volume, as_rgb=False)
    assert out.shape == (2, 16, 20, 3)
    np.testing.assert_allclose(out[1], 2 * out[0], atol=1e-4)

    # A constant embedding gives a black image instead of dividing by zero.
    assert vis.compute_pca(np.ones((1, 4, 5, 5))).max() == 0


@pytest.mark.parametrize("shape,kwargs,match", [
    ((4, 5, 5), {}, "ndim"),
    ((2, 4, 5, 5), {}, "batch"),
    ((1, 4, 5, 5), {"n_components": 2}, "as_rgb"),
    ((1, 4, 5, 5), {"n_components": 5, "as_rgb": False}, "n_components"),
])
def test_compute_pca_bad_input(shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        vis.compute_pca(np.zeros(shape), **kwargs)


def test_project_embeddings_crops_padding():
    emb, _ = _known_embeddings(h=16, w=16)
    # Image of 100 x 200 pixels: SAM pads the height, only the top half of the grid covers the image.
    out, scale = vis.project_embeddings_for_visualization(
        {"features": emb, "input_size": (512, 1024), "original_size": (100, 200)}
    )
    assert out.shape == (8, 16, 3)
    np.testing.assert_array_equal(out, vis.compute_pca(emb)[:8])
    assert scale == (100 / 8, 200 / 16)

    volume = np.stack([emb, emb])
    out, scale = vis.project_embeddings_for_visualization(
        {"features": volume, "input_size": (1024, 512), "original_size": (200, 100)}, as_rgb=False
    )
    assert out.shape == (2, 16, 8, 3)
    assert scale == (1.0, 200 / 16, 100 / 8)


class _TiledFeatures(dict):
    """Minimal stand-in for the zarr group of tiled embeddings (attributes + one array per tile)."""

    def __init__(self, attrs, tiles):
        super().__init__(tiles)
        self.attrs = attrs


def test_project_tiled_embeddings_reassembles_tiles():
    # Per-pixel embeddings of a 50 x 70 image; every tile's embedding grid is its halo-extended region at
    # one grid cell per pixel, padded at the bottom / right to a square, as SAM does.
    rng = np.random.default_rng(1)
    n_channels, shape, tile_shape, halo = 6, (50, 70), (20, 30), (4, 5)
    full = rng.standard_normal((n_channels,) + shape)
    tiles, tile_id = {}, 0
    for y in range(0, shape[0], tile_shape[0]):
        for x in range(0, shape[1], tile_shape[1]):
            y0, x0 = max(y - halo[0], 0), max(x - halo[1], 0)
            y1 = min(y + tile_shape[0], shape[0]) + halo[0]
            x1 = min(x + tile_shape[1], shape[1]) + halo[1]
            region = full[:, y0:min(y1, shape[0]), x0:min(x1, shape[1])]
            side = max(region.shape[1:])
            padded = np.zeros((n_channels, side, side))
            padded[:, :region.shape[1], :region.shape[2]] = region
            tiles[str(tile_id)] = padded[None]
            tile_id += 1
    features = _TiledFeatures({"shape": shape, "tile_shape": tile_shape, "halo": halo}, tiles)
    mosaic, _ = vis._tiled_embedding_mosaic(features)
    np.testing.assert_allclose(mosaic, full[None])

    out, scale = vis.project_embeddings_for_visualization(
        {"features": features, "input_size": None, "original_size": None}
    )
    np.testing.assert_array_equal(out, vis.compute_pca(full[None]))
    assert scale == (1.0, 1.0)

    # A tile that was not computed (e.g. outside a mask) is filled with zeros of the inner tile's size.
    del features["4"]  # grid position (1, 1): rows 20:40, columns 30:60
    mosaic, _ = vis._tiled_embedding_mosaic(features)
    expected = full.copy()
    expected[:, 20:40, 30:60] = 0
    np.testing.assert_allclose(mosaic, expected[None])


#
# Overlays
#

def _image_and_labels():
    image = np.tile(np.arange(0, 200, 10, dtype="uint8"), (12, 1))  # 12 x 20, varying grey values
    labels = np.zeros((12, 20), dtype="uint16")
    labels[2:7, 2:8] = 1
    labels[2:7, 8:13] = 5  # touches object 1
    labels[8:11, 14:19] = 2
    return image, labels


def test_overlay_blends_objects_and_keeps_background():
    image, labels = _image_and_labels()
    out = vis.overlay_segmentation(image, labels, alpha=0.4, boundaries=False)
    assert out.shape == (12, 20, 3) and out.dtype == np.uint8
    bg = labels == 0
    np.testing.assert_array_equal(out[bg], np.repeat(image[bg][:, None], 3, axis=1))
    colours = vis.label_colors([1, 2, 5])
    for lid, colour in zip([1, 2, 5], colours):
        m = labels == lid
        expected = np.round(0.6 * image[m][:, None] + 0.4 * colour[None].astype(float))
        np.testing.assert_array_equal(out[m], expected.astype("uint8"))


def test_overlay_boundaries_are_drawn_in_full_colour():
    image, labels = _image_and_labels()
    out = vis.overlay_segmentation(image, labels, alpha=0.3)
    c1, c2, c5 = vis.label_colors([1, 2, 5])
    # Border pixels of the objects, including the shared border of 1 and 5.
    np.testing.assert_array_equal(out[2, 2], c1)
    np.testing.assert_array_equal(out[4, 7], c1)
    np.testing.assert_array_equal(out[4, 8], c5)
    np.testing.assert_array_equal(out[10, 18], c2)
    # An interior pixel is blended, not the pure colour.
    np.testing.assert_array_equal(out[4, 4], np.round(0.7 * image[4, 4] + 0.3 * c1.astype(float)).astype("uint8"))
    # Background stays untouched also with boundaries.
    np.testing.assert_array_equal(out[0], np.repeat(image[0][:, None], 3, axis=1))


def test_overlay_identity_and_colours():
    image, labels = _image_and_labels()
    out = vis.overlay_segmentation(image, labels, alpha=0.0, boundaries=False)
    np.testing.assert_array_equal(out, np.repeat(image[..., None], 3, axis=-1))
    # Colours depend only on the id (and seed): deterministic, distinct for neighbouring ids.
    colours = vis.label_colors(np.arange(1, 50))
    np.testing.assert_array_equal(colours[4], vis.label_colors([5])[0])
    assert len({tuple(c) for c in colours}) == 49
    assert not np.array_equal(vis.label_colors([1, 2], seed=1), vis.label_colors([1, 2], seed=0))
    np.testing.assert_array_equal(vis.overlay_segmentation(image, labels), vis.overlay_segmentation(image, labels))


def test_overlay_rescales_other_dtypes_and_rgb():
    image, labels = _image_and_labels()
    img16 = image.astype("uint16") * 300
    out = vis.overlay_segmentation(img16, np.zeros_like(labels))
    grey = out[..., 0].astype(int)
    assert grey.min() == 0 and grey.max() == 255
    assert np.all(np.diff(grey[0]) >= 0)  # monotonic mapping

    rgb = np.stack([image, 255 - image, np.zeros_like(image)], axis=-1)
    out = vis.overlay_segmentation(rgb, labels, alpha=0.5)
    np.testing.assert_array_equal(out[labels == 0], rgb[labels == 0])


@pytest.mark.parametrize("labels,kwargs,match", [
    (np.zeros((5, 5), dtype=int), {}, "shape"),
    (np.zeros((12, 20), dtype=float), {}, "integer"),
    (np.full((12, 20), -1), {}, "non-negative"),
    (np.zeros((12, 20), dtype=int), {"alpha": 1.5}, "alpha"),
])
def test_overlay_bad_input(labels, kwargs, match):
    image, _ = _image_and_labels()
    with pytest.raises(ValueError, match=match):
        vis.overlay_segmentation(image, labels, **kwargs)


def test_save_overlay_writes_png(tmp_path):
    image, labels = _image_and_labels()
    path = vis.save_overlay(tmp_path / "overlay.png", image, labels, alpha=0.5)
    assert path == str(tmp_path / "overlay.png")
    np.testing.assert_array_equal(imageio.imread(path), vis.overlay_segmentation(image, labels, alpha=0.5))
    with pytest.raises(ValueError, match="does not exist"):
        vis.save_overlay(tmp_path / "missing" / "overlay.png", image, labels)


def test_matplotlib_not_imported():
    code = "import sys, micro_sam.visualization; print('matplotlib' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
