"""Screenshots of the annotation tools after a few actions (offline, with the bundled vit_t_demo model).

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/annotator_screenshots.py OUTPUT [--readme PNG]

Writes annotator_2d.png (the bundled sample, nuclei segmented from clicks and committed, one more object in
current_object), annotator_3d.png (an object propagated through a synthetic stack) and image_series.png (the
second image of a folder, after the first was annotated and saved) to OUTPUT_FOLDER; with --readme also a
smaller copy of the 2D screenshot for the documentation.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _press(viewer, key, shift=False):
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication

    modifier = Qt.KeyboardModifier.ShiftModifier if shift else Qt.KeyboardModifier.NoModifier
    QTest.keyClick(viewer.window._qt_viewer.canvas.native, getattr(Qt.Key, f"Key_{key.upper()}"), modifier)
    QApplication.processEvents()


def _centres(labels, n, z=None):
    from micro_sam.util import get_centers_and_bounding_boxes

    plane = labels if z is None else labels[z]
    ids, counts = np.unique(plane[plane != 0], return_counts=True)
    centres, _ = get_centers_and_bounding_boxes(plane)
    return [np.array(centres[i], dtype=float) for i in ids[np.argsort(counts)[::-1]][:n]]


def _show(viewer):
    """Show the window at 1400 x 900 (napari restores its saved geometry when shown: resize afterwards)."""
    from qtpy.QtWidgets import QApplication

    viewer.window.show()
    viewer.window._qt_window.resize(1400, 900)
    for _ in range(5):
        QApplication.processEvents()


def _shot(viewer, path, width=None):
    from qtpy.QtWidgets import QApplication

    viewer.reset_view()
    for _ in range(5):
        QApplication.processEvents()
    image = viewer.screenshot(canvas_only=False)
    from PIL import Image

    picture = Image.fromarray(image[..., :3])
    if width is not None:
        picture = picture.resize((width, round(picture.height * width / picture.width)), Image.LANCZOS)
    picture.save(path, optimize=True)
    print("wrote", path)


def main():
    import napari
    import tifffile

    from micro_sam.sam_annotator import annotator_2d, annotator_3d, image_folder_annotator
    from micro_sam.sample_data import sample_image_path, sample_labels_path, synthetic_nuclei_3d

    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--readme", help="Also write a 900 pixel wide copy of the 2D screenshot here.")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)

    image, labels = tifffile.imread(sample_image_path()), tifffile.imread(sample_labels_path())
    viewer = annotator_2d(image, model_type="vit_t_demo", return_viewer=True)
    _show(viewer)
    for centre in _centres(labels, 12):
        viewer.layers["point_prompts"].add(centre)
        _press(viewer, "s")
        _press(viewer, "c")
    viewer.layers["point_prompts"].add(_centres(labels, 13)[-1])
    _press(viewer, "s")
    viewer.layers.selection.active = viewer.layers["point_prompts"]
    _shot(viewer, os.path.join(args.output, "annotator_2d.png"))
    if args.readme:
        _shot(viewer, args.readme, width=900)
    viewer.close()

    volume, volume_labels = synthetic_nuclei_3d((8, 384, 384), seed=1)
    viewer = annotator_3d(volume, model_type="vit_t_demo", return_viewer=True)
    _show(viewer)
    tool = viewer.window.dock_widgets["Annotator3d"]
    z = 4
    viewer.dims.set_point(0, z)
    viewer.layers["point_prompts"].add(np.concatenate([[z], _centres(volume_labels, 1, z)[0]]))
    _press(viewer, "s", shift=True)
    tool.tasks.wait(600000)
    _shot(viewer, os.path.join(args.output, "annotator_3d.png"))
    viewer.close()

    folder = os.path.join(args.output, "series")
    os.makedirs(folder, exist_ok=True)
    tifffile.imwrite(os.path.join(folder, "a.tif"), image)
    tifffile.imwrite(os.path.join(folder, "b.tif"), image[::-1])
    viewer = image_folder_annotator(folder, os.path.join(args.output, "series_out"), model_type="vit_t_demo",
                                    viewer=napari.Viewer(), return_viewer=True, skip_segmented=False)
    _show(viewer)
    tool = viewer.window.dock_widgets["Annotator2d"]
    for centre in _centres(labels, 3):  # a.tif: three nuclei committed, then on to b.tif (a.tif is saved)
        viewer.layers["point_prompts"].add(centre)
        _press(viewer, "s")
        _press(viewer, "c")
    _press(viewer, "n")
    tool.tasks.wait(600000)
    for centre in _centres(labels[::-1], 2):  # b.tif: two nuclei committed, one more in current_object
        viewer.layers["point_prompts"].add(centre)
        _press(viewer, "s")
        _press(viewer, "c")
    viewer.layers["point_prompts"].add(_centres(labels[::-1], 3)[-1])
    _press(viewer, "s")
    _shot(viewer, os.path.join(args.output, "image_series.png"))
    viewer.close()


if __name__ == "__main__":
    main()
