"""Command lines, the napari plugin manifest and its sample data, and the import layering (only
micro_sam.sam_annotator imports napari / Qt)."""
import importlib
import os

import numpy as np
import pytest
import tifffile

from micro_sam import util

# The modules (their names are shadowed in the package by the functions of the same name, as in micro_sam).
annotator_2d = importlib.import_module("micro_sam.sam_annotator.annotator_2d")
annotator_3d = importlib.import_module("micro_sam.sam_annotator.annotator_3d")
image_series_annotator = importlib.import_module("micro_sam.sam_annotator.image_series_annotator")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(util, "get_sam_model", lambda *a, **k: pytest.fail("bad input must fail before the model"))


def test_annotator_command_lines_have_micro_sams_options(capsys):
    for main in (annotator_2d.main, annotator_3d.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = capsys.readouterr().out
        for option in ("--input", "--key", "--embedding_path", "--segmentation_result", "--segmentation_key",
                       "--model_type", "--checkpoint", "--decoder_path", "--device", "--tile_shape", "--halo",
                       "--precompute_amg_state", "--prefer_decoder", "--commit_path"):
            assert option in text, option
    with pytest.raises(SystemExit):
        image_series_annotator.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--input_folder", "--output_folder", "--pattern", "--embedding_path", "--model_type",
                   "--is_volumetric", "--skip_segmented", "--initial_segmentation_folder"):
        assert option in text, option


def test_command_lines_report_bad_input(tmp_path, capsys, no_model):
    volume = tmp_path / "volume.tif"
    tifffile.imwrite(volume, np.zeros((4, 32, 32), "uint8"))
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.zeros((32, 32), "uint8"))
    assert annotator_2d.main(["-i", str(volume), "-m", "vit_t_demo"]) == 1
    assert "2D annotator needs an image of shape (Y, X)" in capsys.readouterr().err
    assert annotator_3d.main(["-i", str(image), "-m", "vit_t_demo"]) == 1
    assert "3D annotator needs a volume" in capsys.readouterr().err
    assert annotator_2d.main(["-i", str(tmp_path / "missing.tif")]) == 1
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    assert image_series_annotator.main(["-i", str(empty), "-o", str(tmp_path / "out")]) == 1
    assert "No image files match" in capsys.readouterr().err


def test_command_line_refuses_embeddings_of_another_image(tmp_path, capsys, cached_demo_model):
    import zarr

    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.full((32, 32), 7, "uint8"))
    cache = tmp_path / "embeddings.zarr"
    zarr.open_group(str(cache), mode="w").attrs.update({"data_signature": "of another image", "tile_shape": None,
                                                        "halo": None})
    before = sorted(os.listdir(cache))
    assert annotator_2d.main(["-i", str(image), "-e", str(cache), "-m", "vit_t_demo"]) == 1
    assert "computed for another image data" in capsys.readouterr().err
    assert sorted(os.listdir(cache)) == before  # nothing was written


def test_command_line_runs_napari_until_the_viewer_is_closed(tmp_path, monkeypatch, cached_demo_model):
    """Without return_viewer (as on the command line) the tool opens and napari's event loop runs; the command
    returns 0 once the viewer is closed."""
    import napari

    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.random.default_rng(0).integers(0, 255, (48, 48), dtype="uint8"))
    shown = []

    def run():  # napari's event loop, here: note what is shown, then close the viewer as a user would
        viewer = napari.current_viewer()
        shown.append((viewer.layers["image"].data.shape, "committed_objects" in viewer.layers))
        viewer.close()

    monkeypatch.setattr(napari, "run", run)
    assert annotator_2d.main(["-i", str(image), "-m", "vit_t_demo", "-d", "cpu"]) == 0
    assert shown == [((48, 48), True)]


def test_napari_manifest_and_sample_data():
    import tomllib
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(os.path.join(ROOT, "micro_sam", "napari.yaml"))
    assert manifest.name == "micro_sam"
    for command in manifest.contributions.commands:
        module, name = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), name)), command.python_name
    widgets = {w.command for w in manifest.contributions.widgets}
    assert widgets == {"micro_sam.annotator_2d", "micro_sam.annotator_3d", "micro_sam.image_series_annotator",
                       "micro_sam.training", "micro_sam.object_classifier", "micro_sam.annotator_tracking"}
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["entry-points"]["napari.manifest"] == {"micro-sam": "micro_sam:napari.yaml"}
    assert "napari.yaml" in project["tool"]["setuptools"]["package-data"]["micro_sam"]
    scripts = project["project"]["scripts"]
    for name in ("annotator_2d", "annotator_3d", "annotator_tracking", "image_series_annotator"):
        assert scripts[f"micro_sam.{name}"].endswith(":main")

    from micro_sam.sam_annotator._sample_data import (
        sample_data_synthetic_nuclei_2d, sample_data_synthetic_nuclei_3d,
    )
    from micro_sam.sample_data import sample_data_nuclei_2d, synthetic_nuclei_3d

    for function, ndim in ((sample_data_nuclei_2d, 2), (sample_data_synthetic_nuclei_2d, 2),
                           (sample_data_synthetic_nuclei_3d, 3)):
        (image, image_meta), (labels, label_meta, kind) = function()
        assert image.ndim == ndim and labels.shape == image.shape and kind == "labels" and labels.max() > 5
    np.testing.assert_array_equal(sample_data_synthetic_nuclei_3d()[1][0], synthetic_nuclei_3d(seed=0)[1])


def test_plugin_widgets_start_in_a_viewer_with_sample_data(cached_demo_model, nuclei_2d):
    """The plugin path: an image opened in napari, the 2D annotator docked, embeddings computed from the widget."""
    import napari

    from micro_sam.sam_annotator.annotator_2d import Annotator2d
    from micro_sam.sam_annotator.annotator_3d import Annotator3d
    from micro_sam.sam_annotator.image_series_annotator import ImageSeriesAnnotator
    from micro_sam.sam_annotator.training_ui import TrainingWidget

    from ._helpers import largest_objects, object_center, press, wait_for

    viewer = napari.Viewer(show=False)
    try:
        image, labels = nuclei_2d
        viewer.add_image(image, name="sample")
        tool = Annotator2d(viewer)
        viewer.window.add_dock_widget(tool)
        assert viewer.layers["committed_objects"].data.shape == image.shape  # the layers fit the open image
        for widget in (ImageSeriesAnnotator(viewer), TrainingWidget(viewer)):
            viewer.window.add_dock_widget(widget)
        embeddings = tool.widgets["embeddings"]
        assert embeddings.image.value is viewer.layers["sample"]
        embeddings.model_type.value = "vit_t_demo"
        embeddings()
        wait_for(tool)
        viewer.layers["point_prompts"].add(object_center(labels, largest_objects(labels, 1)[0]))
        press(viewer, "s")
        assert viewer.layers["current_object"].data.any()
    finally:
        viewer.close()
    viewer = napari.Viewer(show=False)
    try:
        tool = Annotator3d(viewer)  # without an image: layers of a placeholder shape, no error
        assert viewer.layers["current_object"].data.ndim == 3 and viewer.layers["point_prompts"].ndim == 3
    finally:
        viewer.close()


def test_only_the_annotator_package_imports_napari_or_qt():
    """No module outside micro_sam/sam_annotator imports a GUI package, not even inside a function.

    The one exception is micro_sam 1.8's ``evaluation.model_comparison.model_comparison_with_napari``, which
    imports napari inside that function (a viewer for comparison results)."""
    import ast
    import glob

    gui = {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy", "superqt"}
    offenders = []
    for path in glob.glob(os.path.join(ROOT, "micro_sam", "**", "*.py"), recursive=True):
        if os.sep + "sam_annotator" + os.sep in path:
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{os.path.relpath(path, ROOT)}: {name}" for name in names if name.split(".")[0] in gui]
    assert offenders == [os.path.join("micro_sam", "evaluation", "model_comparison.py") + ": napari"]
