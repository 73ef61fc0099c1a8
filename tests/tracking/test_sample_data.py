"""sample_data for tracking: the synthetic time-lapse and the tracking example data (local HTTP server)."""
import functools
import hashlib
import http.server
import io
import threading
import zipfile

import numpy as np
import pytest
import tifffile

from micro_sam import sample_data
from micro_sam.sample_data import synthetic_timelapse


@pytest.fixture(scope="module")
def timelapse():
    return synthetic_timelapse(n_frames=30, shape=(128, 160), seed=4)


def _extents(labels):
    first, last, frames = {}, {}, {}
    for t, frame in enumerate(labels):
        for track in np.unique(frame)[1:].tolist():
            first.setdefault(track, t)
            last[track] = t
            frames.setdefault(track, []).append(t)
    return first, last, frames


def _region(labels, t, track):
    mask = labels[t] == track
    return mask.sum(), np.array([c.mean() for c in np.nonzero(mask)])


def test_deterministic():
    a = synthetic_timelapse(n_frames=5, shape=(64, 64), seed=1)
    b = synthetic_timelapse(n_frames=5, shape=(64, 64), seed=1)
    c = synthetic_timelapse(n_frames=5, shape=(64, 64), seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    assert not np.array_equal(a[1], c[1])
    movie16, labels16, _ = synthetic_timelapse(n_frames=2, shape=(64, 64), seed=1, dtype="uint16")
    assert movie16.dtype == np.uint16 and movie16.max() > 255
    np.testing.assert_array_equal(labels16, synthetic_timelapse(n_frames=2, shape=(64, 64), seed=1)[1])


def test_tracks_and_lineages_are_consistent(timelapse):
    movie, labels, lineages = timelapse
    assert movie.shape == labels.shape == (30, 128, 160) and movie.dtype == np.uint8 and labels.dtype == np.uint32
    first, last, frames = _extents(labels)
    tracks = sorted(first)
    assert tracks == list(range(1, len(tracks) + 1))
    assert [first[k] for k in tracks] == sorted(first[k] for k in tracks)  # numbered in order of appearance
    assert all(frames[k] == list(range(first[k], last[k] + 1)) for k in tracks)  # no gaps
    assert sorted(k for lineage in lineages for k in lineage) == tracks
    parents = {c: p for lineage in lineages for p, cs in lineage.items() for c in cs}
    n_divisions = 0
    for lineage in lineages:
        for mother, daughters in lineage.items():
            if not daughters:
                assert last[mother] == len(labels) - 1  # nuclei do not vanish
                continue
            n_divisions += 1
            assert len(daughters) == 2
            area, center = _region(labels, last[mother], mother)
            for d in daughters:
                assert first[d] == last[mother] + 1
                d_area, d_center = _region(labels, first[d], d)
                assert 0.3 * area < d_area < 0.8 * area
                assert np.linalg.norm(d_center - center) < 2 * np.sqrt(area / np.pi)
    assert all(first[k] == 0 for k in tracks if k not in parents)  # no nucleus appears from nowhere
    assert n_divisions >= 5


def test_nuclei_move_grow_and_are_visible(timelapse):
    movie, labels, _ = timelapse
    first, last, _ = _extents(labels)
    steps, growth = [], []
    for track in first:
        if last[track] - first[track] >= 10:
            a0, c0 = _region(labels, first[track], track)
            a1, c1 = _region(labels, first[track] + 10, track)
            steps.append(np.linalg.norm(c1 - c0) / 10)
            growth.append(a1 / a0)
    assert 0.3 < np.median(steps) < 5 and np.median(growth) > 1.1
    inside, outside = movie[labels > 0].mean(), movie[labels == 0].mean()
    assert inside > outside + 20


@pytest.mark.parametrize("kwargs, match", [
    ({"n_frames": 0}, "n_frames"),
    ({"shape": (16, 64)}, "too small"),
    ({"dtype": "float32"}, "dtype"),
    ({"n_objects": 60, "shape": (64, 64)}, "Could not place"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic_timelapse(**kwargs)


# --- the tracking example data, served from 127.0.0.1 -------------------------------------------------------------
def _tif_bytes(array):
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


@pytest.fixture
def served_tracking_data(tmp_path, monkeypatch):
    """Zips in the layout of the CTC HeLa sequence and its masks: a square moving right by 1 px per frame."""
    served = tmp_path / "served"
    served.mkdir()
    masks = np.zeros((84, 12, 100), dtype="uint16")
    for t in range(84):
        masks[t, 3:9, t:t + 6] = 7 + t % 3  # the id changes between frames
    images = [(m > 0).astype("uint8") * 200 + 20 for m in masks]
    entries = {}
    for name, zip_name, files in (
        ("fetch_tracking_example_data", "hela.zip",
         {f"DIC-C2DH-HeLa/01/t{t:03d}.tif": image for t, image in enumerate(images)}),
        ("fetch_tracking_segmentation_data", "masks.zip", {f"masks/mask_{t:04d}.tif": m for t, m in enumerate(masks)}),
    ):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            for path, array in files.items():
                zf.writestr(path, _tif_bytes(array))
        (served / zip_name).write_bytes(buffer.getvalue())
        entries[name] = (zip_name, hashlib.sha256(buffer.getvalue()).hexdigest())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("MICROSAM_CACHEDIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sample_data, "_load_registry",
                        lambda: {name: (f"{base}/{zip_name}", sha) for name, (zip_name, sha) in entries.items()})
    try:
        yield masks
    finally:
        server.shutdown()
        server.server_close()


def test_tracking_example_data_and_tracking(served_tracking_data, tmp_path):
    from micro_sam.multi_dimensional_segmentation import track_across_frames

    folder = sample_data.fetch_tracking_example_data(tmp_path / "data")
    assert folder.endswith("DIC-C2DH-HeLa.zip.unzip/DIC-C2DH-HeLa/01")
    [(frames, frame_kwargs)] = sample_data.sample_data_tracking()
    [(masks, mask_kwargs)] = sample_data.sample_data_segmentation()
    assert frame_kwargs == {"name": "tracking"} and mask_kwargs == {"name": "segmentation"}
    assert frames.shape == masks.shape == (84, 12, 100)
    np.testing.assert_array_equal(masks, served_tracking_data)
    result, lineages = track_across_frames(frames, masks, tracking_model="overlap", verbose=False)
    assert lineages == [{1: []}] and np.array_equal(result, (masks > 0).astype("uint32"))
