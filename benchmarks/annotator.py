"""Responsiveness of the 2D annotator: click-to-mask latency and Qt event-loop stalls while embeddings compute.

Both this package and micro_sam 1.8.14 run the bundled ``vit_t_demo`` weights (micro_sam loads them as a
``vit_t`` checkpoint at its fixed encoder input size 1024; this package runs them at the recorded 640 and, for an
equal comparison, at 1024 from a copy of the checkpoint without the recorded size). Needs a display::

    xvfb-run -a python benchmarks/annotator.py --reference /tmp/micro-sam-reference/bin/python

Each implementation runs in its own subprocess with a shown napari window (1400 x 900):

- click: a point prompt is added at the centre of an object and S is pressed on the canvas (a real key event
  through napari's key bindings); the time until the key handler returned and the pending Qt events (the
  ``current_object`` repaint) were processed; the embeddings are precomputed. Median and 90th percentile of
  ``--clicks`` objects.
- stall: a 10 ms QTimer runs while the embedding widget computes the embeddings of a second image (2D) and of a
  volume (3D annotator); the longest gap between two timer ticks is the longest time the viewer did not react.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# --- inputs (made with this package, read by both) -------------------------------------------------------
def prepare(folder: str, n_slices: int) -> None:
    import tifffile
    import torch

    sys.path.insert(0, ROOT)
    from micro_sam.sample_data import synthetic_nuclei_2d, synthetic_nuclei_3d

    image, labels = synthetic_nuclei_2d(seed=0)
    tifffile.imwrite(os.path.join(folder, "image.tif"), image)
    tifffile.imwrite(os.path.join(folder, "labels.tif"), labels)
    tifffile.imwrite(os.path.join(folder, "image2.tif"), synthetic_nuclei_2d(seed=1)[0])
    tifffile.imwrite(os.path.join(folder, "volume.tif"), synthetic_nuclei_3d((n_slices, 512, 512), seed=0)[0])
    demo = os.path.join(ROOT, "micro_sam", "_data", "vit_t_demo.pt")
    shutil.copy(demo, os.path.join(folder, "vit_t_demo.pt"))
    state = torch.load(demo, weights_only=True)
    state.pop("image_size")
    torch.save(state, os.path.join(folder, "vit_t_demo_1024.pt"))


# --- measurements (run in the subprocess of one implementation) ---------------------------------------------
def _centres(labels, n):
    ids, counts = np.unique(labels[labels != 0], return_counts=True)
    centres = []
    for object_id in ids[np.argsort(counts)[::-1]][:n]:
        ys, xs = np.nonzero(labels == object_id)
        k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
        centres.append((float(ys[k]), float(xs[k])))
    return centres


def _press(viewer, key, shift=False):
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication

    modifier = Qt.KeyboardModifier.ShiftModifier if shift else Qt.KeyboardModifier.NoModifier
    QTest.keyClick(viewer.window._qt_viewer.canvas.native, getattr(Qt.Key, f"Key_{key.upper()}"), modifier)
    QApplication.processEvents()
    QApplication.processEvents()


def _gaps_while(start, is_done):
    """Run the Qt event loop with a 10 ms timer while ``start()``'s work runs; the timer gaps in ms."""
    from qtpy.QtCore import QEventLoop, QTimer

    stamps, loop = [], QEventLoop()
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: stamps.append(time.perf_counter()))

    def poll():
        if is_done():
            loop.quit()
        else:
            QTimer.singleShot(20, poll)

    timer.start()
    t0 = time.perf_counter()
    QTimer.singleShot(30, start)
    QTimer.singleShot(60, poll)
    loop.exec()
    total = time.perf_counter() - t0
    timer.stop()
    gaps = np.diff(stamps) * 1000
    return {"max_gap_ms": float(gaps.max()), "p99_gap_ms": float(np.percentile(gaps, 99)), "total_s": total}


def measure(impl: str, folder: str, clicks: int, checkpoint: str) -> dict:
    import napari
    import tifffile

    image = tifffile.imread(os.path.join(folder, "image.tif"))
    labels = tifffile.imread(os.path.join(folder, "labels.tif"))
    image2 = tifffile.imread(os.path.join(folder, "image2.tif"))
    volume = tifffile.imread(os.path.join(folder, "volume.tif"))
    checkpoint = os.path.join(folder, checkpoint)
    embedding_path = os.path.join(folder, f"embeddings_{impl}_{os.path.basename(checkpoint)}.zarr")
    result = {}
    if impl == "project":
        sys.path.insert(0, ROOT)
        from micro_sam.sam_annotator import annotator_2d, annotator_3d

        # first call computes the embeddings (not timed here), the annotator then uses the cache
        viewer = annotator_2d(image, embedding_path=embedding_path, model_type="vit_t", checkpoint_path=checkpoint,
                              device="cpu", return_viewer=True)
        tool = viewer.window.dock_widgets["Annotator2d"]
        widget_of = tool.widgets.__getitem__
        busy = lambda: tool.tasks.busy  # noqa: E731
    else:
        from micro_sam.sam_annotator import annotator_2d, annotator_3d
        from micro_sam.sam_annotator._state import AnnotatorState

        viewer = annotator_2d(image, embedding_path=embedding_path, model_type="vit_t", checkpoint_path=checkpoint,
                              device="cpu", return_viewer=True)
        widget_of = AnnotatorState().widgets.__getitem__
        busy = lambda: False  # noqa: E731 - micro_sam 1.8.14 computes in the Qt thread
    viewer.window.resize(1400, 900)
    viewer.window.show()

    times = []
    for y, x in _centres(labels, clicks + 2):
        viewer.layers["point_prompts"].add([y, x])
        t0 = time.perf_counter()
        _press(viewer, "s")
        times.append((time.perf_counter() - t0) * 1000)
        assert viewer.layers["current_object"].data.any()
        _press(viewer, "c", shift=True)
    times = times[2:]  # warm-up
    result["click_median_ms"], result["click_p90_ms"] = float(np.median(times)), float(np.percentile(times, 90))

    def stall_for(data, name):
        layer = viewer.add_image(data, name=name)
        widget = widget_of("embeddings")
        if impl == "project":
            widget.image.value = layer
            widget.embeddings_save_path.value = None
            started = []
            result_gaps = _gaps_while(lambda: started.append(widget()), lambda: bool(started) and not busy())
        else:
            from micro_sam.sam_annotator._state import AnnotatorState

            widget.image_selection.value = layer
            widget.embeddings_save_path_param.setText("")
            AnnotatorState().image_embeddings = None  # no "recompute?" dialog
            done = []
            result_gaps = _gaps_while(lambda: (widget.run_button.click(), done.append(1)), lambda: bool(done))
        return result_gaps

    result["stall_2d"] = stall_for(image2, "image2")
    viewer.close()
    viewer = annotator_3d(volume[:1].repeat(2, axis=0), model_type="vit_t", checkpoint_path=checkpoint, device="cpu",
                          return_viewer=True)
    if impl == "project":
        tool = viewer.window.dock_widgets["Annotator3d"]
        widget_of = tool.widgets.__getitem__
    else:
        from micro_sam.sam_annotator._state import AnnotatorState

        widget_of = AnnotatorState().widgets.__getitem__
    viewer.window.show()
    result["stall_3d"] = stall_for(volume, "volume")
    result["n_slices"] = int(volume.shape[0])
    viewer.close()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", help="The python of a micro_sam 1.8.14 environment (with napari).")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--impl", choices=["project", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl is not None:
        print(json.dumps(measure(args.impl, args.folder, args.clicks, args.checkpoint)))
        return
    if not os.environ.get("DISPLAY"):
        sys.exit("A display is needed: run under xvfb-run -a.")
    folder = tempfile.mkdtemp(prefix="annotator_bench_")
    prepare(folder, args.slices)
    runs = [("project", sys.executable, "vit_t_demo.pt"), ("project", sys.executable, "vit_t_demo_1024.pt")]
    if args.reference:
        runs.append(("reference", args.reference, "vit_t_demo.pt"))
    rows = []
    for impl, python, checkpoint in runs:
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        out = subprocess.run([python, __file__, "--impl", impl, "--folder", folder, "--checkpoint", checkpoint,
                              "--clicks", str(args.clicks)], capture_output=True, text=True, env=env, cwd=folder)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            continue
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        size = 640 if checkpoint == "vit_t_demo.pt" and impl == "project" else 1024
        rows.append((f"{'this package' if impl == 'project' else 'micro_sam 1.8.14'} (input {size})", measured))
    print(f"load: {os.getloadavg()}")
    print("| implementation | click median / p90 | 2D embeddings: longest stall / total | "
          "3D embeddings: longest stall / total |")
    print("|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | {m['click_median_ms']:.0f} / {m['click_p90_ms']:.0f} ms | "
              f"{m['stall_2d']['max_gap_ms']:.0f} ms / {m['stall_2d']['total_s']:.1f} s | "
              f"{m['stall_3d']['max_gap_ms']:.0f} ms / {m['stall_3d']['total_s']:.1f} s ({m['n_slices']} slices) |")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
