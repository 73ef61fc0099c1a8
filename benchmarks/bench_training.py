"""Seconds per training iteration and peak memory of ``micro_sam.training`` (optionally against micro_sam 1.8).

Each configuration runs in its own process (so that the peak resident memory, from ``resource.getrusage``,
belongs to it): random-weight SAM (vit_t, and vit_b with ``--vit-b``) with the UNETR decoder, batch size 1,
synthetic nuclei images, ``n_sub_iteration=8``, ``mask_prob=0.5``, the objects per batch given by ``--objects``.
The time of an iteration is the wall time of the training loop between two iterations (data loading, forward,
backward and optimizer step), as the trainer's progress bar sees it; the first ``--warmup`` iterations are not
counted. Both packages run without a logger.

With ``--reference-python`` the same configurations also run with the published micro_sam (an environment that
has it installed, e.g. ``/tmp/micro-sam-reference/bin/python``), set up exactly as its ``train_sam`` does (which
includes mixed precision, i.e. bfloat16 autocast on the CPU; ``--reference-fp32`` turns that off).

    python benchmarks/bench_training.py                       # vit_t, 10 and 15 objects
    python benchmarks/bench_training.py --vit-b --objects 10  # also vit_b (slow on a CPU)
    python benchmarks/bench_training.py --reference-python /tmp/micro-sam-reference/bin/python
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


class _Recorder:
    """A tqdm stand-in that records when each iteration ends."""

    def __init__(self):
        self.stamps = []

    def update(self, n=1):
        self.stamps.append(time.perf_counter())

    def set_description(self, *args, **kwargs):
        pass


def _iteration_times(t_start, stamps, t_end):
    edges = [t_start] + list(stamps) + [t_end]
    return [b - a for a, b in zip(edges[:-1], edges[1:])]


def _load_data(data_dir):
    data = np.load(os.path.join(data_dir, "data.npz"))
    n = len([k for k in data.files if k.startswith("image")])
    return [data[f"image{i}"] for i in range(n)], [data[f"labels{i}"] for i in range(n)]


def _worker_ours(args):
    import torch
    from micro_sam.training import default_sam_loader
    from micro_sam.training.training import _build_sam_trainer

    images, labels = _load_data(args.data)
    n_total = args.iterations + args.warmup
    loader = default_sam_loader(
        raw_paths=images, raw_key=None, label_paths=labels, label_key=None, patch_shape=(args.patch, args.patch),
        with_segmentation_decoder=not args.no_decoder, batch_size=1, n_samples=n_total, shuffle=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _build_sam_trainer(
            name="bench", model_type=args.model_type, train_loader=loader, val_loader=loader, early_stopping=None,
            n_objects_per_batch=args.objects, checkpoint_path=os.path.join(args.data, f"{args.model_type}.pt"),
            with_segmentation_decoder=not args.no_decoder, freeze=None, device="cpu", lr=1e-5, n_sub_iteration=8,
            save_root=tmp, mask_prob=0.5, scheduler_class=torch.optim.lr_scheduler.ReduceLROnPlateau,
            scheduler_kwargs=None, optimizer_class=torch.optim.AdamW, peft_kwargs=None, box_distortion_factor=0.025,
            strict_decoder_loading=True, low_res_loss=not args.full_res_loss,
        )
        trainer.logger_class = None
        trainer._initialize(n_total, None)
        recorder = _Recorder()
        train_epoch = trainer._train_epoch_mixed if trainer.mixed_precision else trainer._train_epoch
        t_start = time.perf_counter()
        train_epoch(recorder)
        return _iteration_times(t_start, recorder.stamps, time.perf_counter())


def _worker_reference(args):
    import torch
    import torch_em
    from micro_sam.instance_segmentation import get_unetr
    from micro_sam.training import default_sam_loader
    from micro_sam.training import joint_sam_trainer, sam_trainer
    from micro_sam.training.util import ConvertToSamInputs, get_trainable_sam_model

    images, labels = _load_data(args.data)
    n_total = args.iterations + args.warmup
    decoder = not args.no_decoder
    loader = default_sam_loader(
        raw_paths=images, raw_key=None, label_paths=labels, label_key=None, patch_shape=(args.patch, args.patch),
        with_segmentation_decoder=decoder, batch_size=1, n_samples=n_total, shuffle=True,
    )
    model, state = get_trainable_sam_model(model_type=args.model_type, device="cpu", return_state=True,
                                           checkpoint_path=os.path.join(args.data, f"{args.model_type}.pt"))
    convert_inputs = ConvertToSamInputs(transform=model.transform, box_distortion_factor=0.025)
    params = [p for p in model.parameters()]
    if decoder:
        unetr = get_unetr(image_encoder=model.sam.image_encoder, decoder_state=None, device="cpu")
        params += [p for n, p in unetr.named_parameters() if not n.startswith("encoder")]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.9, patience=3)
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(name="bench", save_root=tmp, train_loader=loader, val_loader=loader, model=model,
                      optimizer=optimizer, device="cpu", lr_scheduler=scheduler, logger=None, log_image_interval=100,
                      mixed_precision=not args.reference_fp32, convert_inputs=convert_inputs,
                      n_objects_per_batch=args.objects, n_sub_iteration=8, compile_model=False, early_stopping=None,
                      mask_prob=0.5)
        if decoder:
            loss = torch_em.loss.DiceBasedDistanceLoss(mask_distances_in_bg=True)
            trainer = joint_sam_trainer.JointSamTrainer(unetr=unetr, instance_loss=loss, instance_metric=loss,
                                                        **common)
        else:
            trainer = sam_trainer.SamTrainer(**common)
        trainer._initialize(n_total, None)
        recorder = _Recorder()
        train_epoch = trainer._train_epoch_mixed if trainer.mixed_precision else trainer._train_epoch
        t_start = time.perf_counter()
        train_epoch(recorder)
        return _iteration_times(t_start, recorder.stamps, time.perf_counter())


def _prepare(data_dir, model_types, patch):
    import torch
    from micro_sam.models.build_sam import sam_model_registry
    from micro_sam.sample_data import synthetic_nuclei_2d

    arrays = {}
    for i in range(4):
        image, labels = synthetic_nuclei_2d((patch, patch), seed=100 + i)
        arrays[f"image{i}"], arrays[f"labels{i}"] = image, labels
    np.savez(os.path.join(data_dir, "data.npz"), **arrays)
    for model_type in model_types:
        torch.manual_seed(0)
        torch.save(sam_model_registry[model_type]().state_dict(), os.path.join(data_dir, f"{model_type}.pt"))


def _run(python, which, args, model_type, objects):
    command = [python, os.path.abspath(__file__), "--_worker", which, "--_data", args.data, "--model-types",
               model_type, "--objects", str(objects), "--patch", str(args.patch), "--iterations", str(args.iterations),
               "--warmup", str(args.warmup)]
    for flag in ("no_decoder", "full_res_loss", "reference_fp32"):
        if getattr(args, flag):
            command.append("--" + flag.replace("_", "-"))
    if args.threads:
        command += ["--threads", str(args.threads)]
    # Run from a neutral directory so that the reference interpreter imports its own micro_sam.
    result = subprocess.run(command, capture_output=True, text=True, cwd=tempfile.gettempdir())
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{which} {model_type} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-types", nargs="*", default=["vit_t"])
    parser.add_argument("--vit-b", action="store_true", help="Also run vit_b (slow).")
    parser.add_argument("--objects", type=int, nargs="*", default=[10, 15])
    parser.add_argument("--patch", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=2, help="Timed iterations per configuration.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed iterations before.")
    parser.add_argument("--no-decoder", action="store_true", help="Without the UNETR decoder.")
    parser.add_argument("--full-res-loss", action="store_true", help="Ours with micro_sam's full-resolution loss.")
    parser.add_argument("--reference-python", default=None, help="Interpreter with the published micro_sam.")
    parser.add_argument("--reference-fp32", action="store_true", help="Reference without mixed precision.")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's).")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker is not None:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        args.data, args.model_type, args.objects = args._data, args.model_types[0], args.objects[0]
        worker = _worker_ours if args._worker == "ours" else _worker_reference
        times = worker(args)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"times": times, "peak_mb": peak_mb}))
        return

    model_types = list(args.model_types) + (["vit_b"] if args.vit_b and "vit_b" not in args.model_types else [])
    runs = [] if args.skip_ours else [("ours", sys.executable)]
    if args.reference_python:
        runs.append(("micro_sam 1.8", args.reference_python))
    print(f"batch 1, patch {args.patch}x{args.patch}, n_sub_iteration 8, decoder: {not args.no_decoder}, "
          f"{args.iterations} timed + {args.warmup} warm-up iterations, threads: {args.threads or 'default'}")
    print(f"{'package':<14} {'model':<6} {'objects':>7} {'s/iteration':>12} {'min':>7} {'peak MB':>8}")
    with tempfile.TemporaryDirectory() as data_dir:
        args.data = data_dir
        _prepare(data_dir, model_types, args.patch)
        for model_type in model_types:
            for objects in args.objects:
                for label, python in runs:
                    result = _run(python, "ours" if label == "ours" else "reference", args, model_type, objects)
                    timed = result["times"][args.warmup:] or result["times"]
                    print(f"{label:<14} {model_type:<6} {objects:>7} {np.mean(timed):>12.2f} {np.min(timed):>7.2f} "
                          f"{result['peak_mb']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
