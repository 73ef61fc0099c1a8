"""Benchmarks of micro_sam: embeddings, prompts, automatic segmentation, tiling, 3D, training, import time.

    python benchmarks/run.py                                  # all rows, this project
    python benchmarks/run.py --rows embed_vit_b,prompt_point --repeat 3
    python benchmarks/run.py --reference /tmp/micro-sam-reference/bin/python --repeat 3

Every measurement runs in a fresh subprocess (``run.py --row NAME --json``) of the chosen interpreter, so
import costs, caches and peak memory belong to that measurement alone. Random-weight models are saved once
to a temporary folder and loaded with ``get_sam_model(model_type=..., checkpoint_path=...)`` by both packages;
all inputs come from fixed seeds. Within a subprocess a warm-up call precedes the timed call. With
``--reference`` the same row alternates between the two interpreters (project first in odd rounds, the
reference first in even rounds) and the table gives the ratio of the medians, project / reference.
Rows whose modules do not exist report "n/a (module missing ...)". The rows are defined in ``_rows.py``.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MARKER = "@@BENCHMARK_RESULT@@ "


# --- child mode ------------------------------------------------------------------------------------------
def _child(row: str, workdir: str) -> int:
    sys.path.insert(0, HERE)
    import _rows

    result = _rows.run_row(row, workdir)
    print(MARKER + json.dumps(result), flush=True)
    return 0


def _make_inputs(workdir: str) -> int:
    """Random-weight checkpoints shared by both packages: vit_b, vit_t and vit_t with a UNETR decoder."""
    import torch
    from segment_anything import sam_model_registry as sa_registry

    torch.manual_seed(0)
    torch.save(sa_registry["vit_b"]().state_dict(), os.path.join(workdir, "vit_b.pt"))
    try:
        from micro_sam.models.build_sam import sam_model_registry
    except ImportError:  # the published micro_sam builds vit_t with mobile_sam
        from mobile_sam import sam_model_registry
    torch.manual_seed(0)
    vit_t = sam_model_registry["vit_t"]()
    torch.save(vit_t.state_dict(), os.path.join(workdir, "vit_t.pt"))
    try:
        from torch_em.model import UNETR
    except ImportError:
        return 0
    torch.manual_seed(0)
    # The AIS decoder as micro_sam builds it (torch_em's UNETR on the SAM encoder, no skip connections).
    unetr = UNETR(backbone="sam", encoder=vit_t.image_encoder, out_channels=3, use_sam_stats=True,
                  final_activation="Sigmoid", use_skip_connection=False, resize_input=True)
    decoder_state = {k: v for k, v in unetr.state_dict().items() if not k.startswith("encoder")}
    torch.save({"model_state": vit_t.state_dict(), "decoder_state": decoder_state},
               os.path.join(workdir, "vit_t_ais.pt"))
    return 0


# --- parent mode -----------------------------------------------------------------------------------------
def _child_env(python: str, is_project: bool) -> dict:
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != REPO]
    if is_project:
        paths.insert(0, REPO)  # measure this checkout, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _run_child(python: str, args: list, workdir: str, is_project: bool, timeout: float):
    cmd = [python, os.path.join(HERE, "run.py")] + args
    proc = subprocess.run(cmd, cwd=workdir, env=_child_env(python, is_project), capture_output=True, text=True,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"status": "error: " + " | ".join(tail), "seconds": None, "peak_mb": None}


def _machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def _load() -> str:
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average n/a"


def _median(results):
    values = [r["seconds"] for r in results if r.get("seconds") is not None]
    return statistics.median(values) if values else None


def _status(results, width=60):
    for r in results:
        status = r.get("status")
        if status != "ok":
            return status if len(status) <= width else status[:width - 3] + "..."
    return None


def _fmt(seconds):
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _peak_cell(results) -> str:
    """Largest peak resident memory of the measured calls, and (+N) the largest rise above the resident memory
    just before the call (what the call itself allocated; the rest is the interpreter, libraries and model)."""
    measured = [r for r in results if r.get("peak_mb")]
    if not measured:
        return "-"
    cell = f"{max(r['peak_mb'] for r in measured):.0f}"
    rises = [r["peak_mb"] - r["start_mb"] for r in measured if r.get("start_mb") is not None]
    return cell + (f" (+{max(rises):.0f})" if rises else "")


def _print_table(rows, results, reference: bool):
    import _rows

    header = ["row", "what", "project"] + (["micro_sam", "ratio"] if reference else []) + ["peak MB", "notes"]
    lines = []
    for name in rows:
        own = results[name]["project"]
        own_med, notes = _median(own), []
        cells = [name, _rows.ROWS_BY_NAME[name].description, _fmt(own_med) if own_med is not None else
                 (_status(own) or "-")]
        peaks = [_peak_cell(own)]
        if reference:
            ref = results[name]["reference"]
            ref_med = _median(ref)
            baseline_note = ""
            if ref_med is None and _rows.ROWS_BY_NAME[name].baseline:
                base = _rows.ROWS_BY_NAME[name].baseline
                ref_med = _median(results.get(base, {}).get("reference", []))
                baseline_note = f"micro_sam: {_status(ref)}; ratio vs its {base}"
            cells.append(_fmt(ref_med) if ref_med is not None else (_status(ref) or "-"))
            cells.append(f"{own_med / ref_med:.2f}" if own_med and ref_med else "-")
            if baseline_note:
                notes.append(baseline_note)
            if any(r.get("peak_mb") for r in ref):
                peaks.append(_peak_cell(ref))
        cells.append(" / ".join(peaks))
        n_ok = sum(r.get("seconds") is not None for r in own)
        if n_ok:
            notes.insert(0, f"n={n_ok}")
        cells.append("; ".join(notes))
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for cells in lines:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", help="comma-separated rows to run (default: all); see --list")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--repeat", type=int, default=1, help="rounds per row; the table shows medians")
    parser.add_argument("--reference", metavar="PYTHON", help="interpreter with the published micro_sam to compare")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per measurement subprocess")
    parser.add_argument("--json-out", help="also write all measurements to this JSON file")
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--make-inputs", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.row:
        return _child(args.row, args.workdir)
    if args.make_inputs:
        return _make_inputs(args.workdir)

    sys.path.insert(0, HERE)
    import _rows

    if args.list:
        for row in _rows.ROWS:
            print(f"{row.name:18s} {row.description}")
        return 0
    rows = [r.name for r in _rows.ROWS] if not args.rows else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in _rows.ROWS_BY_NAME]
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {', '.join(_rows.ROWS_BY_NAME)}")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.reference and not shutil.which(args.reference) and not os.path.isfile(args.reference):
        parser.error(f"--reference {args.reference!r} is not an executable")
    # Comparing a bfloat16 row needs the reference's float32 row.
    if args.reference:
        for name in list(rows):
            base = _rows.ROWS_BY_NAME[name].baseline
            if base and base not in rows:
                rows.insert(rows.index(name), base)

    interpreters = [("project", sys.executable, True)]
    if args.reference:
        interpreters.append(("reference", args.reference, False))

    print(f"machine: {_machine()}")
    print(f"python: {sys.executable}" + (f"; reference: {args.reference}" if args.reference else ""))
    print(f"start: {time.strftime('%Y-%m-%d %H:%M:%S')}, {_load()}", flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="micro_sam_bench_")
    results = {name: {label: [] for label, _, _ in interpreters} for name in rows}
    try:
        subprocess.run([sys.executable, os.path.join(HERE, "run.py"), "--make-inputs", "--workdir", workdir],
                       check=True, cwd=workdir, env=_child_env(sys.executable, True))
        for round_ in range(args.repeat):
            order = interpreters if round_ % 2 == 0 else interpreters[::-1]
            for name in rows:
                for label, python, is_project in order:
                    try:
                        result = _run_child(python, ["--row", name, "--json", "--workdir", workdir], workdir,
                                            is_project, args.timeout)
                    except subprocess.TimeoutExpired:
                        result = {"status": f"timeout ({args.timeout:.0f} s)", "seconds": None, "peak_mb": None}
                    result["round"] = round_
                    results[name][label].append(result)
                    print(f"  [{round_ + 1}/{args.repeat}] {name:18s} {label:9s} "
                          f"{_fmt(result.get('seconds')) if result.get('seconds') is not None else result['status']}",
                          flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"end: {time.strftime('%Y-%m-%d %H:%M:%S')}, {_load()}")
    for label, _, _ in interpreters:
        seen = {json.dumps(r.get("micro_sam")) for name in rows for r in results[name][label] if r.get("micro_sam")}
        print(f"{label}: micro_sam " + ", ".join(
            f"{json.loads(s)['version']} ({json.loads(s)['path']})" for s in sorted(seen)))
    print()
    _print_table(rows, results, bool(args.reference))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": _machine(), "reference": args.reference, "repeat": args.repeat,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
