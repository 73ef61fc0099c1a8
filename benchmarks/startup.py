"""Start-up: wall and CPU seconds of fresh processes, from ``python`` to the answer.

    python benchmarks/startup.py                                    # this checkout
    python benchmarks/startup.py --source /path/to/other/checkout  # e.g. an older commit, for before / after
    python benchmarks/startup.py --reference /tmp/micro-sam-reference/bin/python

Rows (each a new process, the median of ``--repeat`` runs after one warm-up run, so files are in the page cache):

- ``help``: ``micro_sam.automatic_segmentation --help``;
- ``load_vit_b``: ``get_sam_model`` of a vit_b checkpoint with random weights (saved once; also for the reference);
- ``readme_command``: the README's main command, ``micro_sam.automatic_segmentation -i <sample image>
  -o <out>.tif -m vit_t_demo --overlay`` (this package only: micro_sam has no bundled model);
- ``imports``: what the README command imports that inference does not need (torchvision, torch_em, tensorboard,
  elf, sklearn, torch._dynamo), listed, not timed.

CPU seconds are user + system time of the process and its threads. Measurements, not tests: nothing is asserted.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(command, env, cwd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # (In a folder outside the checkouts: `python -c` puts the working directory before PYTHONPATH.)
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, result.stdout


def _measure(command, env, repeat, cwd):
    _run(command, env, cwd)  # warm-up
    runs = [_run(command, env, cwd)[:2] for _ in range(repeat)]
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


# Runs the README command in this process and prints the unneeded packages it imported.
_IMPORTS_SCRIPT = """
import runpy, sys
sys.argv = ["micro_sam.automatic_segmentation", "-i", "{sample}", "-o", "{out}", "-m", "vit_t_demo", "--overwrite"]
try:
    runpy.run_module("micro_sam.automatic_segmentation", run_name="__main__")
except SystemExit:
    pass
unneeded = {{"torchvision", "torch_em", "tensorboard", "elf", "sklearn"}}
found = {{name.split(".")[0] for name in sys.modules if name.split(".")[0] in unneeded}}
print(sorted(found | ({{"torch._dynamo"}} & set(sys.modules))))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="The interpreter (default: this one).")
    parser.add_argument("--source", default=str(ROOT), help="The checkout to measure (put first on PYTHONPATH).")
    parser.add_argument("--reference", default=None, help="The python of a micro_sam 1.8 environment.")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    env = dict(os.environ, PYTHONPATH=args.source)
    tmp = Path(tempfile.mkdtemp(prefix="startup-"))
    checkpoint = tmp / "vit_b_random.pt"
    subprocess.run([args.python, "-c", "import torch; from segment_anything import sam_model_registry; "
                    f"torch.manual_seed(0); torch.save(sam_model_registry['vit_b']().state_dict(), '{checkpoint}')"],
                   env=env, check=True, cwd=tmp)
    sample = _run([args.python, "-m", "micro_sam.sample_data"], env, tmp)[2].strip()
    rows = {
        "help": [args.python, "-m", "micro_sam.automatic_segmentation", "--help"],
        "load_vit_b": [args.python, "-c", "from micro_sam.util import get_sam_model; "
                       f"get_sam_model(model_type='vit_b', checkpoint_path='{checkpoint}', device='cpu')"],
        "readme_command": [args.python, "-m", "micro_sam.automatic_segmentation", "-i", sample, "-o",
                           str(tmp / "segmentation.tif"), "-m", "vit_t_demo", "--overlay", "--overwrite"],
    }
    print(f"load: {os.getloadavg()}")
    print("| row | this package: wall s (cpu s) | micro_sam 1.8: wall s (cpu s) |")
    print("|---|---|---|")
    for name, command in rows.items():
        ours = _measure(command, env, args.repeat, tmp)
        theirs = "-"
        if args.reference is not None and name != "readme_command":
            reference = [args.reference] + command[1:]
            environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            wall, cpu = _measure(reference, environment, args.repeat, tmp)
            theirs = f"{wall:.2f} ({cpu:.2f})"
        print(f"| {name} | {ours[0]:.2f} ({ours[1]:.2f}) | {theirs} |", flush=True)
    code = _IMPORTS_SCRIPT.format(sample=sample, out=tmp / "imports.tif")
    top = _run([args.python, "-c", code], env, tmp)[2].strip().splitlines()[-1]
    print(f"imported by the README command but not needed for inference: {top}")
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
