"""Private generator of a synthetic fluorescence time-lapse of moving, growing and dividing nuclei.

The public entry point is :func:`micro_sam.sample_data.synthetic_timelapse`. Pure numpy / scipy, deterministic
given a ``numpy.random.Generator``.

Model, frame by frame:

- A nucleus is an irregular ellipse (low-order harmonics on its boundary) with a centre, a semi-major axis,
  an aspect ratio, an orientation and a brightness. It moves with a persistent random velocity (a damped random
  walk), is pushed away from nuclei it overlaps and from the image border, rotates slowly and grows (its area
  doubles over its cell cycle).
- At the end of its cycle a nucleus elongates and brightens for a few frames (condensed chromatin), then
  divides: in the next frame it is replaced by two daughters, each with about half its area, placed on either
  side of its centre along its long axis and moving apart. The daughters start new tracks whose parent is the
  mother's track.
- Labels: every nucleus is drawn with its track id; where nuclei overlap the front one (fixed depth order)
  owns the pixels. Track ids count from 1 in the order in which the nuclei appear.
- Image: the same rendering as the 2D nuclei of :mod:`micro_sam._synthetic` (radial profile, granular texture,
  uneven background, illumination falloff, blur, Poisson and read noise); background and illumination are
  fixed over time, texture and noise change every frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np
from scipy import ndimage

from . import _synthetic

_N_HARMONICS = 3
_PRE_DIVISION_FRAMES = 3  # frames of elongation and brightening before a division
_DAUGHTER_SCALE = 0.72  # semi-axis of a daughter relative to the mother's (area ~ 0.52)


@dataclass
class _Nucleus:
    track: int
    center: np.ndarray  # (y, x)
    velocity: np.ndarray
    radius: float  # semi-major axis
    aspect: float  # minor / major
    angle: float
    amps: np.ndarray
    phases: np.ndarray
    brightness: float
    depth: float
    age: int
    cycle: int
    growth: float = field(init=False)

    def __post_init__(self):
        # Area doubles over the cycle: the radius grows by sqrt(2).
        self.growth = 2.0 ** (0.5 / self.cycle)


def _new_nucleus(rng, track, center, radius, cycle_range, age=0) -> _Nucleus:
    cycle = int(rng.integers(cycle_range[0], cycle_range[1] + 1))
    return _Nucleus(
        track=track, center=np.asarray(center, dtype="float64"), velocity=rng.normal(0.0, 0.5, size=2),
        radius=float(radius), aspect=float(rng.uniform(0.75, 0.95)), angle=float(rng.uniform(0, np.pi)),
        amps=rng.uniform(0.0, 0.06, size=_N_HARMONICS), phases=rng.uniform(0, 2 * np.pi, size=_N_HARMONICS),
        brightness=float(rng.lognormal(0.0, 0.25)), depth=float(rng.random()), age=int(age), cycle=cycle,
    )


def _draw(nucleus: _Nucleus, shape: Tuple[int, int]):
    """Bounding-box slices, mask and radial profile (1 at the centre) of a nucleus; None if outside the image."""
    aspect = nucleus.aspect
    if nucleus.age >= nucleus.cycle - _PRE_DIVISION_FRAMES:  # elongated, condensed chromatin
        aspect = min(aspect, 0.62)
    r_major, r_minor = nucleus.radius, nucleus.radius * aspect
    bound = r_major * (1.0 + nucleus.amps.sum()) + 1.0
    slices, coords = [], []
    for c, size in zip(nucleus.center, shape):
        lo, hi = max(int(np.floor(c - bound)), 0), min(int(np.ceil(c + bound)) + 1, size)
        if hi <= lo:
            return None
        slices.append(slice(lo, hi))
        coords.append(np.arange(lo, hi, dtype="float64") + 0.5 - c)
    dy, dx = np.meshgrid(*coords, indexing="ij", sparse=True)
    cos, sin = np.cos(nucleus.angle), np.sin(nucleus.angle)
    u, v = dy * cos + dx * sin, -dy * sin + dx * cos
    theta = np.arctan2(v, u)
    boundary = 1.0 + sum(a * np.cos(k * theta + p) for k, (a, p) in enumerate(zip(nucleus.amps, nucleus.phases), 2))
    rel = np.sqrt((u / r_major) ** 2 + (v / r_minor) ** 2) / boundary
    mask = rel <= 1.0
    if not mask.any():
        return None
    profile = np.where(mask, 1.0 - 0.3 * np.clip(rel, 0, 1) ** 2.5, 0.0)
    return tuple(slices), mask, profile


def _move(rng, nuclei: List[_Nucleus], shape: Tuple[int, int], speed: float) -> None:
    """One step of motion: damped random walk, repulsion between overlapping nuclei and from the border."""
    if not nuclei:
        return
    centers = np.array([n.center for n in nuclei])
    radii = np.array([n.radius for n in nuclei])
    push = np.zeros_like(centers)
    if len(nuclei) > 1:
        diff = centers[:, None, :] - centers[None, :, :]
        dist = np.linalg.norm(diff, axis=-1)
        np.fill_diagonal(dist, np.inf)
        contact = 0.95 * (radii[:, None] + radii[None, :])
        overlap = np.clip(contact - dist, 0, None)
        direction = diff / np.maximum(dist, 1e-6)[..., None]
        push = 0.25 * (overlap[..., None] * direction).sum(axis=1)
    for n, p in zip(nuclei, push):
        n.velocity = 0.8 * n.velocity + rng.normal(0.0, speed, size=2)
        n.center = n.center + n.velocity + p
        margin = 0.6 * n.radius
        for axis in range(2):
            lo, hi = margin, shape[axis] - margin
            if n.center[axis] < lo:
                n.center[axis], n.velocity[axis] = 2 * lo - n.center[axis], abs(n.velocity[axis])
            elif n.center[axis] > hi:
                n.center[axis], n.velocity[axis] = 2 * hi - n.center[axis], -abs(n.velocity[axis])
            n.center[axis] = float(np.clip(n.center[axis], 0, shape[axis] - 1))
        n.angle += rng.normal(0.0, 0.05)


def _place_initial(rng, shape, n_objects, radius_range, cycle_range) -> List[_Nucleus]:
    nuclei: List[_Nucleus] = []
    centers, radii = np.zeros((n_objects, 2)), np.zeros(n_objects)
    attempts = 0
    while len(nuclei) < n_objects:
        attempts += 1
        if attempts > 200 * max(n_objects, 1):
            raise ValueError(
                f"Could not place n_objects={n_objects} nuclei with radii {radius_range} into frames of shape "
                f"{shape}: only {len(nuclei)} fit. Use fewer objects, smaller radii or a larger shape."
            )
        radius = rng.uniform(*radius_range)
        center = rng.uniform((radius, radius), (shape[0] - radius, shape[1] - radius))
        n = len(nuclei)
        if n and (np.linalg.norm(centers[:n] - center, axis=1) < 1.1 * (radius + radii[:n])).any():
            continue
        centers[n], radii[n] = center, radius
        cycle = int(rng.integers(cycle_range[0], cycle_range[1] + 1))
        nucleus = _new_nucleus(rng, len(nuclei) + 1, center, radius, (cycle, cycle), age=rng.integers(0, cycle))
        # Earlier in its cycle the nucleus is smaller.
        nucleus.radius = radius * nucleus.growth ** (nucleus.age - cycle / 2)
        nuclei.append(nucleus)
    return nuclei


def _divide(rng, mother: _Nucleus, next_track: int, cycle_range) -> List[_Nucleus]:
    axis = np.array([np.cos(mother.angle), np.sin(mother.angle)])
    daughters = []
    for k, sign in enumerate((1.0, -1.0)):
        scale = _DAUGHTER_SCALE * rng.uniform(0.93, 1.07)
        center = mother.center + sign * 0.55 * mother.radius * axis
        d = _new_nucleus(rng, next_track + k, center, mother.radius * scale, cycle_range)
        d.velocity = mother.velocity + sign * 0.6 * axis
        d.angle = mother.angle + rng.normal(0.0, 0.2)
        d.depth = mother.depth + 1e-3 * sign
        d.brightness = mother.brightness * rng.uniform(0.9, 1.1)
        daughters.append(d)
    return daughters


def render_timelapse(
    rng: np.random.Generator,
    n_frames: int,
    shape: Tuple[int, int],
    n_objects: int,
    radius_range: Tuple[float, float],
    dtype,
    cycle_range: Tuple[int, int],
    speed: float = 0.6,
) -> Tuple[np.ndarray, np.ndarray, Dict[int, List[int]]]:
    """Simulate and render the time-lapse; returns (movie, labels, children of every track)."""
    nuclei = _place_initial(rng, shape, n_objects, radius_range, cycle_range)
    children: Dict[int, List[int]] = {n.track: [] for n in nuclei}
    next_track = len(nuclei) + 1

    level = rng.uniform(70.0, 110.0)
    background = rng.uniform(12.0, 22.0) * (1.0 + 0.35 * _synthetic._smooth_field(rng, shape, n_nodes=4))
    illumination = _synthetic._illumination(rng, shape)
    movie = np.zeros((n_frames,) + tuple(shape), dtype=dtype)
    labels = np.zeros((n_frames,) + tuple(shape), dtype="uint32")
    for t in range(n_frames):
        signal = np.zeros(shape, dtype="float32")
        for n in sorted(nuclei, key=lambda n: n.depth):  # back to front
            drawn = _draw(n, shape)
            if drawn is None:
                continue
            slices, mask, profile = drawn
            brightness = n.brightness * (1.4 if n.age >= n.cycle - _PRE_DIVISION_FRAMES else 1.0)
            signal[slices] += (level * brightness * profile).astype("float32")
            labels[t][slices][mask] = n.track
        signal *= np.clip(1.0 + 0.18 * _synthetic._texture(rng, shape, 1.2), 0.2, None)
        expected = ndimage.gaussian_filter((signal + background) * illumination, 1.2)
        photons = rng.poisson(np.maximum(expected, 0)).astype("float32")
        photons += 2.5 * rng.standard_normal(size=shape, dtype=np.float32)
        movie[t] = _synthetic.to_dtype(photons, dtype)
        if t == n_frames - 1:
            break

        # Advance to the next frame: divide, grow, age and move.
        survivors = []
        for n in nuclei:
            if n.age >= n.cycle:
                daughters = _divide(rng, n, next_track, cycle_range)
                next_track += len(daughters)
                children[n.track] = [d.track for d in daughters]
                children.update({d.track: [] for d in daughters})
                survivors.extend(daughters)
            else:
                n.age += 1
                n.radius *= n.growth
                survivors.append(n)
        nuclei = survivors
        _move(rng, nuclei, shape, speed)
    return movie, labels, children
