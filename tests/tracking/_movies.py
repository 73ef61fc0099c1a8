"""Hand-made label movies for the tracking tests."""
import numpy as np


def relabel_frames(labels: np.ndarray, seed: int = 1, offset: int = 0) -> np.ndarray:
    """Give the objects of every frame new random ids (per frame), destroying the identities over time."""
    rng = np.random.default_rng(seed)
    result = np.zeros(labels.shape, dtype="uint64")
    for t, frame in enumerate(labels):
        ids = np.unique(frame)
        ids = ids[ids > 0]
        new = rng.permutation(len(ids)).astype("uint64") + 1 + offset
        lut = np.zeros(int(frame.max()) + 1, dtype="uint64")
        lut[ids] = new
        result[t] = lut[frame]
    return result


def division_movie() -> np.ndarray:
    """A square moving down one pixel per frame (track 1) and a mother (track 2) that divides after frame 2
    into daughters in rows 20-24 (track 3) and 25-29 (track 4). Shape (6, 40, 40), uint16."""
    seg = np.zeros((6, 40, 40), dtype="uint16")
    for t in range(6):
        seg[t, 2 + t:8 + t, 2:8] = 1
    seg[0:3, 20:30, 20:30] = 2
    seg[3:6, 20:25, 20:30] = 3
    seg[3:6, 25:30, 20:30] = 4
    return seg


def assert_same_tracks(result, lineages, expected, expected_lineages):
    """The tracking result equals the expected one up to a renumbering of the tracks (lineages mapped, too)."""
    result, expected = np.asarray(result), np.asarray(expected)
    assert result.shape == expected.shape
    assert np.array_equal(result != 0, expected != 0)
    pairs = np.unique(np.stack([result[result != 0], expected[expected != 0]]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1], "not a one-to-one renumbering"
    to_expected = dict(zip(pairs[0].tolist(), pairs[1].tolist()))
    mapped = sorted(sorted((to_expected[k], sorted(to_expected[c] for c in v)) for k, v in lineage.items())
                    for lineage in lineages)
    wanted = sorted(sorted((k, sorted(v)) for k, v in lineage.items()) for lineage in expected_lineages)
    assert mapped == wanted
