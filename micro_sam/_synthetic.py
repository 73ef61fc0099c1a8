"""Private helpers that render synthetic fluorescence microscopy with instance labels.

The public entry points live in :mod:`micro_sam.sample_data`. Everything here is pure numpy / scipy and
deterministic given a ``numpy.random.Generator``.

Rendering model (all images are built in "photon" units first):

1. Objects are placed one after the other. An object is an ellipse (2D) or a flat ellipsoid (3D) whose
   in-plane boundary is perturbed by a few low-order harmonics, so it looks like an irregular blob.
   A candidate is rejected if it would hide too much of itself or of an already placed object, or if it
   would cut an existing object into pieces. Each accepted candidate is drawn either on top of or
   underneath the existing objects; the label image therefore is a partition in which a front object
   owns the pixels where objects overlap.
2. The fluorescence signal is additive: overlapping objects are brighter where they overlap.
3. Objects get a smooth radial profile, a granular texture and an individual brightness.
4. The signal plus an uneven background is multiplied by an illumination (vignetting) field, blurred by a
   Gaussian point spread function and finally corrupted by Poisson (shot) and Gaussian (read) noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

# Defaults that give nucleus-like objects at typical widefield magnification.
NUCLEUS_RADIUS_RANGE = (8.0, 25.0)
CELL_RADIUS_RANGE = (18.0, 40.0)


@dataclass
class _Blob:
    """Geometry of one placed object inside its bounding box."""
    slices: Tuple[slice, ...]
    mask: np.ndarray       # bool, shape of the bounding box
    profile: np.ndarray    # float in [0, 1], 1 at the centre, 0 at the boundary and outside
    brightness: float


def check_shape(shape: Sequence[int], ndim: int, min_size: int = 16) -> Tuple[int, ...]:
    """Validate a user-provided image shape."""
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of {ndim} integers, got {shape!r}") from None
    if len(shape) != ndim:
        raise ValueError(f"shape must have {ndim} entries, got {shape!r} with {len(shape)}")
    if any(s < min_size for s in shape[-2:]) or any(s < 1 for s in shape):
        raise ValueError(
            f"shape {shape!r} is too small: the last two axes need at least {min_size} pixels, all axes >= 1"
        )
    return shape


def check_radius_range(radius_range: Sequence[float]) -> Tuple[float, float]:
    """Validate a (min, max) radius range."""
    try:
        r_min, r_max = (float(r) for r in radius_range)
    except (TypeError, ValueError):
        raise ValueError(f"radius_range must be a pair (min, max), got {radius_range!r}") from None
    if not (2.0 <= r_min <= r_max):
        raise ValueError(f"radius_range must satisfy 2 <= min <= max, got {radius_range!r}")
    return r_min, r_max


def default_n_objects(
    shape: Sequence[int],
    radius_range: Tuple[float, float],
    coverage: float,
    z_radius_range: Optional[Tuple[float, float]] = None,
) -> int:
    """Number of objects so that roughly ``coverage`` of the image area (2D) or volume (3D) is covered."""
    mean_r = 0.5 * (radius_range[0] + radius_range[1])
    size = np.pi * mean_r ** 2 * 0.8  # mean area of an ellipse with aspect ~0.8
    if z_radius_range is not None:
        size *= 4.0 / 3.0 * min(0.5 * (z_radius_range[0] + z_radius_range[1]), shape[0] / 2.0)
    return max(1, int(round(coverage * float(np.prod(shape)) / size)))


def check_n_objects(n_objects: Optional[int], default: int) -> int:
    if n_objects is None:
        return default
    if isinstance(n_objects, bool) or not isinstance(n_objects, (int, np.integer)) or n_objects < 0:
        raise ValueError(f"n_objects must be a non-negative integer or None, got {n_objects!r}")
    return int(n_objects)


def _smooth_field(rng: np.random.Generator, shape: Tuple[int, ...], n_nodes: int = 4) -> np.ndarray:
    """A smooth random field with values roughly in [-1, 1].

    Random values on a coarse grid of ``n_nodes`` per axis (plus a margin) are interpolated with
    normalised Gaussian kernels, one small matrix product per axis.
    """
    n_nodes = max(int(n_nodes), 2)
    field = rng.uniform(-1.0, 1.0, size=(n_nodes + 2,) * len(shape)).astype("float32")
    # Contract the last (still coarse) axis and move the result to the front; going through the axes in
    # reverse order restores the axis order at the end.
    for size in reversed(shape):
        spacing = size / n_nodes
        nodes = (np.arange(n_nodes + 2) - 0.5) * spacing
        pos = np.arange(size) + 0.5
        weights = np.exp(-0.5 * ((pos[:, None] - nodes[None, :]) / (0.6 * spacing)) ** 2)
        weights = (weights / weights.sum(axis=1, keepdims=True)).astype("float32")
        field = np.moveaxis(field @ weights.T, -1, 0)
    # The kernel averaging shrinks the range; rescale to roughly [-1, 1].
    return (field * 1.6).astype("float32")


def _texture(rng: np.random.Generator, shape: Tuple[int, ...], sigma) -> np.ndarray:
    """Granular texture: low-pass filtered white noise, normalised to zero mean and unit std."""
    noise = rng.standard_normal(shape).astype("float32")
    tex = ndimage.gaussian_filter(noise, sigma)
    std = tex.std()
    return tex / std if std > 0 else tex


def _illumination(rng: np.random.Generator, shape: Tuple[int, ...]) -> np.ndarray:
    """Vignetting of the excitation light plus a slight random tilt; ~1 in the centre, ~0.75 at corners."""
    yy, xx = np.meshgrid(*(np.linspace(-1.0, 1.0, s, dtype="float32") for s in shape[-2:]), indexing="ij")
    cy, cx = rng.uniform(-0.3, 0.3, size=2)
    strength = rng.uniform(0.08, 0.15)
    tilt_y, tilt_x = rng.uniform(-0.08, 0.08, size=2)
    return (1.0 - strength * ((yy - cy) ** 2 + (xx - cx) ** 2) + tilt_y * yy + tilt_x * xx).astype("float32")


def _make_blob(
    rng: np.random.Generator,
    shape: Tuple[int, ...],
    radius_range: Tuple[float, float],
    z_radius_range: Optional[Tuple[float, float]],
) -> Optional[_Blob]:
    """Draw a random irregular ellipse/ellipsoid; returns None if it does not intersect the image."""
    ndim = len(shape)
    # Radii: semi-major axis from the range, the minor axis 60-100 % of it.
    r_major = rng.uniform(*radius_range)
    r_minor = r_major * rng.uniform(0.6, 1.0)
    angle = rng.uniform(0.0, np.pi)
    n_harm = 3
    amps = rng.uniform(0.0, 0.09, size=n_harm)
    phases = rng.uniform(0.0, 2 * np.pi, size=n_harm)
    bound = r_major * (1.0 + amps.sum()) + 1.0

    center = [rng.uniform(0, shape[-2]), rng.uniform(0, shape[-1])]
    if ndim == 3:
        rz = rng.uniform(*z_radius_range)
        zc = rng.uniform(0, shape[0])
        bounds = [(zc, rz * (1.0 + amps.sum()) + 1.0)]
    else:
        bounds = []
    bounds += [(center[0], bound), (center[1], bound)]

    slices, coords = [], []
    for (c, b), size in zip(bounds, shape):
        lo, hi = max(int(np.floor(c - b)), 0), min(int(np.ceil(c + b)) + 1, size)
        if hi <= lo:
            return None
        slices.append(slice(lo, hi))
        coords.append(np.arange(lo, hi, dtype="float32") + 0.5 - c)

    grids = np.meshgrid(*coords, indexing="ij", sparse=True)
    dy, dx = grids[-2], grids[-1]
    cos, sin = np.cos(angle), np.sin(angle)
    u = dy * cos + dx * sin
    v = -dy * sin + dx * cos
    r2 = (u / r_major) ** 2 + (v / r_minor) ** 2
    if ndim == 3:
        r2 = r2 + (grids[0] / rz) ** 2
    theta = np.arctan2(v, u)
    boundary = np.ones_like(theta)
    for k, (a, p) in enumerate(zip(amps, phases), start=2):
        boundary = boundary + a * np.cos(k * theta + p)
    rel = np.sqrt(r2) / boundary
    mask = rel <= 1.0
    if mask.sum() < 4:
        return None
    # Profile: flat top with a soft decay towards the rim (chromatin is denser at the periphery for some
    # nuclei, so the exponent varies from object to object).
    exponent = rng.uniform(1.5, 4.0)
    profile = np.where(mask, 1.0 - 0.35 * np.clip(rel, 0, 1) ** exponent, 0.0).astype("float32")
    brightness = float(rng.lognormal(mean=0.0, sigma=0.3))
    return _Blob(tuple(slices), mask, profile, brightness)


def _fragments(mask: np.ndarray) -> int:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return ndimage.label(mask, structure=structure)[1]


def place_blobs(
    rng: np.random.Generator,
    shape: Tuple[int, ...],
    n_objects: int,
    radius_range: Tuple[float, float],
    z_radius_range: Optional[Tuple[float, float]] = None,
    max_overlap: float = 0.25,
    max_attempts_per_object: int = 60,
    make_blob: Optional[Callable[[np.random.Generator], Optional[_Blob]]] = None,
    strict: bool = True,
):
    """Place ``n_objects`` irregular blobs; returns the label partition (uint32) and the list of blobs.

    Overlaps are allowed (so objects touch and overlap in the rendered image), but at most ``max_overlap``
    of any object may be hidden behind other objects, and no object may be cut into pieces.
    ``make_blob(rng)`` draws a candidate (default: :func:`_make_blob` with ``radius_range``). ``strict``: raise
    when not all objects fit; otherwise return the ones that did.
    """
    labels = np.zeros(shape, dtype="uint32")
    # Objects cut by the image border must keep at least ~1/3 of the smallest possible object size.
    min_size = 0.3 * np.pi * radius_range[0] ** 2 * 0.6
    if z_radius_range is not None:
        min_size *= 4.0 / 3.0 * min(z_radius_range[0], shape[0] / 2.0)
    min_size = max(min_size, 4.0)
    areas = [0]  # visible size per label id, index 0 unused
    blobs = []
    attempts = 0
    max_attempts = max_attempts_per_object * max(n_objects, 1)
    while len(blobs) < n_objects:
        attempts += 1
        if attempts > max_attempts:
            if not strict:
                break
            raise ValueError(
                f"Could not place n_objects={n_objects} objects with radii {radius_range} into an image of "
                f"shape {shape}: only {len(blobs)} fit. Use fewer objects, smaller radii or a larger shape."
            )
        if make_blob is None:
            blob = _make_blob(rng, shape, radius_range, z_radius_range)
        else:
            blob = make_blob(rng)
        if blob is None:
            continue
        crop = labels[blob.slices]
        size = int(blob.mask.sum())
        if size < min_size:
            continue
        covered = blob.mask & (crop > 0)
        n_covered = int(covered.sum())
        on_top = bool(rng.random() < 0.5)
        if n_covered > 0:
            if n_covered > max_overlap * size:
                continue
            ids, counts = np.unique(crop[covered], return_counts=True)
            if on_top:
                ok = all(c <= max_overlap * areas[i] for i, c in zip(ids, counts))
                # The remaining visible part of every touched object must stay connected.
                ok = ok and all(_fragments((crop == i) & ~blob.mask) == 1 for i in ids)
            else:
                ok = _fragments(blob.mask & ~covered) == 1
            if not ok:
                continue
        new_id = len(blobs) + 1
        if on_top:
            if n_covered > 0:
                for i, c in zip(*np.unique(crop[covered], return_counts=True)):
                    areas[i] -= int(c)
            crop[blob.mask] = new_id
            areas.append(size)
        else:
            crop[blob.mask & (crop == 0)] = new_id
            areas.append(size - n_covered)
        blobs.append(blob)
    return labels, blobs


def to_dtype(photons: np.ndarray, dtype) -> np.ndarray:
    """Convert photon counts to the output dtype (uint8: 1 count = 1 grey value; uint16: gain 16)."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return np.clip(np.round(photons), 0, 255).astype("uint8")
    if dtype == np.uint16:
        return np.clip(np.round(photons * 16.0), 0, 65535).astype("uint16")
    raise ValueError(f"dtype must be uint8 or uint16, got {dtype}")


def acquire(
    rng: np.random.Generator,
    signal: np.ndarray,
    background_level: float,
    psf_sigma,
    read_noise: float,
    dtype,
) -> np.ndarray:
    """Add uneven background, illumination falloff, blur and Poisson + Gaussian noise to a signal."""
    shape = signal.shape
    plane = shape[-2:]
    background = background_level * (1.0 + 0.35 * _smooth_field(rng, plane, n_nodes=4))
    illum = _illumination(rng, shape)
    expected = (signal + background) * illum  # broadcasts over z for 3D
    expected = ndimage.gaussian_filter(expected.astype("float32"), psf_sigma)
    np.maximum(expected, 0, out=expected)
    photons = rng.poisson(expected).astype("float32")
    photons += read_noise * rng.standard_normal(size=shape, dtype=np.float32)
    return to_dtype(photons, dtype)


def render_nuclei(
    rng: np.random.Generator,
    shape: Tuple[int, ...],
    n_objects: int,
    radius_range: Tuple[float, float],
    dtype,
    z_radius_range: Optional[Tuple[float, float]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Render nuclei (2D or 3D) and return (image, labels)."""
    labels, blobs = place_blobs(rng, shape, n_objects, radius_range, z_radius_range)
    signal = np.zeros(shape, dtype="float32")
    level = rng.uniform(70.0, 110.0)
    for blob in blobs:
        signal[blob.slices] += (level * blob.brightness) * blob.profile
    # Granular chromatin texture, only visible where there is signal.
    sigma = 1.2 if len(shape) == 2 else (0.6, 1.2, 1.2)
    tex = _texture(rng, shape, sigma)
    signal *= np.clip(1.0 + 0.18 * tex, 0.2, None)
    psf = 1.2 if len(shape) == 2 else (1.0, 1.2, 1.2)
    image = acquire(rng, signal, background_level=rng.uniform(12.0, 22.0), psf_sigma=psf,
                    read_noise=2.5, dtype=dtype)
    return image, labels


def render_cells(
    rng: np.random.Generator,
    shape: Tuple[int, int],
    n_objects: int,
    radius_range: Tuple[float, float],
    dtype,
    strict: bool = True,
) -> Tuple[np.ndarray, np.ndarray]:
    """Render densely packed cells with textured cytoplasm and a dim nucleus; returns (image, labels).

    ``strict``: raise when not all ``n_objects`` cells fit; otherwise render the ones that did.

    Every pixel belongs to the cell of its nearest seed point (on a smoothly warped grid, which makes the
    shared boundaries curved) if it lies inside that cell's irregular ellipse. Neighbouring cells therefore
    touch along irregular seams, which are drawn slightly dimmer.
    """
    h, w = shape
    r_min, r_max = radius_range
    min_dist = 1.1 * r_min
    seeds = []
    attempts, max_attempts = 0, 200 * max(n_objects, 1)
    while len(seeds) < n_objects:
        attempts += 1
        if attempts > max_attempts:
            if not strict:
                break
            raise ValueError(
                f"Could not place n_objects={n_objects} cells with radii {radius_range} into an image of "
                f"shape {shape}: only {len(seeds)} fit. Use fewer objects, smaller radii or a larger shape."
            )
        p = rng.uniform((0, 0), (h, w))
        if seeds and np.min(np.hypot(*(np.asarray(seeds) - p).T)) < min_dist:
            continue
        seeds.append(p)
    n = len(seeds)
    seeds = np.asarray(seeds, dtype="float32").reshape(n, 2)

    # Per-cell geometry; index 0 is a dummy entry so that parameters can be looked up by label id.
    def per_cell(values):
        return np.concatenate([[1.0], values]).astype("float32")

    radius = per_cell(rng.uniform(r_min, r_max, size=n))
    aspect = per_cell(rng.uniform(0.65, 1.0, size=n))
    angle = per_cell(rng.uniform(0.0, np.pi, size=n))
    harmonics = [(k, per_cell(rng.uniform(0.0, 0.1, size=n)), per_cell(rng.uniform(0, 2 * np.pi, size=n)))
                 for k in (2, 3, 4, 5)]
    brightness = per_cell(rng.lognormal(0.0, 0.25, size=n))
    nuc_scale = per_cell(rng.uniform(0.28, 0.4, size=n))

    labels = np.zeros((h, w), dtype="uint32")
    yy, xx = np.meshgrid(np.arange(h, dtype="float32"), np.arange(w, dtype="float32"), indexing="ij")
    n_nodes = max(4, int(round(max(h, w) / r_max)))
    amp = 0.35 * r_min
    wy = yy + amp * _smooth_field(rng, (h, w), n_nodes)
    wx = xx + amp * _smooth_field(rng, (h, w), n_nodes)
    rel = np.full((h, w), np.inf, dtype="float32")
    if n > 0:
        iy = np.clip(np.round(seeds[:, 0]).astype(int), 0, h - 1)
        ix = np.clip(np.round(seeds[:, 1]).astype(int), 0, w - 1)
        id_img = np.zeros((h, w), dtype="int64")
        id_img[iy, ix] = np.arange(1, n + 1)
        _, (ny, nx) = ndimage.distance_transform_edt(id_img == 0, return_indices=True)
        wyi = np.clip(np.round(wy).astype(int), 0, h - 1)
        wxi = np.clip(np.round(wx).astype(int), 0, w - 1)
        nearest = id_img[ny[wyi, wxi], nx[wyi, wxi]]
        dy = wy - seeds[nearest - 1, 0]
        dx = wx - seeds[nearest - 1, 1]
        cos, sin = np.cos(angle[nearest]), np.sin(angle[nearest])
        u = (dy * cos + dx * sin) / radius[nearest]
        v = (-dy * sin + dx * cos) / (radius[nearest] * aspect[nearest])
        theta = np.arctan2(v, u)
        boundary = np.ones((h, w), dtype="float32")
        for k, amps, phases in harmonics:
            boundary += amps[nearest] * np.cos(k * theta + phases[nearest])
        rel = np.sqrt(u ** 2 + v ** 2) / boundary
        inside = rel <= 1.0
        labels[inside] = nearest[inside]
        labels = _keep_largest_components(labels, n)
    labels = _relabel_consecutive(labels)
    n_found = int(labels.max())
    if n_found != n:
        # Happens only in crowded images where a cell is squeezed out completely.
        raise ValueError(
            f"n_objects={n_objects} cells do not fit into shape {shape} with radii {radius_range}; "
            "use fewer objects or a larger shape."
        )

    # Cytoplasm: bright around the nucleus, thinner (dimmer) towards the cell edge, granular texture.
    ids = labels
    tex_fine = _texture(rng, (h, w), 0.8)
    tex_coarse = _texture(rng, (h, w), 3.0)
    level = rng.uniform(80.0, 115.0)
    rel_in = np.where(ids > 0, rel, 1.0)
    profile = 0.55 + 0.45 * np.exp(-0.5 * (rel_in / 0.5) ** 2)
    nucleus = 1.0 / (1.0 + np.exp((rel_in - nuc_scale[ids]) / 0.03))  # ~1 inside the nucleus
    signal = level * brightness[ids] * profile * (1.0 - 0.5 * nucleus)
    signal *= np.clip(1.0 + 0.25 * tex_fine + 0.15 * tex_coarse, 0.1, None)
    signal[_inner_boundaries(labels)] *= 0.6
    signal[ids == 0] = 0
    image = acquire(rng, signal.astype("float32"), background_level=rng.uniform(10.0, 18.0), psf_sigma=1.0,
                    read_noise=2.5, dtype=dtype)
    return image, labels


def _inner_boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels of a label that touch a different non-zero label (4-neighbourhood)."""
    out = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        o = np.moveaxis(out, axis, 0)
        diff = (a[1:] != a[:-1]) & (a[1:] > 0) & (a[:-1] > 0)
        o[1:] |= diff
        o[:-1] |= diff
    return out


def _keep_largest_components(labels: np.ndarray, n: int) -> np.ndarray:
    """Keep only the largest connected component of every label id."""
    objects = ndimage.find_objects(labels, max_label=n)
    out = labels.copy()
    structure = ndimage.generate_binary_structure(labels.ndim, 1)
    for i, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        m = labels[sl] == i
        cc, k = ndimage.label(m, structure=structure)
        if k > 1:
            sizes = np.bincount(cc.ravel())[1:]
            keep = cc == (np.argmax(sizes) + 1)
            out[sl][m & ~keep] = 0
    return out


def _relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1, dtype="uint32")
    lut[ids] = np.arange(1, len(ids) + 1, dtype="uint32")
    return lut[labels]
