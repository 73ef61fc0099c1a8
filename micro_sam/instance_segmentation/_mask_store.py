"""Compact storage of the masks predicted for a point grid, and the vectorised steps that produce them.

Each mask is stored as the bit-packed content of its bounding box, so that the state of a mask generator is
small, picklable (plain numpy arrays) and cheap to filter: thresholds and NMS only touch the per-mask scalar
arrays, and only the masks that survive are decoded.

Boxes follow segment_anything's AMG convention: XYXY with *inclusive* right / bottom coordinates
(``x1`` is the last column of the mask), [0, 0, 0, 0] for an empty mask.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

MaskTable = Dict[str, np.ndarray]

# The per-mask arrays of a table, in the order they are concatenated / filtered.
_PER_MASK_KEYS = ("iou_preds", "stability_score", "boxes", "points", "areas")


def empty_table() -> MaskTable:
    return {
        "iou_preds": np.zeros(0, dtype="float32"),
        "stability_score": np.zeros(0, dtype="float32"),
        "boxes": np.zeros((0, 4), dtype="int64"),
        "points": np.zeros((0, 2), dtype="float64"),
        "areas": np.zeros(0, dtype="int64"),
        "mask_bits": np.zeros(0, dtype="uint8"),
        "mask_offsets": np.zeros(1, dtype="int64"),
    }


def n_masks(table: MaskTable) -> int:
    return len(table["iou_preds"])


def concatenate(tables: Sequence[MaskTable]) -> MaskTable:
    """Concatenate mask tables (in order)."""
    tables = [t for t in tables if n_masks(t) > 0]
    if not tables:
        return empty_table()
    out = {key: np.concatenate([t[key] for t in tables]) for key in _PER_MASK_KEYS}
    out["mask_bits"] = np.concatenate([t["mask_bits"] for t in tables])
    offsets, start = [np.zeros(1, dtype="int64")], 0
    for t in tables:
        offsets.append(t["mask_offsets"][1:] + start)
        start += int(t["mask_offsets"][-1])
    out["mask_offsets"] = np.concatenate(offsets)
    return out


def masks_to_boxes(binary: "torch.Tensor") -> "torch.Tensor":
    """XYXY boxes (inclusive) of a (N, H, W) bool torch tensor; [0, 0, 0, 0] for empty masks."""
    import torch

    n, h, w = binary.shape
    rows, cols = binary.any(dim=2), binary.any(dim=1)
    nonempty = rows.any(dim=1)
    top = torch.argmax(rows.to(torch.uint8), dim=1)
    bottom = h - 1 - torch.argmax(rows.flip(1).to(torch.uint8), dim=1)
    left = torch.argmax(cols.to(torch.uint8), dim=1)
    right = w - 1 - torch.argmax(cols.flip(1).to(torch.uint8), dim=1)
    boxes = torch.stack([left, top, right, bottom], dim=1).to(torch.int64)
    return boxes * nonempty[:, None]


def stability_score(logits: "torch.Tensor", mask_threshold: float, offset: float) -> "torch.Tensor":
    """IoU of the masks thresholded at ``mask_threshold +- offset``, for (N, H, W) logits (float32 result).

    Computed as segment_anything's ``calculate_stability_score`` (integer counts, then one float division),
    so the scores are identical. Empty masks at the low threshold give NaN.
    """
    import torch

    inter = (logits > (mask_threshold + offset)).sum(dim=(-1, -2), dtype=torch.int32)
    union = (logits > (mask_threshold - offset)).sum(dim=(-1, -2), dtype=torch.int32)
    return inter / union


def pack(binary: np.ndarray, boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bit-pack the box contents of (N, H, W) bool masks.

    Returns:
        The concatenated bits (uint8), offsets (N + 1) into them and the mask areas (N,).
    """
    chunks: List[np.ndarray] = []
    offsets = np.zeros(len(binary) + 1, dtype="int64")
    areas = np.zeros(len(binary), dtype="int64")
    for k, (mask, (x0, y0, x1, y1)) in enumerate(zip(binary, boxes)):
        crop = mask[y0:y1 + 1, x0:x1 + 1]
        area = int(np.count_nonzero(crop))
        areas[k] = area
        if area:
            bits = np.packbits(crop, axis=None)
            chunks.append(bits)
            offsets[k + 1] = offsets[k] + len(bits)
        else:
            offsets[k + 1] = offsets[k]
    bits = np.concatenate(chunks) if chunks else np.zeros(0, dtype="uint8")
    return bits, offsets, areas


def unpack_box(table: MaskTable, k: int) -> np.ndarray:
    """The content of mask ``k``'s box (bool, (y1 - y0 + 1, x1 - x0 + 1)); (0, 0) for an empty mask."""
    if table["areas"][k] == 0:
        return np.zeros((0, 0), dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in table["boxes"][k])
    h, w = y1 - y0 + 1, x1 - x0 + 1
    bits = table["mask_bits"][table["mask_offsets"][k]:table["mask_offsets"][k + 1]]
    return np.unpackbits(bits, count=h * w).reshape(h, w).astype(bool)


def unpack_full(table: MaskTable, k: int, shape: Tuple[int, int], offset: Tuple[int, int] = (0, 0)) -> np.ndarray:
    """Mask ``k`` as a full (H, W) bool array; ``offset`` (x, y) moves it from its crop into the image."""
    mask = np.zeros(shape, dtype=bool)
    if table["areas"][k] == 0:
        return mask
    x0, y0, _, _ = (int(v) for v in table["boxes"][k])
    content = unpack_box(table, k)
    y, x = y0 + offset[1], x0 + offset[0]
    mask[y:y + content.shape[0], x:x + content.shape[1]] = content
    return mask


def select(table: MaskTable, index: np.ndarray) -> MaskTable:
    """A table with the masks ``index`` (bool mask or integer indices, in that order)."""
    index = np.asarray(index)
    if index.dtype == bool:
        index = np.flatnonzero(index)
    out = {key: table[key][index] for key in _PER_MASK_KEYS}
    starts, stops = table["mask_offsets"][index], table["mask_offsets"][index + 1]
    lengths = stops - starts
    out["mask_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype("int64")
    if len(index) and lengths.sum():
        pieces = [table["mask_bits"][a:b] for a, b in zip(starts, stops) if b > a]
        out["mask_bits"] = np.concatenate(pieces)
    else:
        out["mask_bits"] = np.zeros(0, dtype="uint8")
    return out


def rle_encode(mask: np.ndarray) -> Dict[str, list]:
    """Uncompressed RLE of a 2D mask in COCO's layout: column-major counts, starting with background."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def rle_decode(rle: Dict[str, list]) -> np.ndarray:
    """Inverse of :func:`rle_encode`."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype="int64")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T.copy()
