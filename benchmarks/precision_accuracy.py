"""How far reduced-precision embeddings are from float32 ones, and whether prompted masks still agree.

    python benchmarks/precision_accuracy.py [--model-type vit_b] [--points 8] [--seed 0]

Builds a random-weight SAM (segment_anything's initialisation, seeded), computes the image embedding of a
synthetic 1024x1024 microscopy image in float32 (segment_anything's original encoder forward) and with each
reduced-precision mode of :mod:`micro_sam.models.precision`:

- ``attention``: only the attention in bfloat16 (what ``precision="bfloat16"`` does on CPUs without native
  bfloat16 instructions);
- ``autocast``: the whole encoder under ``torch.autocast(bfloat16)`` (what it does on GPUs and on CPUs with
  AVX512-BF16/AMX; forced here, so it is slow on other CPUs).

Reports the mean relative feature error ``mean|f - f32| / mean|f32|`` and the IoU between the masks that
segment_anything's ``SamPredictor.predict`` returns for single positive point prompts on a grid, with the float32
and with the reduced-precision features. With random weights the masks are arbitrary, but their agreement between
precisions still shows how much the precision changes the result.
"""
import argparse
import copy
import time

import numpy as np
import torch


def _image(shape, seed):
    try:
        from micro_sam.sample_data import synthetic_nuclei_2d

        image, _ = synthetic_nuclei_2d(shape, seed=seed)
        return image
    except (ImportError, TypeError):
        rng = np.random.default_rng(seed)
        return rng.integers(0, 255, size=shape).astype("uint8")


def _masks(predictor, features, points):
    predictor.features = features
    masks = []
    for y, x in points:
        mask, _, _ = predictor.predict(point_coords=np.array([[x, y]], dtype="float32"), point_labels=np.array([1]),
                                       multimask_output=False)
        masks.append(mask[0])
    return masks


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "vit_t"])
    parser.add_argument("--points", type=int, default=8, help="point prompts (on a grid)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="attention,autocast")
    args = parser.parse_args(argv)

    from segment_anything import SamPredictor

    from micro_sam._image import to_image
    from micro_sam.models.build_sam import sam_model_registry
    from micro_sam.models.fast_attention import optimize_sam
    from micro_sam.models.precision import encoder_precision

    torch.manual_seed(args.seed)
    reference_sam = sam_model_registry[args.model_type]().eval()
    sam = optimize_sam(copy.deepcopy(reference_sam))
    image = to_image(_image((1024, 1024), args.seed))
    predictor = SamPredictor(sam)
    predictor.set_image(image)  # sets sizes; its features are replaced below
    reference = SamPredictor(reference_sam)
    start = time.perf_counter()
    reference.set_image(image)
    print(f"float32 (segment_anything's forward): {time.perf_counter() - start:.1f} s")
    full = reference.features

    side = int(np.ceil(np.sqrt(args.points)))
    grid = np.linspace(128, 1024 - 128, side)
    points = [(y, x) for y in grid for x in grid][:args.points]
    full_masks = _masks(predictor, full, points)
    print(f"mask sizes (float32): {[int(m.sum()) for m in full_masks]}")

    batch = sam.preprocess(torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1)[None].contiguous())
    for mode in args.modes.split(","):
        start = time.perf_counter()
        with torch.inference_mode(), encoder_precision(torch.bfloat16, "cpu", autocast=(mode == "autocast")):
            reduced = sam.image_encoder(batch).float()
        seconds = time.perf_counter() - start
        error = ((reduced - full).abs().mean() / full.abs().mean()).item()
        ious = [_iou(a, b) for a, b in zip(full_masks, _masks(predictor, reduced, points))]
        print(f"bfloat16 {mode:9s}: {seconds:.1f} s, mean relative feature error {error:.4%}, "
              f"mask IoU min {min(ious):.4f} median {np.median(ious):.4f} (n={len(ious)})")


if __name__ == "__main__":
    main()
