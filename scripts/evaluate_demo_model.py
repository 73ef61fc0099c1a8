"""Evaluate a demo model (by default the bundled ``vit_t_demo``) on held-out synthetic styles, images without
objects, the old held-out images and a real fluorescence image, next to a classical baseline.

The held-out styles and the images without objects are defined in ``scripts/demo_model_styles.json`` (written
down before the model was trained on ``micro_sam._synthetic_styles.sample_training_style``). Per style:

- ``ais_msa``: mean segmentation accuracy of automatic instance segmentation (AIS, default settings);
- ``point_iou``: mean IoU of the mask from one click at each object's interior-most pixel (best of three masks);
- ``area_ratio``: mean over the true objects of (area of the AIS object covering most of it) / (its area)
  (``micro_sam.evaluation.metrics.object_area_ratios``), ``point_area_ratio`` the same for the point masks;
- ``baseline_msa``: mSA of ``micro_sam.evaluation.classical.otsu_watershed_segmentation`` with the parameters in
  ``scripts/demo_model_baseline.json`` (tuned once on training-style images: ``--tune-baseline``).

Images without objects: the number of AIS objects (target 0). Old held-out: the 8 images of the old generator
(``evaluate`` of ``scripts/train_demo_model.py``). Real: ``img2d.tif`` / ``mask2d.tif`` (a DSB 2018 nuclei image
with its annotation) from the stardist 0.9.2 wheel, fetched with ``pip download`` into ``--real-dir`` (default
``.real_data/``, ignored by git) unless present there.

    python scripts/evaluate_demo_model.py                              # the bundled model, everything
    python scripts/evaluate_demo_model.py --model a.pt --model b.pt --json results.json
    python scripts/evaluate_demo_model.py --validation                 # model selection: validation images only
    python scripts/evaluate_demo_model.py --tune-baseline              # once: write the baseline's parameters
"""
import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STYLES = os.path.join(ROOT, "scripts", "demo_model_styles.json")
BASELINE = os.path.join(ROOT, "scripts", "demo_model_baseline.json")
BUNDLED = os.path.join(ROOT, "micro_sam", "_data", "vit_t_demo.pt")
REAL_DIR = os.path.join(ROOT, ".real_data")
REAL_WHEEL = "stardist==0.9.2"
REAL_MEMBERS = {"image": "stardist/data/images/img2d.tif", "labels": "stardist/data/images/mask2d.tif"}
BASELINE_GRID = {"smoothing": [0.5, 1.0, 2.0], "min_distance": [3, 5, 8, 12], "distance_smoothing": [0.0, 1.0, 2.0]}


def _demo_script():
    spec = importlib.util.spec_from_file_location("train_demo_model", os.path.join(ROOT, "scripts",
                                                                                   "train_demo_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_spec(path: str = STYLES, baseline_path: str = BASELINE) -> dict:
    """The held-out styles and the images without objects, with the baseline's parameters under "baseline"."""
    with open(path) as f:
        spec = json.load(f)
    if os.path.exists(baseline_path):
        with open(baseline_path) as f:
            spec["baseline"] = json.load(f)
    return spec


def held_out_images(spec: dict) -> Iterator[Tuple[str, np.ndarray, np.ndarray]]:
    """(style name, image, labels) for every seed of every held-out style."""
    from micro_sam._synthetic_styles import render_style, style_from_dict

    shape = tuple(spec["shape"])
    for entry in spec["styles"]:
        style = style_from_dict(entry["style"])
        for seed in entry["seeds"]:
            image, labels = render_style(style, shape, np.random.default_rng(seed))
            yield entry["name"], image, labels


def empty_images(spec: dict) -> Iterator[Tuple[str, np.ndarray]]:
    """(name, image) for the images without objects."""
    from micro_sam._synthetic_styles import render_style, style_from_dict

    for entry in spec["empty"]:
        image, labels = render_style(style_from_dict(entry["style"]), tuple(entry["shape"]),
                                     np.random.default_rng(entry["seed"]))
        assert labels.max() == 0
        yield entry["name"], image


def real_image(folder: str = REAL_DIR) -> Tuple[np.ndarray, np.ndarray]:
    """The DSB 2018 nuclei image of the stardist wheel and its labels (fetched with pip when missing)."""
    import tifffile

    paths = {k: os.path.join(folder, os.path.basename(v)) for k, v in REAL_MEMBERS.items()}
    if not all(os.path.exists(p) for p in paths.values()):
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", REAL_WHEEL, "-d", tmp],
                           check=True)
            wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
            with zipfile.ZipFile(wheel) as archive:
                for key, member in REAL_MEMBERS.items():
                    tmp_path = paths[key] + ".tmp"
                    with open(tmp_path, "wb") as f:
                        f.write(archive.read(member))
                    os.replace(tmp_path, paths[key])
    return tifffile.imread(paths["image"]), tifffile.imread(paths["labels"])


def baseline(image: np.ndarray, params: dict) -> np.ndarray:
    """The classical baseline with the given parameters."""
    from micro_sam.evaluation.classical import otsu_watershed_segmentation

    return otsu_watershed_segmentation(image, **params)


def tune_baseline(n_images: int = 24, seed: int = 42000) -> Tuple[dict, float]:
    """Grid search of the baseline's parameters for the best mean mSA on training-style images with objects
    (the styled training images of ``train_demo_model.py --data styles``: seeds 42000 + i, i not a multiple of 4)."""
    from micro_sam._synthetic_styles import render_style, sample_training_style
    from micro_sam.evaluation.metrics import mean_segmentation_accuracy

    images = []
    i = 0
    while len(images) < n_images:
        i += 1
        if i % 4 == 0:
            continue
        rng = np.random.default_rng(seed + i)
        image, labels = render_style(sample_training_style(rng, 0.0), (512, 512), rng)
        images.append((image, labels))
    best, best_score = None, -1.0
    names = list(BASELINE_GRID)
    for values in itertools.product(*(BASELINE_GRID[n] for n in names)):
        params = dict(zip(names, values))
        score = float(np.mean([mean_segmentation_accuracy(baseline(im, params), lb) for im, lb in images]))
        if score > best_score:
            best, best_score = params, score
    return best, best_score


class _Model:
    def __init__(self, path: str, device: str = "cpu"):
        from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder, get_predictor_and_decoder

        self.predictor, decoder = get_predictor_and_decoder("vit_t", checkpoint_path=path, device=device)
        self.segmenter = InstanceSegmentationWithDecoder(self.predictor, decoder)

    def segment(self, image: np.ndarray, labels: Optional[np.ndarray] = None,
                scores: Tuple[str, ...] = ("ais", "points")) -> Dict[str, object]:
        """AIS label image and, with labels, the point masks (those of ``scores``)."""
        from micro_sam.evaluation.point_prompts import point_prompt_masks
        from micro_sam.util import precompute_image_embeddings

        out = {}
        points = labels is not None and "points" in scores
        # without point prompts, AIS computes the embeddings itself (none for an image without contrast)
        embeddings = precompute_image_embeddings(self.predictor, image, verbose=False) if points else None
        if "ais" in scores:
            self.segmenter.initialize(image, image_embeddings=embeddings, verbose=False)
            out["ais"] = self.segmenter.generate()
        if points:
            out["points"] = point_prompt_masks(self.predictor, image, labels, image_embeddings=embeddings)
        return out


def score_image(model: _Model, image: np.ndarray, labels: np.ndarray, baseline_params: dict,
                scores: Tuple[str, ...] = ("ais", "points")) -> dict:
    """The scores of one image with labels (see the module docstring); lists are per object. ``scores``: which of
    "ais" and "points" to compute (the baseline always); the others are NaN."""
    from micro_sam.evaluation.metrics import mean_segmentation_accuracy, object_area_ratios
    from micro_sam.util import compute_iou

    result = model.segment(image, labels, scores)
    out = {"ais_msa": np.nan, "area_ratio": [], "point_iou": [], "point_area_ratio": [], "n_found": -1}
    if "ais" in result:
        ais = result["ais"]
        out.update(ais_msa=mean_segmentation_accuracy(ais, labels),
                   area_ratio=list(object_area_ratios(ais, labels).values()), n_found=int(ais.max()))
    if "points" in result:
        areas = {i: int((labels == i).sum()) for i in result["points"]}
        out.update(point_iou=[compute_iou(mask, labels == i) for i, mask in result["points"].items()],
                   point_area_ratio=[float(mask.sum()) / areas[i] for i, mask in result["points"].items()])
    classical = baseline(image, baseline_params)
    out.update(baseline_msa=mean_segmentation_accuracy(classical, labels),
               baseline_area_ratio=list(object_area_ratios(classical, labels).values()),
               n_objects=int(len(np.unique(labels)) - 1))
    return out


def _summarise(scores: List[dict]) -> dict:
    per_object = ("point_iou", "area_ratio", "point_area_ratio", "baseline_area_ratio")
    summary = {k: float(np.mean([s[k] for s in scores])) for k in ("ais_msa", "baseline_msa")}
    summary.update({k: float(np.mean(sum((s[k] for s in scores), []) or [np.nan])) for k in per_object})
    summary.update(n_images=len(scores), n_objects=sum(s["n_objects"] for s in scores),
                   n_found=sum(s["n_found"] for s in scores))
    return summary


def evaluate_model(path: str, spec: dict, parts=("styles", "empty", "old", "real"), real_dir: str = REAL_DIR,
                   verbose: bool = True, scores: Tuple[str, ...] = ("ais", "points")) -> dict:
    """All scores of one model file (``scores``: "ais" and / or "points", see :func:`score_image`)."""
    model = _Model(path)
    params = spec["baseline"]["params"]
    results = {"model": path}
    t0 = time.time()

    def log(text):
        if verbose:
            print(f"[{time.time() - t0:6.0f} s] {text}", flush=True)

    if "styles" in parts:
        by_style: Dict[str, List[dict]] = {}
        for name, image, labels in held_out_images(spec):
            by_style.setdefault(name, []).append(score_image(model, image, labels, params, scores))
        results["styles"] = {name: _summarise(scores) for name, scores in by_style.items()}
        log("held-out styles done")
    if "empty" in parts and "ais" in scores:
        results["empty"] = {name: {"n_found": int(model.segment(image)["ais"].max()),
                                   "baseline_n_found": int(baseline(image, params).max())}
                            for name, image in empty_images(spec)}
        log("images without objects done")
    if "old" in parts:
        script = _demo_script()
        images, labels = script._images(8, (512, 512), seed=42900)
        results["old"] = _summarise([score_image(model, im, lb, params, scores) for im, lb in zip(images, labels)])
        log("old held-out images done")
    if "real" in parts:
        image, labels = real_image(real_dir)
        results["real"] = _summarise([score_image(model, image, labels, params, scores)])
        log("real image done")
    if "validation" in parts:
        script = _demo_script()
        images, labels = script._images(16, (512, 512), 42500, "styles", 0.12, 0)
        per_image = [score_image(model, im, lb, params, scores) for im, lb in zip(images, labels) if lb.max() > 0]
        results["validation"] = _summarise(per_image)
        results["validation"]["n_found_in_empty"] = sum(int(model.segment(im)["ais"].max())
                                                         for im, lb in zip(images, labels) if lb.max() == 0)
        log("validation images done")
    return results


def format_results(results: dict) -> str:
    """A Markdown report of :func:`evaluate_model`'s results."""
    lines = [f"### {results['model']}", ""]
    if "styles" in results:
        lines += ["| held-out style | images | objects | AIS mSA | baseline mSA | point IoU | area ratio AIS | "
                  "area ratio point |", "|---|---|---|---|---|---|---|---|"]
        rows = list(results["styles"].items())
        for name, s in rows:
            lines.append(f"| {name} | {s['n_images']} | {s['n_objects']} | {s['ais_msa']:.3f} | "
                         f"{s['baseline_msa']:.3f} | {s['point_iou']:.3f} | {s['area_ratio']:.2f} | "
                         f"{s['point_area_ratio']:.2f} |")
        mean = {k: np.mean([s[k] for _, s in rows]) for k in ("ais_msa", "baseline_msa", "point_iou", "area_ratio",
                                                                "point_area_ratio")}
        lines.append(f"| mean of the styles | | | {mean['ais_msa']:.3f} | {mean['baseline_msa']:.3f} | "
                     f"{mean['point_iou']:.3f} | {mean['area_ratio']:.2f} | {mean['point_area_ratio']:.2f} |")
        lines.append("")
    for key, title in (("real", "real image (DSB 2018, stardist's img2d)"), ("validation", "validation images")):
        if key in results:
            s = results[key]
            lines.append(f"{title}: AIS mSA {s['ais_msa']:.3f} (baseline {s['baseline_msa']:.3f}), point IoU "
                         f"{s['point_iou']:.3f}, area ratio AIS {s['area_ratio']:.2f}, point "
                         f"{s['point_area_ratio']:.2f}, baseline {s['baseline_area_ratio']:.2f}; "
                         f"{s['n_found']} objects found of {s['n_objects']}"
                         + (f"; objects in empty images {s['n_found_in_empty']}" if "n_found_in_empty" in s else ""))
    if "old" in results:
        s = results["old"]
        lines.append(f"old held-out images ({s['n_images']}, {s['n_objects']} objects): AIS mSA {s['ais_msa']:.3f}, "
                     f"point IoU {s['point_iou']:.3f}")
    if "empty" in results:
        lines.append("images without objects (objects found, model / baseline): " + "; ".join(
            f"{name}: {e['n_found']} / {e['baseline_n_found']}" for name, e in results["empty"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None, help=f"Model file(s) (default: {BUNDLED}).")
    parser.add_argument("--styles", default=STYLES, help="The held-out definitions (JSON).")
    parser.add_argument("--parts", default="styles,empty,old,real",
                        help="Comma-separated: styles, empty, old, real, validation.")
    parser.add_argument("--scores", default="ais,points",
                        help="Comma-separated: ais, points (e.g. only ais for a model whose prompt parts are "
                             "unchanged; the rest is NaN).")
    parser.add_argument("--validation", action="store_true", help="Only the validation images (model selection).")
    parser.add_argument("--real-dir", default=REAL_DIR)
    parser.add_argument("--json", default=None, help="Write the results to this file.")
    parser.add_argument("--tune-baseline", action="store_true",
                        help="Tune the baseline on training-style images and write its parameters into --styles.")
    args = parser.parse_args(argv)

    spec = load_spec(args.styles)
    if args.tune_baseline:
        params, score = tune_baseline()
        tuned = {"params": params, "training_style_msa": round(score, 4),
                 "tuned_on": "24 styled training images (seeds 42000 + i, i = 1, 2, 3, 5, ...)", "grid": BASELINE_GRID}
        tmp = BASELINE + ".tmp"
        with open(tmp, "w") as f:
            json.dump(tuned, f, indent=1)
            f.write("\n")
        os.replace(tmp, BASELINE)
        print(f"Baseline parameters {params} (mSA {score:.3f} on the training styles) written to {BASELINE}.")
        return 0
    parts = ("validation",) if args.validation else tuple(p.strip() for p in args.parts.split(","))
    all_results = []
    for path in args.model or [BUNDLED]:
        results = evaluate_model(path, spec, parts, args.real_dir,
                                 scores=tuple(x.strip() for x in args.scores.split(",")))
        print(format_results(results), flush=True)
        all_results.append(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
