"""Write the test fixtures that pin our ``vit_t`` model to MobileSAM's.

Run once with a Python environment that has ``mobile_sam`` installed (not needed by the tests):

    python scripts/make_tiny_vit_fixture.py [--out tests/data] [--full-output /tmp/out.npy]

Writes ``tiny_vit_keys.tsv`` (key, dtype, shape of every entry of the ``vit_t`` SAM state dict) and
``tiny_vit_fingerprint.npz`` (a slice, the mean and the standard deviation of the encoder output for
deterministic weights and input, see ``micro_sam/models/_testing.py``).
"""
import argparse
import importlib.util
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The slice of the (1, 256, 64, 64) output that is stored.
FINGERPRINT_SLICE = (0, slice(0, 16), slice(None, None, 8), slice(None, None, 8))


def _load_testing_module():
    # Loaded by path: in the reference environment ``micro_sam`` may be a different installation.
    path = os.path.join(ROOT, "micro_sam", "models", "_testing.py")
    spec = importlib.util.spec_from_file_location("_tiny_vit_testing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "data"))
    parser.add_argument("--full-output", default=None, help="Also save the full encoder output (.npy).")
    args = parser.parse_args()

    from mobile_sam import sam_model_registry

    testing = _load_testing_module()
    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"]()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tiny_vit_keys.tsv"), "w") as f:
        f.write("key\tdtype\tshape\n")
        for key, value in sam.state_dict().items():
            shape = ",".join(str(s) for s in value.shape)
            f.write(f"{key}\t{str(value.dtype).replace('torch.', '')}\t{shape}\n")

    encoder = testing.deterministic_fill_(sam.image_encoder)
    encoder.eval()  # MobileSAM derives its attention bias buffers here, so fill first
    image = testing.deterministic_image((1, 3, 1024, 1024))
    with torch.no_grad():
        out = encoder(image).numpy()
    if args.full_output:
        np.save(args.full_output, out)
    np.savez_compressed(
        os.path.join(args.out, "tiny_vit_fingerprint.npz"),
        slice=out[FINGERPRINT_SLICE].astype(np.float32),
        mean=np.float64(out.mean(dtype=np.float64)),
        std=np.float64(out.std(dtype=np.float64)),
        shape=np.array(out.shape),
    )
    print("output", out.shape, "mean", out.mean(), "std", out.std(), file=sys.stderr)


if __name__ == "__main__":
    main()
