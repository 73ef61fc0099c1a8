"""track_across_frames: choice of linker (trackastra or the overlap linker, fallback), result, errors."""
import os
import sys
import types
import warnings

import numpy as np
import pytest

from micro_sam import multi_dimensional_segmentation as mds
from micro_sam._tracking import backends
from micro_sam.multi_dimensional_segmentation import OverlapLinker, get_napari_track_data, track_across_frames

from ._movies import assert_same_tracks, division_movie, relabel_frames

LINEAGES = [{1: []}, {2: [3, 4], 3: [], 4: []}]


@pytest.fixture
def no_trackastra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trackastra", None)  # the import fails, as if it was not installed


@pytest.fixture
def fake_trackastra(monkeypatch, tmp_path):
    """trackastra 'installed' without network: pretrained names known, downloads fail, the cache in tmp_path.

    Returns a dict that records the calls; a model is 'cached' when its folder exists under calls['cache'].
    """
    import networkx as nx
    import requests

    calls = {"cache": tmp_path / "trackastra_cache", "downloads": []}
    package, model_module = types.ModuleType("trackastra"), types.ModuleType("trackastra.model")
    pretrained = types.ModuleType("trackastra.model.pretrained")
    pretrained._MODELS = {"general_2d": "https://example.invalid/general_2d.zip", "ctc": "https://x.invalid/ctc.zip"}

    def download_pretrained(name, download_dir=None):
        calls["downloads"].append(name)
        raise requests.exceptions.ConnectionError("Failed to resolve 'github.com'")

    pretrained.download_pretrained = download_pretrained
    for name, module in (("trackastra", package), ("trackastra.model", model_module),
                         ("trackastra.model.pretrained", pretrained)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(backends, "_trackastra_cache", lambda name: calls["cache"] / name)

    class FakeModel:
        """Links objects that overlap in consecutive frames; like trackastra's greedy solution it contains only
        linked objects (nodes with attributes time and label, the label in the masks it was given)."""

        def track(self, imgs, masks, mode="greedy"):
            calls.update(mode=mode, imgs=imgs, masks=masks.copy())
            graph = nx.DiGraph()
            for t in range(len(masks) - 1):
                pairs = np.unique(np.stack([masks[t].ravel(), masks[t + 1].ravel()]), axis=1)
                for a, b in pairs.T.tolist():
                    if a and b:
                        graph.add_node((t, a), time=t, label=a)
                        graph.add_node((t + 1, b), time=t + 1, label=b)
                        graph.add_edge((t, a), (t + 1, b))
            return graph, masks

    def load(folder):
        calls["loaded"] = folder
        return FakeModel()

    monkeypatch.setattr(backends, "_load_trackastra", load)
    return calls


def test_default_falls_back_without_trackastra(no_trackastra):
    seg = division_movie()
    with pytest.warns(UserWarning, match="trackastra is not installed.*overlap linker"):
        result, lineages = track_across_frames(np.zeros(seg.shape), seg, verbose=False)
    np.testing.assert_array_equal(result, seg)
    assert result.dtype == np.uint32 and lineages == LINEAGES


def test_default_falls_back_offline(fake_trackastra):
    seg = division_movie()
    with pytest.warns(UserWarning) as record:
        result, lineages = track_across_frames(np.zeros(seg.shape), seg, verbose=False)
    messages = " ".join(str(w.message) for w in record)
    assert "could not be downloaded" in messages and "ConnectionError" in messages and "overlap linker" in messages
    assert fake_trackastra["downloads"] == ["general_2d"] and "loaded" not in fake_trackastra
    np.testing.assert_array_equal(result, seg)
    assert lineages == LINEAGES


def test_unknown_model_name_is_an_error(fake_trackastra, no_trackastra):
    seg = division_movie()
    with pytest.raises(ValueError, match="Unknown tracking model 'general_3d'.*'general_2d', 'ctc'.*'overlap'"):
        track_across_frames(np.zeros(seg.shape), seg, tracking_model="general_3d", verbose=False)


def test_unknown_model_name_is_an_error_offline(fake_trackastra):
    seg = division_movie()
    with pytest.raises(ValueError, match="Unknown tracking model 'general_3d'.*'general_2d', 'ctc'"):
        track_across_frames(np.zeros(seg.shape), seg, tracking_model="general_3d", verbose=False)
    assert fake_trackastra["downloads"] == []


def test_cached_trackastra_model(fake_trackastra):
    """A cached pretrained model is used; trackastra's node labels are mapped back to the objects, and objects it
    leaves out of its graph stay (one-frame) tracks."""
    seg = division_movie().astype("uint64")
    scrambled = relabel_frames(seg, seed=5, offset=10 ** 12)
    scrambled[5, 35:38, 35:38] = 7  # a one-frame object, not linked
    (fake_trackastra["cache"] / "ctc").mkdir(parents=True)
    movie = np.random.default_rng(0).random(seg.shape + (3,)).astype("float32")
    result, lineages = track_across_frames(movie, scrambled, tracking_model="ctc", mode="ilp", verbose=False)
    assert fake_trackastra["loaded"] == fake_trackastra["cache"] / "ctc" and fake_trackastra["mode"] == "ilp"
    np.testing.assert_allclose(fake_trackastra["imgs"], movie.mean(axis=-1))  # one channel for trackastra
    assert [len(np.unique(m)) - 1 for m in fake_trackastra["masks"]] == [2, 2, 2, 3, 3, 4]
    assert fake_trackastra["masks"].max() == 4  # consecutive labels per frame
    expected = seg.astype("uint32")
    expected[5, 35:38, 35:38] = 5
    assert_same_tracks(result, lineages, expected, LINEAGES + [{5: []}])


def test_model_folder(tmp_path, fake_trackastra, monkeypatch):
    seg = division_movie()
    folder = tmp_path / "my_model"
    folder.mkdir()
    with pytest.raises(ValueError, match="not a trackastra model: it lacks"):
        track_across_frames(np.zeros(seg.shape), seg, tracking_model=folder, verbose=False)
    for name in ("config.yaml", "train_config.yaml", "model.pt"):
        (folder / name).write_text("x")
    result, _ = track_across_frames(np.zeros(seg.shape), seg, tracking_model=str(folder), verbose=False)
    assert fake_trackastra["loaded"] == folder
    np.testing.assert_array_equal(result, seg)
    monkeypatch.setitem(sys.modules, "trackastra", None)
    with pytest.raises(RuntimeError, match="needs trackastra"):
        track_across_frames(np.zeros(seg.shape), seg, tracking_model=folder, verbose=False)


def test_real_trackastra_with_random_model(tmp_path):
    """With trackastra installed: a (random, untrained) model folder is loaded and every object is kept."""
    pytest.importorskip("trackastra")
    import torch
    import yaml
    from trackastra.model.model import TrackingTransformer

    torch.manual_seed(0)
    model = TrackingTransformer(coord_dim=2, feat_dim=7, d_model=32, nhead=2, num_encoder_layers=1,
                                num_decoder_layers=1, window=4)
    model.save(tmp_path / "model")
    with open(tmp_path / "model" / "train_config.yaml", "w") as f:
        yaml.safe_dump({"features": "wrfeat"}, f)
    seg = division_movie()
    result, lineages = track_across_frames(np.ones(seg.shape, dtype="float32"), seg, tracking_model=tmp_path / "model",
                                           verbose=False)
    assert np.array_equal(result != 0, seg != 0)
    tracks = set(np.unique(result).tolist()) - {0}
    assert tracks == set(range(1, len(tracks) + 1))
    assert {track for lineage in lineages for track in lineage} == tracks
    for t in range(len(seg)):  # every object is one track in its frame
        pairs = np.unique(np.stack([seg[t][seg[t] > 0], result[t][seg[t] > 0]]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def test_overlap_linker_options():
    seg = division_movie()
    result, lineages = track_across_frames(np.zeros(seg.shape), seg, tracking_model="overlap", mode="greedy_nodiv",
                                           verbose=False)
    assert lineages == [{1: []}, {2: []}, {3: []}]
    result, lineages = track_across_frames(np.zeros(seg.shape), seg, tracking_model=OverlapLinker(max_gap=0),
                                           verbose=False)
    assert lineages == LINEAGES
    with pytest.raises(ValueError, match="max_gap"):
        OverlapLinker(max_gap=-1)
    with pytest.raises(ValueError, match="max_distance"):
        OverlapLinker(max_distance=0)


def test_min_time_extent_and_gap_closing():
    seg = division_movie()
    seg[5, 35:38, 35:38] = 9  # a one-frame object
    _, lineages = track_across_frames(np.zeros(seg.shape), seg, tracking_model="overlap", verbose=False)
    assert lineages == LINEAGES + [{5: []}]
    result, lineages = track_across_frames(np.zeros(seg.shape), seg, tracking_model="overlap", min_time_extent=2,
                                           verbose=False)
    assert lineages == LINEAGES and not result[5, 35:38, 35:38].any()

    # gap_closing fills the masks of a missing frame (micro_sam 1.8's binary closing along time).
    gappy = division_movie()
    gappy[2][gappy[2] == 1] = 0
    result, lineages = track_across_frames(np.zeros(seg.shape), gappy, tracking_model="overlap", gap_closing=1,
                                           verbose=False)
    assert lineages == LINEAGES and (result[2] == 1).sum() == 24 and (result[2][5:9, 2:8] == 1).all()


def test_frames_without_objects():
    seg = division_movie()
    seg[3] = 0  # the daughters' first frame is empty: a gap for track 1, the division is not seen
    result, lineages = track_across_frames(np.zeros(seg.shape), seg, tracking_model="overlap", verbose=False)
    assert not result[3].any() and len(np.unique(result[4])) == 4
    assert (result[4] == 1).sum() == (seg[4] == 1).sum()  # the square's track continues over the empty frame
    with pytest.warns(UserWarning, match="no objects"):
        result, lineages = track_across_frames(np.zeros(seg.shape), np.zeros_like(seg), tracking_model="overlap",
                                               verbose=False)
    assert not result.any() and lineages == []
    track_data, parents = get_napari_track_data(result, lineages)
    assert track_data.shape == (0, 4) and parents == {}


def test_output_folder_and_progress(tmp_path):
    seg = division_movie()
    steps, inits = [], []
    result, lineages = track_across_frames(
        np.zeros(seg.shape), seg, tracking_model="overlap", pbar_init=lambda total, desc: inits.append((total, desc)),
        pbar_update=steps.append, output_folder=tmp_path / "ctc",
    )
    assert inits == [(6, "Track objects")] and sum(steps) == 6
    assert (tmp_path / "ctc" / "man_track.txt").read_text().splitlines() == ["1 0 5 0", "2 0 2 0", "3 3 5 2",
                                                                             "4 3 5 2"]
    assert sorted(os.listdir(tmp_path)) == ["ctc"]


@pytest.mark.parametrize("timeseries, segmentation, kwargs, match", [
    ((1, 8, 8), (1, 8, 8), {}, "at least 2 frames"),
    ((5, 8, 8), (4, 8, 8), {}, "same number of frames"),
    ((4, 8, 9), (4, 8, 8), {}, "same number of frames"),
    ((4, 8, 8), (8, 8), {}, "3D label array"),
    ((4, 8, 8, 7), (4, 8, 8), {}, "up to 4 channels"),
    ((4, 8, 8), (4, 8, 8), {"mode": "hungarian"}, "Invalid mode"),
    ((4, 8, 8), (4, 8, 8), {"gap_closing": -1}, "gap_closing"),
    ((4, 8, 8), (4, 8, 8), {"min_time_extent": 1.5}, "min_time_extent"),
    ((4, 8, 8), (4, 8, 8), {"tracking_model": 3}, "tracking_model must be"),
])
def test_bad_input(timeseries, segmentation, kwargs, match, no_trackastra):
    with pytest.raises(ValueError, match=match):
        track_across_frames(np.zeros(timeseries), np.zeros(segmentation, dtype="uint8"), verbose=False, **kwargs)


def test_bad_labels_and_output(tmp_path):
    images = np.zeros((3, 8, 8))
    with pytest.raises(ValueError, match="integer label array"):
        track_across_frames(images, np.zeros((3, 8, 8), dtype="float32"), tracking_model="overlap", verbose=False)
    with pytest.raises(ValueError, match="negative"):
        track_across_frames(images, -np.ones((3, 8, 8), dtype="int32"), tracking_model="overlap", verbose=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        track_across_frames(images, np.zeros((3, 8, 8), dtype="uint8"), tracking_model="overlap",
                            output_folder=tmp_path / "file", verbose=False)


def test_inputs_not_modified():
    seg = division_movie()
    seg[2][seg[2] == 1] = 0
    images = np.random.default_rng(0).random(seg.shape)
    seg_copy, images_copy = seg.copy(), images.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the overlap linker needs no fallback warning
        track_across_frames(images, seg, gap_closing=1, min_time_extent=2, tracking_model="overlap", verbose=False)
    np.testing.assert_array_equal(seg, seg_copy)
    np.testing.assert_array_equal(images, images_copy)
    assert mds.track_across_frames is track_across_frames
