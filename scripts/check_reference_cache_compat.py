"""Check that embedding caches are interchangeable with the published micro_sam 1.8.

Usage: python scripts/check_reference_cache_compat.py REFERENCE_PYTHON [WORKDIR]

REFERENCE_PYTHON is an interpreter with micro-sam 1.8.x installed (see ../shared/reference/make-reference-env).
The script saves a random-init vit_t checkpoint, lets each implementation write 2D, 3D and tiled caches, opens
each cache with the other implementation with the encoder disabled (so any recomputation fails), and compares
the features. Prints one line per check and exits non-zero on a mismatch.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

CASES = {
    "2d": dict(shape=(200, 300), kwargs={}),
    "3d": dict(shape=(3, 128, 160), kwargs={}),
    "tiled": dict(shape=(600, 520), kwargs={"tile_shape": [256, 256], "halo": [32, 32]}),
}

WORKER = r'''
import json, sys, numpy as np, torch
from micro_sam.util import get_sam_model, precompute_image_embeddings
mode, checkpoint, workdir, cases = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
predictor = get_sam_model(model_type="vit_t", checkpoint_path=checkpoint, device="cpu")
rng = np.random.default_rng(0)
images = {name: rng.integers(0, 4000, size=case["shape"]).astype("uint16") for name, case in cases.items()}
out = {}
for name, case in cases.items():
    kwargs = {k: tuple(v) for k, v in case["kwargs"].items()}
    path = f"{workdir}/{mode}_{name}.zarr" if mode == "write" else sys.argv[5] + f"_{name}.zarr"
    if mode == "read":  # any encoder call means the cache was not reused
        def refuse(*args, **kwargs):
            raise RuntimeError("recomputation")
        predictor.model.image_encoder.forward = refuse
    emb = precompute_image_embeddings(predictor, images[name], save_path=path, verbose=False, **kwargs)
    feats = emb["features"]
    if hasattr(feats, "keys") and not hasattr(feats, "shape"):
        feats = np.stack([feats[k][...] for k in sorted(feats.keys(), key=int)])
    out[name] = float(np.abs(np.asarray(feats[...])).sum())
print(json.dumps(out))
'''


def run(python, *args):
    result = subprocess.run([python, "-c", WORKER, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{python} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    reference = sys.argv[1]
    workdir = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="cache_compat_")
    os.makedirs(workdir, exist_ok=True)
    import torch

    from micro_sam.models import sam_model_registry

    torch.manual_seed(0)
    checkpoint = os.path.join(workdir, "vit_t.pt")
    torch.save(sam_model_registry["vit_t"]().state_dict(), checkpoint)
    cases = json.dumps(CASES)
    ours_dir, ref_dir = os.path.join(workdir, "ours"), os.path.join(workdir, "ref")
    os.makedirs(ours_dir, exist_ok=True)
    os.makedirs(ref_dir, exist_ok=True)
    ours = run(sys.executable, "write", checkpoint, ours_dir, cases)
    ref = run(reference, "write", checkpoint, ref_dir, cases)
    ref_reads_ours = run(reference, "read", checkpoint, ours_dir, cases, os.path.join(ours_dir, "write"))
    ours_reads_ref = run(sys.executable, "read", checkpoint, ref_dir, cases, os.path.join(ref_dir, "write"))
    ok = True
    for name in CASES:
        rel = abs(ours[name] - ref[name]) / ref[name]
        same = rel < 1e-5 and ref_reads_ours[name] == ours[name] and ours_reads_ref[name] == ref[name]
        ok &= same
        print(f"{name:6s} written here vs micro_sam: rel. diff of |features| sum {rel:.1e}; "
              f"micro_sam read ours without recomputing: {ref_reads_ours[name] == ours[name]}; "
              f"we read micro_sam's without recomputing: {ours_reads_ref[name] == ref[name]}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
