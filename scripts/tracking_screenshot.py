"""Screenshot of the tracking annotator (offline, bundled vit_t_demo model) for docs/tracking.md.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/tracking_screenshot.py docs/images/annotator_tracking.png

A dividing nucleus of the synthetic time-lapse is tracked as a user does it: a point in frame 0, Shift-S; a
division point in the first frame with two daughters, Shift-S; a point on each daughter, Shift-S; commit. A second
nucleus is tracked and committed too; the screenshot shows the last frame with the tracks layer.
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


def main():
    from qtpy.QtWidgets import QApplication

    from micro_sam.sam_annotator import annotator_tracking
    from micro_sam.sam_annotator.annotator_tracking import AnnotatorTracking
    from micro_sam.sample_data import synthetic_timelapse
    from micro_sam.util import get_centers_and_bounding_boxes

    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--width", type=int, default=900)
    args = parser.parse_args()

    movie, labels, lineages = synthetic_timelapse(n_frames=8, shape=(256, 256), seed=3)
    viewer = annotator_tracking(movie, model_type="vit_t_demo", device="cpu", return_viewer=True)
    viewer.window.resize(1400, 900)
    viewer.window.show()
    tool = next(w for w in QApplication.allWidgets() if isinstance(w, AnnotatorTracking) and w.viewer is viewer)
    tool.widgets["segment_nd"].projection.value = "mask"
    menu = tool.widgets["tracking"]

    def click(t, track):
        centres, _ = get_centers_and_bounding_boxes(labels[t] == track)
        viewer.dims.set_point(0, t)
        viewer.layers["point_prompts"].add(np.concatenate([[t], centres[1]]))

    def track():
        _press(viewer, "s", shift=True)
        assert tool.tasks.wait(600000)

    mother, daughters = next((m, c) for lineage in lineages for m, c in lineage.items() if c)
    start = int(np.flatnonzero((labels == daughters[0]).any(axis=(1, 2)))[0])
    click(0, mother)
    track()
    menu.track_state.value = "division"
    click(start, daughters[0])
    track()
    for daughter in daughters:
        menu.track_id.value = str(tool.current_track_id if daughter == daughters[0] else int(menu.track_id.value) + 1)
        click(start, daughter)
        track()
    print("lineage", tool.lineage)
    _press(viewer, "c")
    other = next(k for lineage in lineages for k, c in lineage.items() if not c and k not in daughters)
    click(0, other)
    track()
    _press(viewer, "c")
    print("committed lineages", tool.committed_lineages)
    viewer.dims.set_point(0, movie.shape[0] - 1)
    viewer.layers.selection.active = viewer.layers["tracks"]
    viewer.reset_view()
    for _ in range(5):
        QApplication.processEvents()
    from PIL import Image

    image = Image.fromarray(viewer.screenshot(canvas_only=False)[..., :3])
    image = image.resize((args.width, round(image.height * args.width / image.width)), Image.LANCZOS)
    image.save(args.output, optimize=True)
    print("wrote", args.output)
    viewer.close()


if __name__ == "__main__":
    main()
