"""Automatic tracking of the synthetic time-lapse with the bundled model: time per stage and tracking accuracy.

    python benchmarks/tracking.py                          # 50 frames of 512 x 512, vit_t_demo, CPU
    python benchmarks/tracking.py --frames 10 --shape 256 256 --seed 1

Stages, each timed on its own (the embeddings are cached in one zarr file in a temporary folder):

1. embeddings of all frames (``precompute_image_embeddings(..., ndim=3)``),
2. per-frame automatic instance segmentation (AIS with the bundled decoder),
3. linking with micro_sam's overlap linker (``track_across_frames(..., tracking_model="overlap")``: the frame
   tables, optimal assignment, divisions, gap closing and the relabelled result),
4. for comparison, linking the true segmentation (per frame shuffled ids).

The tracking accuracy against the true tracks (:func:`micro_sam.evaluation.tracking.evaluate_tracking`) is printed
for both segmentations. Prints the machine load, so that numbers from a busy host can be recognised.
"""
import argparse
import os
import tempfile
import time


def _scores(name, scores):
    keys = ("segmentation_accuracy", "seg", "link_recall", "link_precision", "division_recall",
            "division_precision", "tra", "lnk")
    values = " | ".join(f"{scores[key]:.3f}" for key in keys)
    return (f"| {name} | {values} | {scores['n_true_links']} / {scores['n_true_divisions']} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--shape", type=int, nargs=2, default=(512, 512))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--radius", type=float, nargs=2, default=None,
                        help="Radius range of the nuclei; default (6, 10) scaled with the frame size / 256, so that "
                             "the nuclei have the size relative to the frame that the bundled model was trained on.")
    parser.add_argument("--model", default="vit_t_demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--save", help="Save movie, true labels and the model's segmentation in this .npz file.")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from micro_sam import util
    from micro_sam.automatic_segmentation import get_predictor_and_segmenter
    from micro_sam.evaluation.tracking import evaluate_tracking
    from micro_sam.instance_segmentation._volume import segment_slices
    from micro_sam.multi_dimensional_segmentation import track_across_frames
    from micro_sam.sample_data import synthetic_timelapse

    print(f"load before: {os.getloadavg()[0]:.1f}, torch threads: {torch.get_num_threads()}")
    scale = min(args.shape) / 256
    radius = tuple(args.radius) if args.radius else (6.0 * scale, 10.0 * scale)
    movie, labels, lineages = synthetic_timelapse(n_frames=args.frames, shape=tuple(args.shape), seed=args.seed,
                                                  radius_range=radius)
    n_objects = sum(len(np.unique(frame)) - 1 for frame in labels)
    print(f"movie {movie.shape}, nucleus radii {radius}, {n_objects} objects in all frames, "
          f"{sum(1 for lineage in lineages for c in lineage.values() if c)} divisions")
    predictor, segmenter = get_predictor_and_segmenter(args.model, device=args.device)

    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        embeddings = util.precompute_image_embeddings(predictor, movie, save_path=os.path.join(tmp, "e.zarr"),
                                                      ndim=3, verbose=True, batch_size=args.batch_size)
        times["embeddings"] = time.perf_counter() - start
        start = time.perf_counter()
        segmentation, _ = segment_slices(movie, predictor, segmenter, image_embeddings=embeddings, verbose=True)
        times["segmentation"] = time.perf_counter() - start
    if args.save:
        np.savez_compressed(args.save, movie=movie, labels=labels, segmentation=segmentation)
    start = time.perf_counter()
    result, predicted = track_across_frames(movie, segmentation, tracking_model="overlap", verbose=False)
    times["linking"] = time.perf_counter() - start

    rng = np.random.default_rng(0)
    shuffled = np.zeros_like(labels)
    for t, frame in enumerate(labels):
        ids = np.unique(frame)[1:]
        lut = np.zeros(int(frame.max()) + 1, dtype=labels.dtype)
        lut[ids] = rng.permutation(len(ids)) + 1
        shuffled[t] = lut[frame]
    start = time.perf_counter()
    true_result, true_predicted = track_across_frames(movie, shuffled, tracking_model="overlap", verbose=False)
    times["linking_true"] = time.perf_counter() - start

    print(f"load after: {os.getloadavg()[0]:.1f}")
    print("| stage | seconds | per frame |")
    print("|---|---|---|")
    for stage, seconds in times.items():
        print(f"| {stage} | {seconds:.2f} | {seconds / args.frames:.3f} |")
    print()
    print("| segmentation | SA(0.5) | SEG | link recall | link precision | division recall | division precision "
          "| TRA | LNK | true links / divisions |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(_scores(f"{args.model} AIS", evaluate_tracking(result, predicted, labels, lineages)))
    print(_scores("true masks", evaluate_tracking(true_result, true_predicted, labels, lineages)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
