"""Domain-randomised synthetic fluorescence images: many looks of nuclei-like objects, and images without objects.

:mod:`micro_sam._synthetic` renders one look (the one of ``micro_sam.sample_data.synthetic_nuclei_2d``). Here a
:class:`Style` holds every setting of the look of one image, and :func:`render_style` renders it:

- objects: size range, elongation, irregular outlines (harmonics 2-6), lobes, coverage (density) and clustering
  (objects drawn around a few cluster centres touch and overlap);
- intensity: object-to-object brightness spread, very bright compact outliers (mitoses), smooth inhomogeneity
  inside objects, chromatin texture, bright spots (nucleoli, foci);
- edges: a flat top with a sharp rim or a profile that fades towards the rim, a glow (halo) outside the object
  that is not part of it;
- background: level, linear gradient, smooth unevenness, out-of-focus objects (large, strongly blurred, not
  labelled) and debris (small specks, not labelled);
- acquisition: anisotropic Gaussian blur, Poisson noise, Gaussian read noise, camera offset, gain and the output
  type (uint8, uint16 or float32).

``Style.kind`` other than ``"objects"`` gives images without any object (labels all 0): ``"blank"`` (zeros),
``"constant"``, ``"noise"`` (offset plus Poisson and Gaussian noise, optionally slightly correlated) and
``"background"`` (background structure, out-of-focus objects, debris and noise only). The training distribution
holds only the last two (see :data:`EMPTY_KIND_WEIGHTS`).

:func:`sample_training_style` draws a style from :data:`TRAINING_RANGES` (the settings the bundled demo model is
trained on). Everything is deterministic given a ``numpy.random.Generator``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
from scipy import ndimage

from . import _synthetic

KINDS = ("objects", "blank", "constant", "noise", "background")
DTYPES = ("uint8", "uint16", "float32")
_DTYPE_MAX = {"uint8": 255.0, "uint16": 65535.0, "float32": np.inf}


@dataclass(frozen=True)
class Style:
    """All settings of the look of one synthetic 2D image.

    Intensities are in expected photons: an object of mean brightness has ``photons`` at its centre, the
    background ``background * photons``. The output is ``offset + gain * (photons + read noise)`` in ``dtype``
    (uint8 / uint16 clipped to their range).
    """

    kind: str = "objects"
    # objects
    radius_range: Tuple[float, float] = (8.0, 20.0)  # semi-major axis, pixels
    aspect_range: Tuple[float, float] = (0.6, 1.0)   # minor / major axis
    irregularity: float = 0.05       # amplitude of the outline harmonics 2..6 (relative to the radius)
    lobes: int = 0                   # number of lobes (0: none)
    lobe_depth: float = 0.0          # amplitude of the lobe harmonic
    coverage: float = 0.25           # fraction of the image covered by objects
    clustering: float = 0.0          # fraction of objects placed around cluster centres
    max_overlap: float = 0.15        # largest hidden fraction of an object
    # intensity
    brightness_spread: float = 0.3   # sigma of the log-normal object brightness
    outlier_fraction: float = 0.0    # fraction of compact, very bright objects
    outlier_gain: float = 3.0        # their brightness factor
    inhomogeneity: float = 0.0       # amplitude of a smooth brightness variation inside objects
    texture: float = 0.15            # amplitude of the granular (chromatin) texture
    texture_scale: float = 1.2       # its correlation length, pixels
    spots: float = 0.0               # mean number of bright spots per object
    # edges
    edge_softness: float = 0.3       # brightness lost from the centre to the rim (0: flat top)
    halo: float = 0.0                # glow outside objects, relative to their brightness
    halo_width: float = 3.0          # its decay length, pixels
    # background
    background: float = 0.15         # background level relative to the object brightness
    gradient: float = 0.0            # amplitude of a linear gradient, relative to the object brightness
    unevenness: float = 0.3          # smooth background variation, relative to the background level
    out_of_focus: int = 0            # unlabelled, strongly blurred objects
    debris: int = 0                  # unlabelled small specks
    # acquisition
    photons: float = 100.0           # expected photons at the centre of an object of mean brightness
    psf_sigma: Tuple[float, float] = (1.2, 1.2)  # Gaussian blur along y and x, pixels
    read_noise: float = 2.5          # Gaussian noise, photons
    offset: float = 0.0              # camera offset, output units
    gain: float = 1.0                # output units per photon
    dtype: str = "uint8"
    noise_correlation: float = 0.0   # kind "noise": blur of the noise, pixels
    constant_value: float = 0.0      # kind "constant": the value

    def replace(self, **changes: Any) -> "Style":
        """A copy with some fields changed (and checked)."""
        return style_from_dict({**dataclasses.asdict(self), **changes})


def style_from_dict(values: Mapping[str, Any]) -> Style:
    """A checked :class:`Style` from a mapping of its fields (e.g. read from JSON; missing fields get defaults).

    Raises:
        ValueError: For an unknown field or an invalid value.
    """
    names = {f.name for f in dataclasses.fields(Style)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"Unknown style settings {unknown}; valid are {sorted(names)}.")
    values = dict(values)
    for name in ("radius_range", "aspect_range", "psf_sigma"):
        if name in values:
            values[name] = tuple(float(v) for v in values[name])
    style = Style(**values)
    _check_style(style)
    return style


def _check_style(style: Style) -> None:
    if style.kind not in KINDS:
        raise ValueError(f"Style kind must be one of {KINDS}, got {style.kind!r}.")
    if style.dtype not in DTYPES:
        raise ValueError(f"Style dtype must be one of {DTYPES}, got {style.dtype!r}.")
    r_lo, r_hi = style.radius_range
    if not 2.0 <= r_lo <= r_hi:
        raise ValueError(f"radius_range must satisfy 2 <= min <= max, got {style.radius_range}.")
    a_lo, a_hi = style.aspect_range
    if not 0.1 <= a_lo <= a_hi <= 1.0:
        raise ValueError(f"aspect_range must satisfy 0.1 <= min <= max <= 1, got {style.aspect_range}.")
    if not 0.0 <= style.coverage <= 0.8:
        raise ValueError(f"coverage must be in [0, 0.8], got {style.coverage}.")
    if style.photons <= 0 or style.gain <= 0:
        raise ValueError(f"photons and gain must be positive, got {style.photons} and {style.gain}.")
    if min(style.psf_sigma) < 0:
        raise ValueError(f"psf_sigma must be non-negative, got {style.psf_sigma}.")
    if style.lobes < 0 or style.lobe_depth + style.irregularity >= 0.8:
        raise ValueError("lobes must be >= 0 and lobe_depth + irregularity < 0.8 (outlines must stay star-shaped), "
                         f"got {style.lobes}, {style.lobe_depth}, {style.irregularity}.")


#
# Rendering
#

def _outline(rng: np.random.Generator, style: Style):
    """Radius, aspect, angle and the harmonics (k, amplitude, phase) of one object's outline."""
    radius = rng.uniform(*style.radius_range)
    aspect = rng.uniform(*style.aspect_range)
    angle = rng.uniform(0.0, np.pi)
    harmonics = [(k, rng.uniform(0.0, style.irregularity) / (k - 1) ** 0.5, rng.uniform(0, 2 * np.pi))
                 for k in range(2, 7)]
    if style.lobes > 0 and style.lobe_depth > 0:
        harmonics.append((style.lobes, style.lobe_depth * rng.uniform(0.7, 1.0), rng.uniform(0, 2 * np.pi)))
    return radius, aspect, angle, harmonics


def _blob_maker(style: Style, shape: Tuple[int, int], centres: Optional[np.ndarray], signal_pad: float):
    """``make_blob(rng)`` for :func:`micro_sam._synthetic.place_blobs`: objects of ``style``, each with its signal
    profile (including the halo, ``signal_pad`` pixels around it) in ``profile``."""
    h, w = shape

    def make_blob(rng: np.random.Generator):
        radius, aspect, angle, harmonics = _outline(rng, style)
        outlier = rng.random() < style.outlier_fraction
        if outlier:  # condensed chromatin: smaller, rounder, much brighter
            radius, aspect = max(radius * rng.uniform(0.45, 0.7), style.radius_range[0] * 0.5), max(aspect, 0.6)
        if centres is not None and len(centres) and rng.random() < style.clustering:
            centre = centres[rng.integers(len(centres))] + rng.normal(0.0, 1.6 * radius, size=2)
        else:
            centre = rng.uniform((0, 0), (h, w))
        reach = radius * (1.0 + sum(a for _, a, _ in harmonics)) + 1.0 + signal_pad
        lo = [max(int(np.floor(c - reach)), 0) for c in centre]
        hi = [min(int(np.ceil(c + reach)) + 1, s) for c, s in zip(centre, shape)]
        if hi[0] <= lo[0] or hi[1] <= lo[1]:
            return None
        dy = (np.arange(lo[0], hi[0], dtype="float32") + 0.5 - centre[0])[:, None]
        dx = (np.arange(lo[1], hi[1], dtype="float32") + 0.5 - centre[1])[None, :]
        cos, sin = np.cos(angle), np.sin(angle)
        u, v = dy * cos + dx * sin, (-dy * sin + dx * cos) / aspect
        theta = np.arctan2(v, u)
        boundary = np.ones_like(theta)
        for k, amplitude, phase in harmonics:
            boundary += amplitude * np.cos(k * theta + phase)
        rel = np.sqrt(u ** 2 + v ** 2) / (radius * boundary)
        mask = rel <= 1.0
        if mask.sum() < 4:
            return None
        exponent = rng.uniform(1.5, 4.0)
        profile = 1.0 - style.edge_softness * np.clip(rel, 0, 1) ** exponent
        if style.halo > 0:
            outside = (rel - 1.0) * radius * boundary  # ~ distance to the outline, pixels
            profile = np.where(mask, profile, style.halo * np.exp(-np.maximum(outside, 0) / style.halo_width))
        else:
            profile = np.where(mask, profile, 0.0)
        brightness = float(rng.lognormal(0.0, style.brightness_spread)) * (style.outlier_gain if outlier else 1.0)
        return _synthetic._Blob((slice(lo[0], hi[0]), slice(lo[1], hi[1])), mask, profile.astype("float32"),
                                brightness)

    return make_blob


def _n_objects(style: Style, shape: Tuple[int, int]) -> int:
    r = 0.5 * sum(style.radius_range)
    mean_area = np.pi * r * r * 0.5 * sum(style.aspect_range)
    return int(round(style.coverage * shape[0] * shape[1] / mean_area))


def _spots(rng: np.random.Generator, labels: np.ndarray, n_objects: int, mean_spots: float, scale: float):
    """Small Gaussian spots at random pixels of the objects (amplitudes in units of the object brightness)."""
    spots = np.zeros(labels.shape, dtype="float32")
    if mean_spots <= 0 or n_objects == 0:
        return spots
    ys, xs = np.nonzero(labels)
    n = rng.poisson(mean_spots * n_objects)
    if n == 0 or len(ys) == 0:
        return spots
    pick = rng.integers(len(ys), size=n)
    np.add.at(spots, (ys[pick], xs[pick]), rng.uniform(0.3, 1.2, size=n).astype("float32"))
    sigma = rng.uniform(0.8, 1.8) * max(scale / 12.0, 0.6)
    return ndimage.gaussian_filter(spots, sigma) * (2 * np.pi * sigma ** 2)


def _background(rng: np.random.Generator, style: Style, shape: Tuple[int, int]) -> np.ndarray:
    """Background in photons: level, unevenness, gradient, out-of-focus objects and debris."""
    h, w = shape
    level = style.background * style.photons
    bg = level * (1.0 + style.unevenness * _synthetic._smooth_field(rng, shape, n_nodes=4))
    if style.gradient > 0:
        direction = rng.uniform(0, 2 * np.pi)
        yy, xx = np.meshgrid(np.linspace(0, 1, h, dtype="float32"), np.linspace(0, 1, w, dtype="float32"),
                             indexing="ij")
        ramp = np.cos(direction) * yy + np.sin(direction) * xx
        ramp -= ramp.min()
        bg += style.gradient * style.photons * ramp / max(float(ramp.max()), 1e-6)
    r_mean = 0.5 * sum(style.radius_range)
    if style.out_of_focus > 0:
        oof = np.zeros(shape, dtype="float32")
        for _ in range(style.out_of_focus):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = r_mean * rng.uniform(0.8, 1.6)
            y0, y1, x0, x1 = (max(int(cy - r), 0), min(int(cy + r) + 1, h), max(int(cx - r), 0),
                              min(int(cx + r) + 1, w))
            if y1 <= y0 or x1 <= x0:
                continue
            yy, xx = np.ogrid[y0:y1, x0:x1]
            oof[y0:y1, x0:x1] += rng.uniform(0.15, 0.45) * ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
        bg += style.photons * ndimage.gaussian_filter(oof, max(0.6 * r_mean, 4.0))
    if style.debris > 0:
        specks = np.zeros(shape, dtype="float32")
        n = style.debris
        ys, xs = rng.integers(0, h, size=n), rng.integers(0, w, size=n)
        np.add.at(specks, (ys, xs), rng.uniform(0.5, 3.0, size=n).astype("float32"))
        # specks of 1-3 pixels radius (much smaller than the smallest objects of the training styles)
        bg += style.photons * ndimage.gaussian_filter(specks, 1.0) * (2 * np.pi)
    return bg.astype("float32")


def _acquire(rng: np.random.Generator, style: Style, expected: np.ndarray) -> np.ndarray:
    """Blur, Poisson and read noise, gain, offset and the output type."""
    sigma = tuple(float(s) for s in style.psf_sigma)
    if max(sigma) > 0:
        expected = ndimage.gaussian_filter(expected, sigma)
    np.maximum(expected, 0, out=expected)
    photons = rng.poisson(expected).astype("float32")
    if style.read_noise > 0:
        photons += style.read_noise * rng.standard_normal(size=expected.shape, dtype=np.float32)
    return _to_dtype(style.offset + style.gain * photons, style.dtype)


def _to_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return values.astype("float32")
    return np.clip(np.round(values), 0, _DTYPE_MAX[dtype]).astype(dtype)


def _render_empty(rng: np.random.Generator, style: Style, shape: Tuple[int, int]) -> np.ndarray:
    if style.kind == "blank":
        return np.zeros(shape, dtype=style.dtype)
    if style.kind == "constant":
        return np.full(shape, style.constant_value, dtype="float64").astype(style.dtype)
    if style.kind == "noise":
        photons = rng.poisson(style.photons, size=shape).astype("float32")
        photons += style.read_noise * rng.standard_normal(size=shape, dtype=np.float32)
        if style.noise_correlation > 0:
            photons = ndimage.gaussian_filter(photons, style.noise_correlation)
        return _to_dtype(style.offset + style.gain * photons, style.dtype)
    return _acquire(rng, style, _background(rng, style, shape))  # "background"


def render_style(style: Style, shape: Tuple[int, int], rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Render one 2D image of ``style`` and its instance labels.

    Args:
        style: The look (see :class:`Style`).
        shape: (height, width), both at least 16.
        rng: The random generator; the same state gives the same arrays.

    Returns:
        The image of ``shape`` in ``style.dtype``.
        The instance labels of ``shape``, uint32, background 0, ids 1..N (N = 0 for the kinds without objects).
    """
    shape = _synthetic.check_shape(shape, 2)
    _check_style(style)
    labels = np.zeros(shape, dtype="uint32")
    if style.kind != "objects":
        return _render_empty(rng, style, shape), labels
    n_objects = _n_objects(style, shape)
    centres = None
    if style.clustering > 0:
        n_clusters = max(1, int(round(n_objects * rng.uniform(0.08, 0.2))))
        centres = rng.uniform((0, 0), shape, size=(n_clusters, 2))
    pad = 4.0 * style.halo_width if style.halo > 0 else 0.0
    make_blob = _blob_maker(style, shape, centres, pad)
    min_radius = 0.5 * style.radius_range[0] * style.aspect_range[0]  # also lets the compact outliers in
    labels, blobs = _synthetic.place_blobs(
        rng, shape, n_objects, (max(min_radius, 2.0), style.radius_range[1]), max_overlap=style.max_overlap,
        max_attempts_per_object=30, make_blob=make_blob, strict=False,
    )
    signal = np.zeros(shape, dtype="float32")
    for blob in blobs:
        signal[blob.slices] += blob.brightness * blob.profile
    inside = labels > 0
    r_mean = 0.5 * sum(style.radius_range)
    if style.inhomogeneity > 0:
        n_nodes = max(4, int(round(max(shape) / max(r_mean, 4.0))))
        signal *= 1.0 + style.inhomogeneity * np.clip(_synthetic._smooth_field(rng, shape, n_nodes), -1, 1)
    if style.texture > 0:
        signal *= np.clip(1.0 + style.texture * _synthetic._texture(rng, shape, style.texture_scale), 0.1, None)
    signal += _spots(rng, labels, len(blobs), style.spots, r_mean) * inside
    expected = style.photons * signal + _background(rng, style, shape)
    return _acquire(rng, style, expected), labels


#
# The training distribution
#

# Ranges of the settings the bundled demo model is trained on (sample_training_style). The held-out styles of
# scripts/demo_model_styles.json lie outside them in at least one setting each (tests/test_synthetic_styles.py).
TRAINING_RANGES: Dict[str, Tuple[float, float]] = {
    "radius_min": (4.0, 28.0),         # radius_range = (radius_min, radius_min * radius_ratio)
    "radius_ratio": (1.2, 2.0),
    "aspect_min": (0.4, 0.95),         # aspect_range = (aspect_min, 1)
    "irregularity": (0.0, 0.12),
    "lobe_depth": (0.1, 0.3),          # with lobes 3..5, for a quarter of the images
    "coverage": (0.05, 0.45),
    "clustering": (0.0, 0.9),
    "brightness_spread": (0.05, 0.5),
    "outlier_fraction": (0.0, 0.08),
    "outlier_gain": (2.0, 5.0),
    "inhomogeneity": (0.0, 0.4),
    "texture": (0.0, 0.4),
    "texture_scale": (0.7, 2.5),
    "spots": (0.0, 3.0),
    "edge_softness": (0.0, 0.8),
    "halo": (0.0, 0.35),
    "halo_width": (1.5, 5.0),
    "background": (0.02, 0.5),
    "gradient": (0.0, 0.5),
    "out_of_focus": (0, 8),
    "debris": (0, 30),
    "photons": (12.0, 3000.0),         # log-uniform
    "psf_sigma_min": (0.5, 2.5),       # the smaller and the larger blur sigma (y / x), pixels
    "psf_sigma_max": (0.5, 2.5),
    "psf_anisotropy": (1.0, 2.0),
    "read_noise": (0.0, 6.0),
    "offset": (0.0, 200.0),
}

# Images without objects among the training images, by kind. Blank and constant images are no training images:
# normalised for the model they are all zeros, and automatic segmentation returns no objects for an image without
# contrast without running the model (micro_sam.instance_segmentation.InstanceSegmentationWithDecoder).
EMPTY_KIND_WEIGHTS = {"noise": 0.55, "background": 0.45}


def style_settings(style: Style) -> Dict[str, float]:
    """The settings of ``style`` under the names of :data:`TRAINING_RANGES`."""
    sy, sx = style.psf_sigma
    return {
        "radius_min": style.radius_range[0], "radius_ratio": style.radius_range[1] / style.radius_range[0],
        "aspect_min": style.aspect_range[0], "irregularity": style.irregularity, "lobe_depth": style.lobe_depth,
        "coverage": style.coverage, "clustering": style.clustering, "brightness_spread": style.brightness_spread,
        "outlier_fraction": style.outlier_fraction, "outlier_gain": style.outlier_gain,
        "inhomogeneity": style.inhomogeneity, "texture": style.texture, "texture_scale": style.texture_scale,
        "spots": style.spots, "edge_softness": style.edge_softness, "halo": style.halo,
        "halo_width": style.halo_width, "background": style.background, "gradient": style.gradient,
        "out_of_focus": style.out_of_focus, "debris": style.debris, "photons": style.photons,
        "psf_sigma_min": min(sy, sx), "psf_sigma_max": max(sy, sx), "psf_anisotropy": max(sy, sx) / max(min(sy, sx), 1e-6),
        "read_noise": style.read_noise,
        # float images: the offset in grey values of a camera with gain 1 (the sampler scales both)
        "offset": style.offset / style.gain if style.dtype == "float32" else style.offset,
    }


def settings_outside_training(style: Style) -> Dict[str, float]:
    """The settings of ``style`` that lie outside :data:`TRAINING_RANGES` (name -> value)."""
    outside = {}
    for name, value in style_settings(style).items():
        lo, hi = TRAINING_RANGES[name]
        if name in ("lobe_depth", "outlier_gain", "halo_width", "texture_scale") and not _uses(style, name):
            continue
        if not lo <= value <= hi:
            outside[name] = value
    return outside


def _uses(style: Style, name: str) -> bool:
    return {"lobe_depth": style.lobes > 0, "outlier_gain": style.outlier_fraction > 0, "halo_width": style.halo > 0,
            "texture_scale": style.texture > 0}[name]


def _uniform(rng, name):
    return float(rng.uniform(*TRAINING_RANGES[name]))


def _gain_and_dtype(rng: np.random.Generator, peak_photons: float) -> Dict[str, Any]:
    """Output type, gain and offset: 8-bit images that (nearly) fill their range, 16-bit images from very dim
    (a few hundred grey values) to bright, float images at any scale."""
    dtype = str(rng.choice(DTYPES, p=(0.4, 0.45, 0.15)))
    offset = _uniform(rng, "offset") if rng.random() < 0.5 else 0.0
    if dtype == "uint8":
        offset = min(offset, 40.0)
        gain = (255.0 - offset) * rng.uniform(0.3, 1.05) / peak_photons
    elif dtype == "uint16":
        gain = float(np.exp(rng.uniform(np.log(0.5), np.log(20.0))))
        gain = min(gain, (65535.0 - offset) / peak_photons)
    else:
        gain = float(np.exp(rng.uniform(np.log(1e-4), np.log(10.0))))
        offset *= gain
    return {"dtype": dtype, "gain": gain, "offset": offset}


def sample_training_style(rng: np.random.Generator, empty_fraction: float = 0.1) -> Style:
    """Draw the style of one training image from :data:`TRAINING_RANGES`.

    Args:
        rng: The random generator.
        empty_fraction: Probability of an image without objects (noise or background only; see
            :data:`EMPTY_KIND_WEIGHTS`).

    Returns:
        The style.
    """
    if rng.random() < empty_fraction:
        return _sample_empty_style(rng)
    r_min = _uniform(rng, "radius_min")
    radius_range = (r_min, r_min * _uniform(rng, "radius_ratio"))
    aspect_min = _uniform(rng, "aspect_min") if rng.random() < 0.5 else float(rng.uniform(0.75, 0.95))
    lobed = rng.random() < 0.25
    photons = float(np.exp(rng.uniform(*np.log(TRAINING_RANGES["photons"]))))
    background = float(np.exp(rng.uniform(*np.log(TRAINING_RANGES["background"]))))
    sy = _uniform(rng, "psf_sigma_min")
    sx = float(np.clip(sy * _uniform(rng, "psf_anisotropy") ** rng.choice([-1, 1]),
                       *TRAINING_RANGES["psf_sigma_max"]))
    if rng.random() < 0.5:
        sy, sx = sx, sy
    outlier = rng.random() < 0.3
    halo = rng.random() < 0.3
    style = Style(
        radius_range=radius_range, aspect_range=(aspect_min, 1.0),
        irregularity=_uniform(rng, "irregularity"),
        lobes=int(rng.integers(3, 6)) if lobed else 0, lobe_depth=_uniform(rng, "lobe_depth") if lobed else 0.0,
        coverage=_uniform(rng, "coverage"), clustering=_uniform(rng, "clustering") if rng.random() < 0.6 else 0.0,
        brightness_spread=_uniform(rng, "brightness_spread"),
        outlier_fraction=_uniform(rng, "outlier_fraction") if outlier else 0.0,
        outlier_gain=_uniform(rng, "outlier_gain"),
        inhomogeneity=_uniform(rng, "inhomogeneity"), texture=_uniform(rng, "texture"),
        texture_scale=_uniform(rng, "texture_scale"), spots=_uniform(rng, "spots") if rng.random() < 0.4 else 0.0,
        edge_softness=_uniform(rng, "edge_softness"),
        halo=_uniform(rng, "halo") if halo else 0.0, halo_width=_uniform(rng, "halo_width"),
        background=background, gradient=_uniform(rng, "gradient") if rng.random() < 0.5 else 0.0,
        out_of_focus=int(rng.integers(0, 9)) if rng.random() < 0.3 else 0,
        debris=int(rng.integers(0, 31)) if rng.random() < 0.3 else 0,
        photons=photons, psf_sigma=(sy, sx), read_noise=_uniform(rng, "read_noise"),
        **_gain_and_dtype(rng, photons * (1.0 + background) * 1.5),
    )
    _check_style(style)
    return style


def _sample_empty_style(rng: np.random.Generator) -> Style:
    kinds = list(EMPTY_KIND_WEIGHTS)
    kind = str(rng.choice(kinds, p=[EMPTY_KIND_WEIGHTS[k] for k in kinds]))
    photons = float(np.exp(rng.uniform(np.log(0.3), np.log(3000.0))))
    acquisition = _gain_and_dtype(rng, photons * 1.5 + 10)
    if kind == "noise":
        return Style(kind=kind, photons=photons, read_noise=_uniform(rng, "read_noise"),
                     noise_correlation=float(rng.uniform(0.0, 1.2)) if rng.random() < 0.4 else 0.0,
                     **acquisition)
    return Style(kind=kind, photons=photons, background=float(rng.uniform(0.05, 0.6)),
                 gradient=_uniform(rng, "gradient"), unevenness=float(rng.uniform(0.0, 0.6)),
                 out_of_focus=int(rng.integers(0, 9)), debris=int(rng.integers(0, 31)),
                 radius_range=(float(rng.uniform(5, 20)),) * 2, read_noise=_uniform(rng, "read_noise"),
                 psf_sigma=(_uniform(rng, "psf_sigma_min"),) * 2, **acquisition)
