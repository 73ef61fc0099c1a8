"""A classical baseline for nuclei segmentation: Otsu threshold and distance-transform watershed (pure numpy / scipy
/ scikit-image, no model).

The image is smoothed, thresholded at Otsu's threshold (foreground: the brighter side), holes are filled and
small specks removed; touching objects are split by a watershed on the negative distance transform of the
foreground, seeded at its maxima that lie at least ``min_distance`` pixels apart (after the distance map is
smoothed a little, so that a rough outline does not give two seeds). This is the pipeline a user would try
before a deep-learning model; the bundled demo model is compared against it (``scripts/evaluate_demo_model.py``).
"""
from typing import Optional

import numpy as np
from scipy import ndimage

__all__ = ["otsu_watershed_segmentation"]


def otsu_watershed_segmentation(
    image: np.ndarray,
    smoothing: float = 1.0,
    min_distance: int = 5,
    distance_smoothing: float = 1.0,
    min_size: int = 10,
    threshold: Optional[float] = None,
) -> np.ndarray:
    """Segment bright objects on a darker background with an Otsu threshold and a distance-transform watershed.

    Args:
        image: The (H, W) grayscale image, any numeric dtype.
        smoothing: Sigma of the Gaussian applied to the image before thresholding (pixels; 0 for none).
        min_distance: Smallest distance between two seeds (pixels); larger values split less.
        distance_smoothing: Sigma of the Gaussian applied to the distance transform before the seeds are found.
        min_size: Objects (and foreground specks) with fewer pixels are removed.
        threshold: Foreground threshold on the smoothed image; None: Otsu's threshold.

    Returns:
        The (H, W) uint32 label image, background 0 and objects 1..N (all 0 for an image without contrast).

    Raises:
        ValueError: For an image that is not 2D or invalid parameters.
    """
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"Expected a 2D grayscale image, got shape {image.shape}.")
    if smoothing < 0 or distance_smoothing < 0 or min_distance < 1 or min_size < 0:
        raise ValueError("smoothing and distance_smoothing must be >= 0, min_distance >= 1 and min_size >= 0; got "
                         f"{smoothing}, {distance_smoothing}, {min_distance}, {min_size}.")
    labels = np.zeros(image.shape, dtype="uint32")
    smoothed = image.astype("float32")
    if smoothing > 0:
        smoothed = ndimage.gaussian_filter(smoothed, smoothing)
    if not np.isfinite(smoothed).all() or smoothed.max() <= smoothed.min():
        return labels
    foreground = smoothed > (threshold_otsu(smoothed) if threshold is None else threshold)
    foreground = ndimage.binary_fill_holes(foreground)
    components, n = ndimage.label(foreground)
    if n == 0:
        return labels
    sizes = np.bincount(components.ravel())
    foreground &= (sizes >= max(min_size, 1))[components]
    distance = ndimage.distance_transform_edt(foreground)
    if distance_smoothing > 0:
        distance = ndimage.gaussian_filter(distance, distance_smoothing)
    peaks = peak_local_max(distance, min_distance=int(min_distance), labels=ndimage.label(foreground)[0],
                           exclude_border=False)
    markers = np.zeros(image.shape, dtype="int32")
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    segmentation = watershed(-distance, markers, mask=foreground)
    # relabel consecutively without objects under min_size
    sizes = np.bincount(segmentation.ravel())
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    lut = np.zeros(len(sizes), dtype="uint32")
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype="uint32")
    return lut[segmentation]
