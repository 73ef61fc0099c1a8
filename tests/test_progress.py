"""Progress output: one named bar per unit of work, plain lines when not on a terminal, silent when asked.

pytest's captured stderr is not a terminal, so the library prints its plain-line form here: exactly what a log file
gets.
"""
import io
import re

import numpy as np
import pytest

from micro_sam import _progress
from micro_sam._embeddings import handle_pbar
from micro_sam.util import precompute_image_embeddings

LINE = re.compile(r"^(?P<desc>[A-Za-z0-9 ()]+): (?P<n>\d+)/(?P<total>\d+) in \d+\.\d s$")


def _bars(text):
    """The (description, done, total) of every progress line; fails on anything that is not a clean line."""
    assert "\r" not in text and "\x1b" not in text and "it/s" not in text, repr(text)
    bars = []
    for line in text.splitlines():
        match = LINE.match(line)
        assert match, f"not a progress line: {line!r}"
        bars.append((match["desc"], int(match["n"]), int(match["total"])))
    return bars


def test_line_progress_and_terminal_bar():
    stream = io.StringIO()
    bar = _progress.progress_bar(3, "Count things", file=stream)
    assert stream.getvalue() == ""  # nothing before there is something to say
    for _ in range(3):
        bar.update(1)
    bar.close()
    bar.close()  # closing twice prints once
    assert _bars(stream.getvalue()) == [("Count things", 3, 3)]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    bar = _progress.progress_bar(2, "On a terminal", file=terminal)
    bar.update(2)
    bar.close()
    text = terminal.getvalue()
    assert "On a terminal" in text and "2/2" in text and "\x1b[A" not in text  # a tqdm bar, not nested


def test_handle_pbar_shows_nothing_before_init(capsys):
    _, init, update, close = handle_pbar(True, None, None)
    assert capsys.readouterr().err == ""  # micro_sam 1.8 prints an unlabelled '0it [00:00, ?it/s]' here
    init(2, "First step")
    update(2)
    init(1, "Second step")  # closes the first bar
    update(1)
    close()
    assert _bars(capsys.readouterr().err) == [("First step", 2, 2), ("Second step", 1, 1)]
    _, init, update, close = handle_pbar(False, None, None)
    init(5, "silent")
    update(5)
    close()
    assert capsys.readouterr().err == ""


def test_volume_embeddings_progress_per_slice(tiny_predictor, capsys):
    volume = np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype="uint8")
    precompute_image_embeddings(tiny_predictor, volume)
    assert _bars(capsys.readouterr().err) == [("Compute Image Embeddings 3D", 3, 3)]
    precompute_image_embeddings(tiny_predictor, volume, verbose=False)
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def stub_volume():
    from skimage.draw import disk

    from instance_segmentation._targets import decoder_targets

    labels = np.zeros((3, 64, 64), dtype="uint32")
    for k, (center, z0, z1) in enumerate([((20, 20), 0, 3), ((44, 40), 1, 3)], start=1):
        rr, cc = disk(center, 9, shape=labels.shape[1:])
        labels[z0:z1, rr, cc] = k
    maps = np.stack([np.stack(decoder_targets(s)) for s in labels], axis=1)
    return labels, maps


def _stub_ais(labels, maps, tiled=False):
    from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder, TiledInstanceSegmentationWithDecoder

    from instance_segmentation._models import StubDecoder, make_stub_predictor

    predictor, _ = make_stub_predictor(labels[0], img_size=1024)
    cls = TiledInstanceSegmentationWithDecoder if tiled else InstanceSegmentationWithDecoder
    return predictor, cls(predictor, StubDecoder(maps, by_slice="calls"))


def test_3d_segmentation_progress_is_named_and_per_slice(stub_volume, capsys):
    from micro_sam.automatic_segmentation import automatic_instance_segmentation

    labels, maps = stub_volume
    predictor, segmenter = _stub_ais(labels, maps)
    automatic_instance_segmentation(predictor, segmenter, labels.astype("float32"), ndim=3, foreground_smoothing=0)
    assert _bars(capsys.readouterr().err) == [
        ("Compute Image Embeddings 3D", 3, 3), ("Segment slices", 3, 3), ("Merge segmentation", 1, 1)]
    predictor, segmenter = _stub_ais(labels, maps)
    automatic_instance_segmentation(predictor, segmenter, labels.astype("float32"), ndim=3, verbose=False,
                                    foreground_smoothing=0)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_tiled_progress_per_tile(tiny_predictor, stub_volume, capsys):
    from micro_sam.instance_segmentation import TiledInstanceSegmentationWithDecoder

    from instance_segmentation._models import StubDecoder, make_stub_predictor, tiled_embeddings_with_ids

    image = np.random.default_rng(0).integers(0, 255, (96, 96), dtype="uint8")
    precompute_image_embeddings(tiny_predictor, image, tile_shape=(48, 48), halo=(8, 8))
    assert _bars(capsys.readouterr().err) == [("Compute Image Embeddings 2D tiled", 4, 4)]

    labels, maps = stub_volume
    tiling = ((32, 32), (8, 8))
    predictor, _ = make_stub_predictor(labels[1], img_size=1024)
    segmenter = TiledInstanceSegmentationWithDecoder(predictor, StubDecoder(maps[:, 1], tiling=tiling))
    embeddings = tiled_embeddings_with_ids(labels.shape[1:], *tiling)
    segmenter.initialize(labels[1], image_embeddings=embeddings, verbose=True)
    assert _bars(capsys.readouterr().err) == [("Initialize tiled instance segmentation with decoder", 4, 4)]


def test_cli_output_order_and_quiet(vit_t_checkpoint, tmp_path, capsys):
    """Progress and messages go to stderr, each on its own line; the result line goes to stdout, last."""
    import tifffile

    from micro_sam.automatic_segmentation import main

    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.random.default_rng(0).integers(0, 255, (48, 64), dtype="uint8"))
    arguments = ["-i", str(image), "-m", "vit_t", "-c", str(vit_t_checkpoint), "-d", "cpu", "--points_per_side", "2"]
    assert main(arguments + ["-o", str(tmp_path / "a.tif")]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err[0] == f"Loading the model vit_t from {vit_t_checkpoint}"
    assert _bars("\n".join(err[1:])) == [("Compute Image Embeddings 2D", 1, 1),
                                         ("Predict masks for point grid prompts", 1, 1)]
    assert re.fullmatch(rf"{re.escape(str(image))} -> {re.escape(str(tmp_path / 'a.tif'))} \(\d+ objects, AMG\)\n",
                        captured.out)
    assert main(arguments + ["-o", str(tmp_path / "b.tif"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith(f"{image} -> ") and captured.out.count("\n") == 1
    assert (tmp_path / "b.tif").exists()
