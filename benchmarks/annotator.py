"""Responsiveness of the 2D annotator: click-to-mask latency and Qt event-loop stalls while embeddings compute.

Both this package and micro_sam 1.8.14 run the bundled ``vit_t_demo`` weights (micro_sam loads them as a
``vit_t`` checkpoint at its fixed encoder input size 1024; this package runs them at the recorded 640 and, for an
equal comparison, at 1024 from a copy of the checkpoint without the recorded size). Needs a display::

    xvfb-run -a python benchmarks/annotator.py --reference /tmp/micro-sam-reference/bin/python

Each implementation runs in its own subprocess with a shown napari window (1400 x 900):

- click: a point prompt is added at the centre of an object and S is pressed on the canvas (a real key event
  through napari's key bindings); the time until the key handler returned and the pending Qt events (the
  ``current_object`` repaint) were processed; the embeddings are precomputed. Median and 90th percentile of
  ``--clicks`` objects, the library call alone (``segment_from_points`` on the same embeddings), and the CPU time
  of the whole process per click (all threads; it does not grow with the load of a shared host, the wall times do).
- stall: a 10 ms QTimer runs while the embedding widget computes the embeddings of a second image (2D) and of a
  volume (3D annotator); a gap between two timer ticks is a time the viewer did not react. Reported: the longest
  gap while the work runs in the background, the longest gap overall (it includes the button press, which creates
  napari's progress bar, and putting the result into the layers), the time the button press took, and the total.
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


def _gaps_while(start, is_done, marks):
    """Run the Qt event loop with a 10 ms timer while ``start()``'s work runs; the timer gaps in ms.

    ``marks`` gets "started" (``start()`` returned) and, from the caller, "finishing" (the result is being put into
    the layers): the gaps between the two are those while the work runs in the background.
    """
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

    def run():
        marks["start"] = time.perf_counter()
        start()
        marks["started"] = time.perf_counter()

    timer.start()
    QTimer.singleShot(30, run)
    QTimer.singleShot(60, poll)
    loop.exec()
    timer.stop()
    stamps = np.array(stamps)
    gaps = np.diff(stamps) * 1000
    inside = (stamps[1:] > marks["started"]) & (stamps[:-1] < marks.get("finishing", marks["started"]))
    return {"max_gap_ms": float(gaps.max()), "p99_gap_ms": float(np.percentile(gaps, 99)),
            "max_gap_computing_ms": float(gaps[inside].max()) if inside.any() else float("nan"),
            "start_ms": (marks["started"] - marks["start"]) * 1000, "total_s": float(stamps[-1] - marks["start"])}


def measure(impl: str, folder: str, clicks: int, checkpoint: str) -> dict:
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
    else:
        from micro_sam.sam_annotator import annotator_2d, annotator_3d
        from micro_sam.sam_annotator._state import AnnotatorState

        viewer = annotator_2d(image, embedding_path=embedding_path, model_type="vit_t", checkpoint_path=checkpoint,
                              device="cpu", return_viewer=True)
        widget_of = AnnotatorState().widgets.__getitem__  # micro_sam 1.8.14 computes in the Qt thread
    viewer.window.resize(1400, 900)
    viewer.window.show()

    times, cpu_times = [], []
    for y, x in _centres(labels, clicks + 2):
        viewer.layers["point_prompts"].add([y, x])
        t0, c0 = time.perf_counter(), time.process_time()
        _press(viewer, "s")
        times.append((time.perf_counter() - t0) * 1000)
        cpu_times.append((time.process_time() - c0) * 1000)
        assert viewer.layers["current_object"].data.any()
        _press(viewer, "c", shift=True)
    times, cpu_times = times[2:], cpu_times[2:]  # warm-up
    result["click_median_ms"], result["click_p90_ms"] = float(np.median(times)), float(np.percentile(times, 90))
    # CPU time of the whole process (all threads) per click: what the click costs, whatever else runs on the host
    result["click_cpu_median_ms"] = float(np.median(cpu_times))
    # the library call alone, on the same embeddings
    from micro_sam.prompt_based_segmentation import segment_from_points

    if impl == "project":
        predictor, embeddings = tool.state.predictor, tool.state.image_embeddings
    else:
        from micro_sam.sam_annotator._state import AnnotatorState

        predictor, embeddings = AnnotatorState().predictor, AnnotatorState().image_embeddings
    calls = []
    for y, x in _centres(labels, clicks + 2):
        t0 = time.perf_counter()
        segment_from_points(predictor, np.array([[y, x]]), np.array([1]), image_embeddings=embeddings)
        calls.append((time.perf_counter() - t0) * 1000)
    result["library_median_ms"] = float(np.median(calls[2:]))

    def stall_for(data, name, tool=None):
        layer = viewer.add_image(data, name=name)
        widget = widget_of("embeddings")
        marks = {}
        if impl == "project":
            changed = tool.image_changed

            def image_changed(*args, **kwargs):
                marks["finishing"] = time.perf_counter()
                changed(*args, **kwargs)

            tool.image_changed = image_changed
            widget.image.value = layer
            widget.embeddings_save_path.value = None
            started = []
            return _gaps_while(lambda: started.append(widget()), lambda: bool(started) and not tool.tasks.busy, marks)
        from micro_sam.sam_annotator._state import AnnotatorState

        widget.image_selection.value = layer
        widget.embeddings_save_path_param.setText("")
        AnnotatorState().image_embeddings = None  # no "recompute?" dialog
        done = []
        return _gaps_while(lambda: (widget.run_button.click(), done.append(1)), lambda: bool(done), marks)

    result["stall_2d"] = stall_for(image2, "image2", tool if impl == "project" else None)
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
    result["stall_3d"] = stall_for(volume, "volume", tool if impl == "project" else None)
    result["n_slices"] = int(volume.shape[0])
    viewer.close()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", help="The python of a micro_sam 1.8.14 environment (with napari).")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--no_1024", action="store_true", help="Skip this package at input size 1024.")
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
    runs = [("project", sys.executable, "vit_t_demo.pt")]
    if not args.no_1024:
        runs.append(("project", sys.executable, "vit_t_demo_1024.pt"))
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
    print(f"load average (1, 5, 15 min): {os.getloadavg()}")
    print("| implementation | click: median / p90 (library call) / CPU time | embeddings 2D: stall while computing / "
          "longest / start / total | embeddings 3D (same) |")
    print("|---|---|---|---|")

    def stall(m):
        return (f"{m['max_gap_computing_ms']:.0f} / {m['max_gap_ms']:.0f} / {m['start_ms']:.0f} ms / "
                f"{m['total_s']:.1f} s")

    for name, m in rows:
        print(f"| {name} | {m['click_median_ms']:.0f} / {m['click_p90_ms']:.0f} ms ({m['library_median_ms']:.0f} "
              f"ms) / {m['click_cpu_median_ms']:.0f} ms | {stall(m['stall_2d'])} | {stall(m['stall_3d'])} "
              f"({m['n_slices']} slices) |")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
