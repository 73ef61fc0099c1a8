"""The image series annotator on a folder: every image annotated and saved (one label file per image), files
that are not images skipped with a message, previous / next, resuming with skip_segmented."""
import os

import numpy as np
import pytest
import tifffile

from micro_sam.sam_annotator.image_series_annotator import image_folder_annotator, image_series_annotator

from ._helpers import largest_objects, object_center, press, wait_for
from .conftest import iou


@pytest.fixture
def image_folder(tmp_path):
    from micro_sam.sample_data import synthetic_nuclei_2d

    folder = tmp_path / "images"
    folder.mkdir()
    labels = {}
    for seed in range(3):
        image, label = synthetic_nuclei_2d((512, 512), seed=seed)
        tifffile.imwrite(folder / f"cells_{seed}.tif", image)
        labels[f"cells_{seed}"] = label
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_text("not a png either")  # an image name, but unreadable
    return folder, labels


def _tool(viewer):
    return viewer.window.dock_widgets["Annotator2d"]


def test_walk_a_folder_and_save_one_label_file_per_image(image_folder, tmp_path, cached_demo_model, notifications,
                                                          capsys):
    import napari

    folder, labels = image_folder
    output = tmp_path / "segmentations"
    viewer = image_folder_annotator(folder, output, model_type="vit_t_demo", embedding_path=tmp_path / "emb",
                                    viewer=napari.Viewer(show=False), return_viewer=True)
    try:
        tool = _tool(viewer)
        messages = [text for _, text in notifications()]
        assert any("notes.txt" in text and "not images" in text for text in messages), messages
        assert any("broken.png" in text for text in messages), messages
        stderr = capsys.readouterr().err  # and on the command line
        assert "notes.txt" in stderr and "broken.png" in stderr, stderr
        masks = {}
        for name in ("cells_0", "cells_1", "cells_2"):
            assert tool._series.name(tool._series.index) == f"{name}.tif"
            object_id = largest_objects(labels[name], 1)[0]
            viewer.layers["point_prompts"].add(object_center(labels[name], object_id))
            press(viewer, "s")
            press(viewer, "c")
            masks[name] = viewer.layers["committed_objects"].data.copy()
            assert iou(masks[name], labels[name] == object_id) > 0.8
            press(viewer, "n")
            wait_for(tool)
        assert sorted(os.listdir(output)) == ["cells_0.tif", "cells_1.tif", "cells_2.tif"]
        for name, mask in masks.items():
            np.testing.assert_array_equal(tifffile.imread(output / f"{name}.tif"), mask)
        assert sorted(os.listdir(tmp_path / "emb")) == ["cells_0.zarr", "cells_1.zarr", "cells_2.zarr"]
        assert any("last image" in text for _, text in notifications())

        press(viewer, "p")  # back to the previous image: its saved objects are loaded
        wait_for(tool)
        assert tool._series.name(tool._series.index) == "cells_1.tif"
        np.testing.assert_array_equal(viewer.layers["committed_objects"].data, masks["cells_1"])
    finally:
        viewer.close()

    # everything is segmented: nothing to do when started again
    assert image_folder_annotator(folder, output, model_type="vit_t_demo", return_viewer=True) is None


def test_bad_series_input():
    with pytest.raises(ValueError, match="empty"):
        image_series_annotator([], "out")
    with pytest.raises(ValueError, match="2 images but 1 initial"):
        image_series_annotator([np.zeros((8, 8))] * 2, "out", initial_segmentations=[np.zeros((8, 8))])
