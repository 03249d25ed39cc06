"""Wall time of the embedded default sweep (`python -m klein_sweep +sweep=lr_vs_steps`, the mini
world on the CPU), an old path against the default, in one run on this machine, and whether both
find the committed report's states, collapse steps and best cell.

    python benchmarks/bench_default_sweep.py                               # old: one LoRA per training (sweep.lanes=1)
    python benchmarks/bench_default_sweep.py --old sweep.workers=1 sweep.lanes=1   # old: one worker process
    python benchmarks/bench_default_sweep.py --extra sweep.params.train.lr.values=[1e-4,4e-4]   # shorter

Prints the machine (cores, AVX-512 or AVX2) beside the figures: judge by the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{os.cpu_count()} cores, {isa}"


def run(folder: Path, extra: list[str]) -> tuple[float, dict]:
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "klein_sweep", "+sweep=lr_vs_steps", "tracking=none", *extra],
                          cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return seconds, json.loads((folder / "sweeps" / "lr_vs_steps" / "report.json").read_text())


def outcome(report: dict) -> tuple:
    """(state per cell, collapse step per setting, best cell): what the report concludes."""
    states = {(c["setting"], c.get("steps")): c["state"] for c in report["cells"]}
    collapse = {json.dumps(b["setting"], sort_keys=True): b["collapse_step"] for b in report["boundary"]["trainings"]}
    best = (json.dumps(report["best"]["setting"], sort_keys=True), report["best"]["step"]) if report["best"] else None
    return states, collapse, best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", nargs="*", default=["sweep.lanes=1"], help="the old path's overrides")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for both runs")
    parser.add_argument("--keep", type=Path, help="keep both sweeps' folders here (default: a temporary folder)")
    args = parser.parse_args(argv)
    committed = json.loads((REPO / "sweeps" / "lr_vs_steps" / "report.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        where = args.keep or Path(tmp)
        old_s, old = run(where / "old", [*args.old, *args.extra])
        new_s, new = run(where / "auto", list(args.extra))
    trials = len(new["boundary"]["trainings"])
    print(f"machine: {machine()}")
    print("| path | wall s | s per trial (wall / trials) |")
    print("|---|---|---|")
    print(f"| old: {' '.join(args.old)} | {old_s:.0f} | {old_s / trials:.0f} |")
    print(f"| default | {new_s:.0f} | {new_s / trials:.0f} |")
    print(f"speed-up: {old_s / new_s:.2f}x")
    same = outcome(old) == outcome(new)
    print(f"old and default: same states, collapse steps and best cell: {same}")
    if not args.extra:
        print(f"default and the committed report: same states, collapse steps and best cell: {outcome(new) == outcome(committed)}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
