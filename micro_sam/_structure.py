"""Is there anything in an image beyond noise? A cheap test run before automatic instance segmentation.

A network trained to find objects finds some in any image, also in pure camera noise. Automatic instance
segmentation therefore first asks whether the image holds any structure that noise does not explain, and returns no
objects for one that holds none (an image without contrast, or pure noise).

The test: each pixel is clipped to the range of its four neighbours (removes isolated hot pixels), a Gaussian of
sigma 2 pixels (averages the noise of about 50 pixels, so that an object of a few pixels' radius stands out of it),
and the subtraction of a smooth quadratic background (gradients and uneven illumination are no objects). The noise
level after smoothing is predicted from the root mean square differences of pixels 1 and 2 apart (their ratio gives
the noise's correlation, up to a blur of 1.2 pixels), which makes the test independent of the camera's gain, offset
and dtype, and exact for any noise distribution (Poisson, Gaussian, sparse counts). The image holds structure if its
brightest (or darkest) smoothed pixel lies more than :func:`noise_threshold` such standard deviations beyond the
background level (the darkest 2.3 % plus two standard deviations). Pure white noise reaches 4-7, the images with
objects of the held-out evaluation 20 and more (``scripts/evaluate_demo_model.py``); the threshold is 12, more for
images under 64 x 64 pixels. Not recognised as noise: noise correlated over more than about a pixel (blurred or
interpolated noise) and hot pixels in pairs or clusters.
"""
from typing import Tuple

import numpy as np

__all__ = ["has_signal", "noise_significance", "noise_threshold"]

SIGMA = 2.0
THRESHOLD = 12.0
_FULL_PIXELS = 64 * 64
_FAR_LAG = 2
_MAX_CORRELATION = float(np.exp(-1 / (4 * 1.2 ** 2)))  # blur of at most 1.2 pixels


def noise_threshold(shape: Tuple[int, int]) -> float:
    """The significance above which an image of this (H, W) shape holds structure (see the module docstring)."""
    n_pixels = max(int(shape[0]) * int(shape[1]), 1)
    return THRESHOLD * max(1.0, float(np.sqrt(_FULL_PIXELS / n_pixels)))


def _quadratic_background(values: np.ndarray) -> np.ndarray:
    """A quadratic surface fitted to the darker half of a subsample of the (H, W) image (two rounds)."""
    h, w = values.shape
    step = max(1, int(np.sqrt(h * w / 4096)))
    ys, xs = np.mgrid[0:h:step, 0:w:step]

    def design(y, x):
        y = y / h - 0.5
        x = x / w - 0.5
        return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)

    a = design(ys.ravel().astype("float64"), xs.ravel().astype("float64"))
    v = values[::step, ::step].ravel().astype("float64")
    keep = np.ones(v.shape, dtype=bool)
    for _ in range(2):
        coefficients = np.linalg.lstsq(a[keep], v[keep], rcond=None)[0]
        residual = v - a @ coefficients
        keep = residual <= np.median(residual)
    c = coefficients.astype("float32")
    y = (np.arange(h, dtype="float32") / h - 0.5)[:, None]
    x = (np.arange(w, dtype="float32") / w - 0.5)[None, :]
    return c[0] + c[1] * x + c[2] * y + c[3] * x * x + c[4] * x * y + c[5] * y * y


def _clip_to_neighbours(x: np.ndarray) -> np.ndarray:
    """Each pixel clipped to the range of its four neighbours: removes isolated hot and cold pixels."""
    padded = np.pad(x, 1, mode="edge")
    neighbours = (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:])
    high = np.maximum(np.maximum(neighbours[0], neighbours[1]), np.maximum(neighbours[2], neighbours[3]))
    low = np.minimum(np.minimum(neighbours[0], neighbours[1]), np.minimum(neighbours[2], neighbours[3]))
    return np.clip(x, low, high)


def _smoothed(x: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    s = ndimage.gaussian_filter(x, SIGMA, mode="reflect")
    return s - _quadratic_background(s)


def _noise_sd_after_smoothing(x: np.ndarray) -> float:
    """The standard deviation that the image's noise has after the Gaussian of ``SIGMA``.

    The noise variance comes from differences of pixels 4 apart (beyond the correlation of camera noise), its
    correlation length from the ratio to the differences of neighbours (white noise: equal); both are root mean
    squares (exact for any noise distribution, also sparse counts; objects' edges only make them larger, i.e. the
    test more cautious), with the largest 1 % of the squared differences limited to their 99th percentile. A Gaussian correlation of ``blur`` pixels leaves the fraction
    (blur^2 + 1 / 4 pi) / (SIGMA^2 + blur^2 + 1 / 4 pi) of the variance after smoothing (white noise: blur 0).
    """
    def mean_square_difference(lag):
        squares = [np.square(d.ravel(), dtype="float64") for d in (x[lag:, :] - x[:-lag, :], x[:, lag:] - x[:, :-lag])
                   if d.size]
        squares = np.concatenate(squares) if squares else np.zeros(1)
        # the largest 1 % limited to the 99th percentile: hot pixels (up to ~0.25 % of the pixels) do not count
        return float(np.mean(np.minimum(squares, np.percentile(squares, 99))))

    near, far = mean_square_difference(1), mean_square_difference(_FAR_LAG)
    variance = max(far, near) / 2
    correlation = min(max(1.0 - near / max(far, 1e-30), 0.0), _MAX_CORRELATION)
    blur2 = -1.0 / (4 * np.log(correlation)) if correlation > 0 else 0.0
    white = 1.0 / (4 * np.pi)
    return float(np.sqrt(variance * (blur2 + white) / (SIGMA ** 2 + blur2 + white)))


def _channel_significance(channel: np.ndarray) -> float:
    x = channel.astype("float32", copy=False)
    # the noise level from the image as it is (from the clipped image it would be too low for sparse counts), the
    # excursion from the image without isolated hot / cold pixels
    noise_sd = _noise_sd_after_smoothing(x)
    s = _smoothed(_clip_to_neighbours(x))
    low, high = np.percentile(s, [2.275, 97.725])
    top, bottom = float(s.max()), float(s.min())
    noise_sd = max(noise_sd, 1e-6 * max(top - bottom, np.finfo("float32").tiny))
    # the background level: 2 standard deviations above the darkest 2.3 % (below the brightest for dark objects)
    brighter = (top - (low + 2 * noise_sd)) / noise_sd
    darker = ((high - 2 * noise_sd) - bottom) / noise_sd
    return float(max(brighter, darker, 0.0))


def noise_significance(image) -> float:
    """How far, in noise standard deviations, the image's most salient smoothed pixel lies beyond its background.

    Args:
        image: (H, W) or (H, W, C) image of any real dtype; the largest value of its channels is returned.

    Returns:
        0 for an image without contrast, about 4-6 for pure noise, tens to thousands for images with objects.

    Raises:
        ValueError: For an image that is not 2D (with or without a channel axis).
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"Expected an (H, W) or (H, W, C) image, got shape {image.shape}.")
    channels = image[..., None] if image.ndim == 2 else image
    if channels.size == 0:
        return 0.0
    best = 0.0
    for c in range(channels.shape[-1]):
        channel = channels[..., c]
        if channel.max() > channel.min():
            best = max(best, _channel_significance(channel))
    return best


def has_signal(image) -> bool:
    """Whether an (H, W) or (H, W, C) image holds anything beyond noise (False: no contrast or pure noise)."""
    image = np.asarray(image)
    return noise_significance(image) > noise_threshold(image.shape[:2])
