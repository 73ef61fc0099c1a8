"""Finetuning methods compared: full finetuning, frozen image encoder, LoRA (rank 4) and FacT (rank 4).

``speed``: seconds per training iteration (wall time, and the CPU time of the process, which depends less on
other jobs on a shared machine), peak resident memory and the fraction of trainable parameters for
random-weight SAM (default vit_b, the CPU_32GB row of the hardware table: batch 1, 512 x 512 patches, 10 objects,
``n_sub_iteration=8``), interactive training only (``--decoder`` adds the UNETR decoder). Each method runs in its
own process, so that the peak memory is its own.

``quality``: how well each method adapts the bundled ``vit_t_demo`` to a new image domain in a fixed number of
iterations. The domain: the synthetic cells and nuclei of :mod:`micro_sam.sample_data` with inverted contrast
(dark objects on a bright background, as in brightfield), which the demo model has never seen. Training images
use seeds 5000 + i, held-out test images seeds 7000 + i (never trained on). Every method starts from the same
model, trains the same number of iterations on the same patches (same seed) with the same learning rate, and is
evaluated by the point-prompt IoU (:func:`micro_sam.evaluation.point_prompts.point_prompt_ious`: one click at each
object's interior-most pixel, best of three masks) on the test images, after exporting the model and loading it
back with ``get_sam_model(..., peft_kwargs=...)``.

    nice python benchmarks/bench_peft.py speed --iterations 2 --warmup 1 [--gradient-checkpointing]
    nice python benchmarks/bench_peft.py quality --iterations 40
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = {
    "full": {"freeze": None, "peft_kwargs": None},
    "frozen_encoder": {"freeze": ["image_encoder"], "peft_kwargs": None},
    "lora4": {"freeze": None, "peft_kwargs": {"peft_module": "lora", "rank": 4}},
    "fact4": {"freeze": None, "peft_kwargs": {"peft_module": "fact", "rank": 4}},
}


def _trainable_fraction(trainer) -> float:
    """Trainable parameters / all parameters of the trained modules (SAM, and the UNETR decoder if trained)."""
    params = {id(p): p for p in trainer.model.parameters()}
    unetr = getattr(trainer, "unetr", None)
    if unetr is not None:
        params.update({id(p): p for p in unetr.parameters()})
    trainable = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    return sum(p.numel() for i, p in params.items() if i in trainable) / sum(p.numel() for p in params.values())


#
# speed
#

class _Recorder:
    """A tqdm stand-in that records the wall and CPU time (this process) when each iteration ends."""

    def __init__(self):
        self.stamps = []

    def update(self, n=1):
        self.stamps.append((time.perf_counter(), time.process_time()))

    def set_description(self, *args, **kwargs):
        pass


def _speed_worker(args, method):
    import torch
    from bench_training import _load_data
    from micro_sam.training import default_sam_loader
    from micro_sam.training.training import _build_sam_trainer

    images, labels = _load_data(args.data)
    n_total = args.iterations + args.warmup
    loader = default_sam_loader(raw_paths=images, raw_key=None, label_paths=labels, label_key=None,
                                patch_shape=(args.patch, args.patch), with_segmentation_decoder=args.decoder,
                                batch_size=1, n_samples=n_total, shuffle=True)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _build_sam_trainer(
            name="bench", model_type=args.model_type, train_loader=loader, val_loader=loader, early_stopping=None,
            n_objects_per_batch=args.objects, checkpoint_path=os.path.join(args.data, f"{args.model_type}.pt"),
            with_segmentation_decoder=args.decoder, device="cpu", lr=1e-5, n_sub_iteration=8, save_root=tmp,
            mask_prob=0.5, scheduler_class=None, scheduler_kwargs=None, optimizer_class=torch.optim.AdamW,
            box_distortion_factor=0.025, strict_decoder_loading=True, low_res_loss=True, **METHODS[method],
        )
        trainer.logger_class = None
        trainer.model.gradient_checkpointing = args.gradient_checkpointing
        trainer._initialize(n_total, None)
        recorder = _Recorder()
        start = (time.perf_counter(), time.process_time())
        trainer._train_epoch(recorder)
        edges = [start] + recorder.stamps + [(time.perf_counter(), time.process_time())]
        return {"times": [b[0] - a[0] for a, b in zip(edges[:-1], edges[1:])],
                "cpu_times": [b[1] - a[1] for a, b in zip(edges[:-1], edges[1:])],
                "trainable_fraction": _trainable_fraction(trainer)}


def _speed(args):
    from bench_training import _prepare

    print(f"{args.model_type}, batch 1, patch {args.patch}x{args.patch}, {args.objects} objects, n_sub_iteration 8, "
          f"UNETR decoder: {args.decoder}, gradient checkpointing: {args.gradient_checkpointing}, {args.iterations} timed + {args.warmup} warm-up iterations, "
          f"torch threads: {args.threads or 'default'}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'method':<16} {'s/iteration':>12} {'CPU s/it':>9} {'peak MB':>8} {'trainable':>10}")
    with tempfile.TemporaryDirectory() as data_dir:
        args.data = data_dir
        _prepare(data_dir, [args.model_type], args.patch)
        for method in args.methods:
            result = _run_worker(args, "speed", method)
            timed = result["times"][args.warmup:] or result["times"]
            cpu = result["cpu_times"][args.warmup:] or result["cpu_times"]
            print(f"{method:<16} {np.mean(timed):>12.1f} {np.mean(cpu):>9.1f} {result['peak_mb']:>8.0f} "
                  f"{100 * result['trainable_fraction']:>9.2f}%  (load {os.getloadavg()[0]:.1f})", flush=True)


#
# quality
#

def _domain_images(seeds):
    """Inverted-contrast synthetic cells (even seeds) and nuclei (odd seeds), with their labels."""
    from micro_sam.sample_data import synthetic_cells_2d, synthetic_nuclei_2d

    images, labels = [], []
    for seed in seeds:
        image, label = (synthetic_cells_2d if seed % 2 == 0 else synthetic_nuclei_2d)(seed=seed)
        images.append((255 - image.astype("int16")).astype("uint8"))
        labels.append(label)
    return images, labels


def _point_iou(predictor, images, labels) -> float:
    from micro_sam.evaluation.point_prompts import point_prompt_ious

    ious = []
    for image, label in zip(images, labels):
        ious.extend(point_prompt_ious(predictor, image, label).values())
    return float(np.mean(ious))


def _quality_worker(args, method):
    import torch
    from micro_sam.training import default_sam_loader, train_sam
    from micro_sam.util import export_custom_sam_model, get_sam_model

    test_images, test_labels = _domain_images(range(7000, 7000 + args.n_test))
    if method == "before":
        return {"iou": _point_iou(get_sam_model("vit_t_demo", device="cpu"), test_images, test_labels)}
    images, labels = _domain_images(range(5000, 5000 + args.n_train))
    torch.manual_seed(0), np.random.seed(0)
    common = dict(raw_key=None, label_key=None, patch_shape=(512, 512), with_segmentation_decoder=False)
    train = default_sam_loader(raw_paths=images, label_paths=labels, n_samples=args.iterations, shuffle=True,
                               batch_size=1, **common)
    val = default_sam_loader(raw_paths=images[:2], label_paths=labels[:2], n_samples=2, is_train=False,
                             batch_size=1, **common)
    with tempfile.TemporaryDirectory() as tmp:
        t_start = time.perf_counter()
        train_sam("peft", "vit_t_demo", train, val, n_iterations=args.iterations, with_segmentation_decoder=False,
                  n_objects_per_batch=args.objects, n_sub_iteration=args.sub_iterations, lr=args.lr, device="cpu",
                  save_root=tmp, early_stopping=None, verify_n_labels_in_loader=2, scheduler_class=None,
                  **METHODS[method])
        seconds = time.perf_counter() - t_start
        exported = os.path.join(tmp, "model.pt")
        export_custom_sam_model(os.path.join(tmp, "checkpoints", "peft", "latest.pt"), "vit_t", exported)
        predictor = get_sam_model("vit_t", checkpoint_path=exported, device="cpu",
                                  peft_kwargs=METHODS[method]["peft_kwargs"])
        return {"iou": _point_iou(predictor, test_images, test_labels), "seconds": seconds}


def _quality(args):
    print(f"vit_t_demo adapted to inverted-contrast synthetic cells / nuclei: {args.n_train} training images, "
          f"{args.n_test} test images, {args.iterations} iterations, lr {args.lr}, {args.objects} objects, "
          f"n_sub_iteration {args.sub_iterations}, torch threads: {args.threads or 'default'}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'method':<16} {'point IoU':>10} {'training s':>11}")
    for method in ["before"] + list(args.methods):
        result = _run_worker(args, "quality", method)
        seconds = f"{result['seconds']:>11.0f}" if "seconds" in result else f"{'-':>11}"
        print(f"{method:<16} {result['iou']:>10.3f} {seconds}  (peak {result['peak_mb']:.0f} MB, load "
              f"{os.getloadavg()[0]:.1f})", flush=True)


#
# workers
#

def _run_worker(args, mode, method):
    command = [sys.executable, os.path.abspath(__file__), mode, "--_worker", method]
    for name in ("data", "model_type", "objects", "patch", "iterations", "warmup", "threads", "n_train", "n_test",
                 "lr", "sub_iterations"):
        value = getattr(args, name, None)
        if value is not None:
            command += [f"--{name.replace('_', '-')}" if name != "data" else "--_data", str(value)]
    for flag in ("decoder", "gradient_checkpointing"):
        if getattr(args, flag, False):
            command.append(f"--{flag.replace('_', '-')}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} {method} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("speed", "quality"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--iterations", type=int, default=None, help="speed: timed (2); quality: trained (40).")
    parser.add_argument("--warmup", type=int, default=1, help="speed: untimed iterations before.")
    parser.add_argument("--model-type", default="vit_b", help="speed: the random-weight model.")
    parser.add_argument("--patch", type=int, default=512, help="speed: patch size.")
    parser.add_argument("--objects", type=int, default=10, help="Objects per image.")
    parser.add_argument("--decoder", action="store_true", help="speed: also train the UNETR decoder.")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="speed: recompute the encoder's activations in the backward pass (TrainableSAM).")
    parser.add_argument("--n-train", type=int, default=16, help="quality: training images.")
    parser.add_argument("--n-test", type=int, default=4, help="quality: held-out test images.")
    parser.add_argument("--lr", type=float, default=1e-4, help="quality: learning rate (all methods).")
    parser.add_argument("--sub-iterations", type=int, default=4, help="quality: n_sub_iteration.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the workers.")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.iterations is None:
        args.iterations = 2 if args.mode == "speed" else 40

    if args._worker is not None:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        args.data = args._data
        worker = _speed_worker if args.mode == "speed" else _quality_worker
        result = worker(args, args._worker)
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    (_speed if args.mode == "speed" else _quality)(args)


if __name__ == "__main__":
    main()
