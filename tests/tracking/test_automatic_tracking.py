"""automatic_tracking_implementation and the --tracking command line: per-frame segmentation + linking."""
import os

import numpy as np
import pytest
import tifffile

from micro_sam.evaluation.tracking import evaluate_tracking
from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder
from micro_sam.multi_dimensional_segmentation import automatic_tracking_implementation
from micro_sam.sample_data import synthetic_timelapse

from instance_segmentation._models import StubDecoder, make_stub_predictor
from instance_segmentation._targets import decoder_targets


@pytest.fixture(scope="module")
def movie():
    return synthetic_timelapse(n_frames=8, shape=(96, 96), seed=3)


def _stub_ais(labels):
    """AIS whose decoder returns the true maps of each frame, around a stub SAM; counts encoder passes."""
    maps = np.stack([np.stack(decoder_targets(frame)) for frame in labels], axis=1)
    predictor, _ = make_stub_predictor(labels[0], img_size=256)
    encoded = []
    predictor.model.image_encoder.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    decoder = StubDecoder(maps, by_slice="calls")
    return predictor, InstanceSegmentationWithDecoder(predictor, decoder), decoder, encoded


def test_segments_every_frame_and_links(movie, tmp_path):
    images, labels, lineages = movie
    predictor, segmenter, decoder, encoded = _stub_ais(labels)
    result, predicted, embeddings = automatic_tracking_implementation(
        images, predictor, segmenter, embedding_path=tmp_path / "embeddings.zarr", tracking_model="overlap",
        return_embeddings=True, verbose=False, batch_size=3, output_folder=tmp_path / "ctc", foreground_smoothing=0,
    )
    scores = evaluate_tracking(result, predicted, labels, lineages)
    assert scores["seg"] > 0.85 and scores["link_recall"] >= 0.95 and scores["division_recall"] >= 0.8
    assert scores["n_true_divisions"] >= 1
    # The embeddings of all frames are computed once (in batches of 3) and cached in one zarr file.
    assert sum(encoded) == len(images) and max(encoded) == 3 and decoder.calls == len(images)
    assert sorted(os.listdir(tmp_path)) == ["ctc", "embeddings.zarr"]
    assert embeddings["features"].shape[0] == len(images)
    ctc = np.stack([tifffile.imread(tmp_path / "ctc" / f"man_track{t:04d}.tif") for t in range(len(images))])
    np.testing.assert_array_equal(ctc, result)
    # A second run reads the cached embeddings.
    again, _ = automatic_tracking_implementation(images, predictor, segmenter, embedding_path=tmp_path /
                                                 "embeddings.zarr", tracking_model="overlap", verbose=False,
                                                 foreground_smoothing=0)
    assert sum(encoded) == len(images)
    np.testing.assert_array_equal(again, result)


@pytest.mark.parametrize("kwargs, match", [
    ({"timeseries": np.zeros((1, 96, 96), dtype="uint8")}, "at least 2 frames"),
    ({"timeseries": np.zeros((4, 96), dtype="uint8")}, r"\(T, Y, X\)"),
    ({"tracking_model": "general_3d"}, "Unknown tracking model"),
    ({"mode": "hungarian"}, "Invalid mode"),
    ({"min_time_extent": -2}, "min_time_extent"),
])
def test_bad_input_before_any_work(movie, tmp_path, kwargs, match):
    images, labels, _ = movie
    predictor, segmenter, decoder, encoded = _stub_ais(labels)
    arguments = dict(timeseries=images, predictor=predictor, segmentor=segmenter,
                     embedding_path=tmp_path / "embeddings.zarr", output_folder=tmp_path / "ctc", verbose=False)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        automatic_tracking_implementation(**arguments)
    assert encoded == [] and decoder.calls == 0 and os.listdir(tmp_path) == []


def test_command_line(movie, tmp_path, capsys, monkeypatch):
    """micro_sam.automatic_segmentation --tracking, with the stub AIS in place of a loaded model."""
    from micro_sam import automatic_segmentation, util

    images, labels, lineages = movie
    predictor, segmenter, _, _ = _stub_ais(labels)
    monkeypatch.setattr(util, "get_sam_model", lambda **kwargs: (predictor, {"decoder_state": {}}))
    monkeypatch.setattr(automatic_segmentation, "get_predictor_and_segmenter",
                        lambda **kwargs: (predictor, segmenter))
    tifffile.imwrite(tmp_path / "movie.tif", images)
    tifffile.imwrite(tmp_path / "frame.tif", images[:1])
    args = ["--tracking", "--tracking_model", "overlap", "--foreground_smoothing", "0"]
    assert automatic_segmentation.main(["-i", str(tmp_path / "movie.tif"), "-o", str(tmp_path / "tracks"), "-e",
                                        str(tmp_path / "movie.zarr")] + args) == 0
    assert f"({len(np.unique(labels)) - 1} tracks)" in capsys.readouterr().out
    masks = np.stack([tifffile.imread(tmp_path / "tracks" / f"man_track{t:04d}.tif") for t in range(len(images))])
    rows = [list(map(int, line.split())) for line in (tmp_path / "tracks" / "man_track.txt").read_text().splitlines()]
    assert sorted(row[0] for row in rows) == sorted(set(np.unique(masks).tolist()) - {0})
    for label, first, last, _ in rows:
        present = [t for t in range(len(images)) if (masks[t] == label).any()]
        assert present == list(range(first, last + 1))
    true_divisions = sum(1 for lineage in lineages for children in lineage.values() if children)
    assert sum(1 for row in rows if row[3]) == 2 * true_divisions
    assert (tmp_path / "movie.zarr").is_dir()
    # An existing output is skipped; one frame is no time series: an error for this input, nothing written.
    assert automatic_segmentation.main(["-i", str(tmp_path / "movie.tif"), "-o", str(tmp_path / "tracks")]
                                       + args) == 0
    assert "Skipping" in capsys.readouterr().out
    assert automatic_segmentation.main(["-i", str(tmp_path / "frame.tif"), "-o", str(tmp_path / "one")] + args) == 1
    assert "at least 2 frames" in capsys.readouterr().err and not (tmp_path / "one").exists()
