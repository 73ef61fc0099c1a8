"""The decoder's training targets, computed from a label image (the semantics of torch_em's
``PerObjectDistanceTransform(distances=True, boundary_distances=True, foreground=True)``, used by micro_sam
to train its decoders), with scipy only."""
import numpy as np
from scipy import ndimage


def decoder_targets(labels: np.ndarray):
    """Foreground, centre distance and boundary distance maps of a 2D label image.

    Per object: centre distance = Euclidean distance to the rounded centroid (or, if that lies outside the
    object, to the point farthest from the boundary), divided by its maximum in the object (0 at the centre,
    1 at the farthest pixel). Boundary distance = (max - d) / max where d is the distance to the object's
    inner boundary (0 at the innermost pixel, 1 on the boundary). Outside objects both are 1.

    Returns:
        foreground, center_distances, boundary_distances: float32 arrays of the labels' shape.
    """
    from skimage.measure import regionprops
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    foreground = (labels > 0).astype("float32")
    center = np.ones(labels.shape, dtype="float32")
    boundary = np.ones(labels.shape, dtype="float32")
    boundaries = find_boundaries(labels, mode="inner")
    for prop in regionprops(labels):
        bb = tuple(slice(prop.bbox[i], prop.bbox[i + 2]) for i in range(2))
        mask = labels[bb] == prop.label
        bdist = ndimage.distance_transform_edt(~boundaries[bb])
        bdist[~mask] = 0
        c = tuple(int(v) for v in np.round(prop.centroid).astype(int) - [b.start for b in bb])
        if not mask[c]:
            c = np.unravel_index(np.argmax(bdist), bdist.shape)
        seed = np.ones(mask.shape, dtype=bool)
        seed[c] = False
        cdist = ndimage.distance_transform_edt(seed)
        inv = bdist.max() - bdist
        cdist[~mask], inv[~mask] = 0, 0
        center[bb][mask] = (cdist / (cdist.max() + 1e-7))[mask]
        boundary[bb][mask] = (inv / (inv.max() + 1e-7))[mask]
    return foreground, center, boundary
