"""Tracking graph -> tracks and lineages, short-track removal, the CTC format."""
import os

import numpy as np
import pytest
import tifffile

from micro_sam._tracking import ctc
from micro_sam._tracking.graph import TrackingGraph, graph_from_tracks, graph_to_result, resolve_tracks

from ._movies import division_movie


def _graph(frame_labels, edges):
    """A graph from per-frame label lists and edges given as ((t, label), (t, label))."""
    offsets = np.concatenate([[0], np.cumsum([len(labels) for labels in frame_labels])])
    labels = np.concatenate([np.asarray(labels, dtype="int64") for labels in frame_labels])
    graph = TrackingGraph(offsets=offsets, labels=labels, edges=np.zeros((0, 2), dtype="int64"))
    graph.edges = np.array([(graph.node(*u), graph.node(*v)) for u, v in edges], dtype="int64").reshape(-1, 2)
    return graph


def test_tracks_from_graph():
    # Frame 0: a (1); frame 1: a (1), b (2); frame 2: a divides into 1 and 2, b is 3; frame 3: c (4), alone.
    graph = _graph([[1], [1, 2], [1, 2, 3], [4]], [((0, 1), (1, 1)), ((1, 1), (2, 1)), ((1, 1), (2, 2)),
                                                   ((1, 2), (2, 3))])
    track_of, parents, _ = resolve_tracks(graph)
    # Tracks by first frame, then label: a = 1, b = 2, daughters 3 (label 1) and 4 (label 2), c = 5.
    assert track_of.tolist() == [1, 1, 2, 3, 4, 2, 5]
    assert parents == {3: 1, 4: 1}


def test_short_tracks_without_daughters_are_removed():
    # A mother (frames 0-3) with a long daughter (frames 4-9) and a one-frame daughter (frame 4);
    # an isolated two-frame track; a long isolated track.
    frames = [[1, 9] for _ in range(4)] + [[1, 2, 9]] + [[1, 9] for _ in range(5)]
    frames[5] = [1, 5, 9]
    frames[6] = [1, 5, 9]
    edges = [((t, 1), (t + 1, 1)) for t in range(9)] + [((3, 1), (4, 2))]
    edges += [((5, 5), (6, 5))] + [((t, 9), (t + 1, 9)) for t in range(9)]
    graph = _graph(frames, edges)
    track_of, parents, _ = resolve_tracks(graph)
    assert len(parents) == 2  # the mother divides
    track_of, parents, _ = resolve_tracks(graph, min_time_extent=3)
    # The one-frame daughter and the two-frame track are gone; the mother continues into the long daughter.
    assert parents == {}
    assert sorted(set(track_of.tolist())) == [0, 1, 2]
    removed = [graph.node(4, 2), graph.node(5, 5), graph.node(6, 5)]
    assert (track_of[removed] == 0).all()
    assert len(set(track_of[[graph.node(t, 1) for t in range(10)]].tolist())) == 1


def test_graph_from_tracks_round_trip():
    seg = division_movie()
    graph, is_division = graph_from_tracks(seg, [{1: []}, {2: [3, 4]}])
    assert is_division.sum() == 2 and len(graph.edges) == 5 + 2 + 2 + 2 + 2
    result, lineages = graph_to_result(seg, graph)
    np.testing.assert_array_equal(result, seg)
    assert lineages == [{1: []}, {2: [3, 4], 3: [], 4: []}]
    with pytest.raises(ValueError, match="starts in frame 3, but its mother 1"):
        graph_from_tracks(seg, {1: [3]})


def test_write_ctc_splits_gaps(tmp_path):
    seg = division_movie().astype("uint32")
    seg[2][seg[2] == 1] = 0  # track 1 is missing in frame 2
    folder = ctc.write_ctc(tmp_path / "result", seg, [{1: []}, {2: [3, 4], 3: [], 4: []}])
    lines = (folder / "man_track.txt").read_text().splitlines()
    # Track 1 is split at the gap: its second part gets the new id 5 with parent 1.
    assert lines == ["1 0 1 0", "2 0 2 0", "3 3 5 2", "4 3 5 2", "5 3 5 1"]
    masks = np.stack([tifffile.imread(folder / f"man_track{t:04d}.tif") for t in range(6)])
    expected = seg.copy()
    expected[3:][seg[3:] == 1] = 5
    np.testing.assert_array_equal(masks, expected)
    assert sorted(os.listdir(tmp_path)) == ["result"]

    # Writing again into the folder replaces the CTC files and keeps other files.
    (folder / "notes.txt").write_text("mine")
    ctc.write_ctc(folder, seg[:2], [{1: []}, {2: []}])
    assert sorted(os.listdir(folder)) == ["man_track.txt", "man_track0000.tif", "man_track0001.tif", "notes.txt"]


def test_write_ctc_leaves_nothing_on_error(tmp_path, monkeypatch):
    calls = []

    def failing_imwrite(path, data, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        open(path, "wb").close()

    monkeypatch.setattr(tifffile, "imwrite", failing_imwrite)
    with pytest.raises(OSError, match="disk full"):
        ctc.write_ctc(tmp_path / "result", division_movie(), [{1: []}, {2: [3, 4]}])
    assert os.listdir(tmp_path) == []
