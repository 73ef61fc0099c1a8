"""Visualization of image embeddings and segmentations, with numpy only (matplotlib is not needed).

* :func:`compute_pca` / :func:`project_embeddings_for_visualization`: project SAM image embeddings
  (C channels per pixel of the embedding grid) to 3 principal components shown as RGB.
* :func:`overlay_segmentation` / :func:`save_overlay`: draw instance labels over an image as an RGB
  image or PNG file.

Arrays follow the micro_sam conventions: images are (y, x) or (y, x, channels), volumes (z, y, x);
embeddings are (1, C, h, w) for an image and (z, 1, C, h, w) for a volume.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._embeddings import ImageEmbeddings
from ._lazy import lazy_attributes

#
# PCA of embeddings
#


def _pca(features: np.ndarray, n_components: int) -> np.ndarray:
    """Project ``features`` of shape (n_samples, n_features) onto the leading principal components.

    Uses the eigendecomposition of the (n_features x n_features) covariance matrix, so memory does not grow
    with the number of samples squared. The sign of each component is fixed so that its largest-magnitude
    loading is positive, which makes the result deterministic.

    Returns:
        The projection, float64 of shape (n_samples, n_components).
    """
    x = features.astype("float64")
    x = x - x.mean(axis=0, keepdims=True)
    cov = x.T @ x
    eigval, eigvec = np.linalg.eigh(cov)  # ascending eigenvalues
    order = np.argsort(eigval)[::-1][:n_components]
    components = eigvec[:, order]
    idx = np.argmax(np.abs(components), axis=0)
    signs = np.sign(components[idx, np.arange(components.shape[1])])
    signs[signs == 0] = 1.0
    return x @ (components * signs)


def _embedding_pca(embeddings: np.ndarray, n_components: int, as_rgb: bool) -> np.ndarray:
    """PCA of channel-first embeddings (C, h, w) -> channel-last (h, w, n_components)."""
    n_channels = embeddings.shape[0]
    spatial = embeddings.shape[1:]
    flat = embeddings.reshape(n_channels, -1).T
    projected = _pca(flat, n_components).reshape(spatial + (n_components,))
    if as_rgb:
        lo, hi = projected.min(), projected.max()
        if hi > lo:
            projected = 255.0 * (projected - lo) / (hi - lo)
        else:
            projected = np.zeros_like(projected)
        return np.floor(projected).astype("uint8")
    return projected.astype("float32")


def compute_pca(embeddings: np.ndarray, n_components: int = 3, as_rgb: bool = True) -> np.ndarray:
    """Compute the PCA of image embeddings, e.g. to show them as an RGB image.

    Each pixel of the embedding grid is a sample with C features. For a volume, the PCA is computed
    independently per slice.

    Args:
        embeddings: The embeddings of shape (1, C, h, w) for an image or (z, 1, C, h, w) for a volume,
            e.g. the ``features`` predicted by the SAM image encoder (C = 256, h = w = 64).
        n_components: The number of principal components; must be 3 if ``as_rgb`` is True.
        as_rgb: Whether to rescale the projection (jointly over all components) to uint8 0..255 for
            display as RGB.

    Returns:
        The projection of shape (h, w, n_components), or (z, h, w, n_components) for a volume;
        uint8 if ``as_rgb`` else float32.

    Raises:
        ValueError: If ``embeddings`` is not 4D / 5D with a singleton batch axis, or ``n_components`` is
            invalid.
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim not in (4, 5):
        raise ValueError(
            f"embeddings must have shape (1, C, h, w) or (z, 1, C, h, w), got ndim {embeddings.ndim} "
            f"(shape {embeddings.shape})"
        )
    batch_axis = 0 if embeddings.ndim == 4 else 1
    if embeddings.shape[batch_axis] != 1:
        raise ValueError(
            "embeddings must have a batch axis of size 1: (1, C, h, w) or (z, 1, C, h, w), "
            f"got shape {embeddings.shape}"
        )
    n_channels = embeddings.shape[batch_axis + 1]
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or \
            not 1 <= n_components <= n_channels:
        raise ValueError(f"n_components must be an integer in [1, {n_channels}], got {n_components!r}")
    if as_rgb and n_components != 3:
        raise ValueError(f"as_rgb=True needs n_components=3, got {n_components}")
    if embeddings.ndim == 4:
        return _embedding_pca(embeddings[0], n_components, as_rgb)
    return np.stack([_embedding_pca(emb[0], n_components, as_rgb) for emb in embeddings])


def _valid_region(embed_shape: Sequence[int], image_shape: Sequence[int]) -> Tuple[slice, slice]:
    """Part of a (h, w) embedding grid that covers the image (SAM pads the shorter side at the end)."""
    h, w = embed_shape[:2]
    height, width = image_shape
    if height > width:
        return slice(None), slice(0, int(width / height * w))
    if width > height:
        return slice(0, int(height / width * h)), slice(None)
    return slice(None), slice(None)


def _spatial_crop(array: np.ndarray, region: Tuple[slice, slice]) -> np.ndarray:
    """Apply a (y, x) region to the last two axes."""
    return array[(Ellipsis,) + tuple(region)]


def _resize_axis(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Linearly resize one axis of ``array`` to ``size`` (other axes are unchanged)."""
    n = array.shape[axis]
    if n == size:
        return array
    if n == 1:
        return np.repeat(array, size, axis=axis)
    pos = (np.arange(size) + 0.5) * n / size - 0.5
    pos = np.clip(pos, 0, n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = (pos - lo).astype("float32")
    shape = [1] * array.ndim
    shape[axis] = size
    frac = frac.reshape(shape)
    a, b = np.take(array, lo, axis=axis), np.take(array, hi, axis=axis)
    return a * (1 - frac) + b * frac


def _tile_grid(shape: Sequence[int], tile_shape: Sequence[int]) -> Tuple[int, int]:
    return tuple(int(np.ceil(s / t)) for s, t in zip(shape, tile_shape))


def _load_tile(features: Any, tile_id: int) -> Optional[np.ndarray]:
    try:
        return np.asarray(features[str(tile_id)][:])
    except KeyError:
        return None


def _tiled_embedding_mosaic(features: Any) -> Tuple[np.ndarray, Tuple[int, ...]]:
    """Assemble the inner parts of all tile embeddings into one embedding grid.

    ``features`` is the tiled layout of micro_sam: attributes ``shape`` (image y, x), ``tile_shape`` and
    ``halo``; entries ``"0"``, ``"1"``, ... hold the embeddings of the tiles in row-major order, computed on the
    tile extended by the halo (clipped to the image). Tiles that were not computed (e.g. outside a mask) are
    filled with zeros.
    """
    attrs = features.attrs
    shape, tile_shape, halo = (tuple(int(v) for v in attrs[k]) for k in ("shape", "tile_shape", "halo"))
    grid = _tile_grid(shape, tile_shape)
    tiles = {tile_id: _load_tile(features, tile_id) for tile_id in range(grid[0] * grid[1])}
    template = next((t for t in tiles.values() if t is not None), None)
    if template is None:
        raise ValueError("The tiled embeddings do not contain any tile")
    crops = [[None] * grid[1] for _ in range(grid[0])]
    fallback = {}
    for i in range(grid[0]):
        for j in range(grid[1]):
            begin = (i * tile_shape[0], j * tile_shape[1])
            end = tuple(min(b + t, s) for b, t, s in zip(begin, tile_shape, shape))
            outer_begin = tuple(max(b - h, 0) for b, h in zip(begin, halo))
            outer_end = tuple(min(e + h, s) for e, h, s in zip(end, halo, shape))
            outer_shape = tuple(e - b for b, e in zip(outer_begin, outer_end))
            embeds = tiles[i * grid[1] + j]
            if embeds is None:
                # SAM's grid covers the longer side of the tile: estimate the inner size from that.
                cells = template.shape[-1] / max(outer_shape)
                fallback[i, j] = tuple(max(1, int(round((e - b) * cells))) for b, e in zip(begin, end))
                continue
            embeds = _spatial_crop(embeds, _valid_region(embeds.shape[-2:], outer_shape))
            scale = [e / o for e, o in zip(embeds.shape[-2:], outer_shape)]
            inner = tuple(
                slice(int(round((b - ob) * sc)), int(round((e - ob) * sc)))
                for b, e, ob, sc in zip(begin, end, outer_begin, scale)
            )
            crops[i][j] = _spatial_crop(embeds, inner)
    # Missing tiles become zeros, sized like the computed tiles of the same row / column where possible.
    for (i, j), (est_h, est_w) in fallback.items():
        heights = [c.shape[-2] for c in crops[i] if c is not None]
        widths = [crops[k][j].shape[-1] for k in range(grid[0]) if crops[k][j] is not None]
        size = (max(heights) if heights else est_h, max(widths) if widths else est_w)
        crops[i][j] = np.zeros(template.shape[:-2] + size, dtype=template.dtype)
    rows = []
    for row in crops:
        height = max(t.shape[-2] for t in row)
        rows.append(np.concatenate([_resize_axis(t, -2, height) for t in row], axis=-1))
    width = max(r.shape[-1] for r in rows)
    mosaic = np.concatenate([_resize_axis(r, -1, width) for r in rows], axis=-2)
    return mosaic, shape


def project_embeddings_for_visualization(
    image_embeddings: Mapping[str, Any], n_components: int = 3, as_rgb: bool = True,
) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """Project image embeddings to a per-pixel PCA image and the scale to the original image.

    Args:
        image_embeddings: The image embeddings as returned by
            ``micro_sam.util.precompute_image_embeddings``: a mapping with ``features``, ``input_size``
            (None for tiled embeddings) and ``original_size``.
        n_components: The number of principal components.
        as_rgb: Whether to rescale to uint8 for display as RGB (then ``n_components`` must be 3).

    Returns:
        The projection of shape (h, w, n_components) or (z, h, w, n_components), restricted to the part of
        the embedding grid that covers the image.
        The scale factor per spatial axis ((y, x) or (z, y, x)) from the projection to the original image.
    """
    features = image_embeddings["features"]
    if image_embeddings.get("input_size") is None:
        embeddings, shape = _tiled_embedding_mosaic(features)
        n_extra = embeddings.ndim - 4  # 1 for a volume
        vis = compute_pca(embeddings, n_components=n_components, as_rgb=as_rgb)
        if n_extra:
            shape = (embeddings.shape[0],) + tuple(shape)
    else:
        embeddings = np.asarray(features)
        shape = tuple(int(s) for s in image_embeddings["original_size"])
        vis = compute_pca(embeddings, n_components=n_components, as_rgb=as_rgb)
        region = _valid_region(vis.shape[-3:-1], shape)
        vis = vis[(Ellipsis,) + region + (slice(None),)]
        if embeddings.ndim == 5:
            shape = (embeddings.shape[0],) + shape
    scale = tuple(float(s) / v for s, v in zip(shape, vis.shape[:-1]))
    return vis, scale


#
# Segmentation overlays
#

_GOLDEN = 0.6180339887498949


def _hsv_to_rgb(h: np.ndarray, s: float, v: float) -> np.ndarray:
    """Convert hues in [0, 1) with fixed saturation and value to RGB in [0, 1], shape (n, 3)."""
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    vv = np.full_like(h, v)
    pp = np.broadcast_to(p, h.shape)
    table = [(vv, t, pp), (q, vv, pp), (pp, vv, t), (pp, q, vv), (t, pp, vv), (vv, pp, q)]
    rgb = np.zeros(h.shape + (3,))
    for k, (r, g, b) in enumerate(table):
        sel = i == k
        rgb[sel] = np.stack([r[sel], g[sel], b[sel]], axis=-1)
    return rgb


def label_colors(label_ids: Union[Sequence[int], np.ndarray], seed: int = 0) -> np.ndarray:
    """Deterministic, well separated colours for label ids.

    The hue of id ``i`` is ``frac(seed * 0.137 + i * golden ratio)``; saturation and value vary slightly
    with the id so that neighbouring hues are still distinguishable. The colour only depends on the id and
    ``seed``, not on the other ids present.

    Args:
        label_ids: Non-negative integer ids.
        seed: Shifts all hues.

    Returns:
        uint8 RGB colours of shape (len(label_ids), 3).
    """
    ids = np.asarray(label_ids, dtype="uint64").ravel()
    # Work modulo a large number to stay exact in float64.
    hue = np.mod(seed * 0.137 + np.mod(ids, 1 << 40).astype("float64") * _GOLDEN, 1.0)
    rgb = np.zeros((len(ids), 3))
    for k, (s, v) in enumerate([(0.85, 1.0), (0.65, 0.9), (1.0, 0.8)]):
        sel = (ids % 3) == k
        if sel.any():
            rgb[sel] = _hsv_to_rgb(hue[sel], s, v)
    return np.round(rgb * 255).astype("uint8")


def _to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """Convert a (y, x) or (y, x, 1|3|4) image to uint8 RGB (y, x, 3).

    uint8 images are used as they are; other dtypes are rescaled from their 0.5 / 99.5 percentiles.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        image = image[..., :3] if image.shape[-1] != 1 else image[..., 0]
    elif image.ndim != 2:
        raise ValueError(f"image must have shape (y, x) or (y, x, 1|3|4), got {image.shape}")
    if image.dtype != np.uint8:
        data = image.astype("float64")
        finite = data[np.isfinite(data)]
        lo, hi = (np.percentile(finite, (0.5, 99.5)) if finite.size else (0.0, 0.0))
        if hi <= lo:
            lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
        scaled = (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)
        image = np.round(255 * np.clip(np.nan_to_num(scaled), 0, 1)).astype("uint8")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image


def _inner_boundaries(labels: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour of a different label (inside the image)."""
    out = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        o = np.moveaxis(out, axis, 0)
        diff = a[1:] != a[:-1]
        o[1:] |= diff & (a[1:] != 0)
        o[:-1] |= diff & (a[:-1] != 0)
    return out


def overlay_segmentation(
    image: np.ndarray,
    labels: np.ndarray,
    alpha: float = 0.5,
    boundaries: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """Draw instance labels in colour over an image.

    Every object is blended with its colour (see :func:`label_colors`) as
    ``(1 - alpha) * image + alpha * colour``; its inner boundary pixels are drawn in the full colour if
    ``boundaries`` is True. Background pixels (label 0) keep the image value exactly.

    Args:
        image: The image, (y, x) grey values or (y, x, 3|4) RGB(A). uint8 is used as is; other dtypes are
            rescaled from their 0.5 / 99.5 percentiles to 0..255.
        labels: The instance labels, integer array of shape (y, x); 0 is background.
        alpha: Opacity of the object colours, in [0, 1].
        boundaries: Whether to draw object boundaries in the full colour.
        seed: Shifts the colour sequence (same seed -> same colours).

    Returns:
        The overlay, uint8 RGB of shape (y, x, 3).

    Raises:
        ValueError: For mismatching shapes, non-integer labels or alpha outside [0, 1].
    """
    labels = np.asarray(labels)
    rgb = _to_uint8_rgb(image)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels must have the image's shape {rgb.shape[:2]}, got {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"labels must be an integer array, got dtype {labels.dtype}")
    if labels.dtype != bool and labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    labels = labels.astype("uint64")
    out = rgb.copy()
    fg = labels != 0
    if not fg.any():
        return out
    ids, inverse = np.unique(labels[fg], return_inverse=True)
    colours = label_colors(ids, seed=seed).astype("float64")[inverse.ravel()]
    blended = (1.0 - alpha) * rgb[fg].astype("float64") + alpha * colours
    out[fg] = np.round(blended).astype("uint8")
    if boundaries:
        edge = _inner_boundaries(labels)
        edge_ids = labels[edge]
        out[edge] = label_colors(edge_ids, seed=seed)
    return out


def save_overlay(
    path: Union[str, os.PathLike],
    image: np.ndarray,
    labels: np.ndarray,
    alpha: float = 0.5,
    boundaries: bool = True,
    seed: int = 0,
) -> str:
    """Write :func:`overlay_segmentation` of ``image`` and ``labels`` to an image file (PNG).

    Args:
        path: The output path; the format follows the extension, ``.png`` recommended. The parent
            directory must exist.
        image: The image, (y, x) or (y, x, 3|4).
        labels: The instance labels of shape (y, x).
        alpha: Opacity of the object colours, in [0, 1].
        boundaries: Whether to draw object boundaries in the full colour.
        seed: Shifts the colour sequence.

    Returns:
        The path that was written, as str.
    """
    import imageio.v3 as imageio

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"The directory of path {path!r} does not exist")
    overlay = overlay_segmentation(image, labels, alpha=alpha, boundaries=boundaries, seed=seed)
    imageio.imwrite(path, overlay)
    return path


# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "resize": "skimage.transform:resize",
})
