"""Rebuild a sweep's report from its study storage:

    python -m klein_sweep.report lr_vs_steps            # reads sweeps/lr_vs_steps/study.db
    python -m klein_sweep.report path/to/folder --storage postgresql://...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from klein_sweep.report.writer import write_report


def main(argv: list[str] | None = None) -> int:
    from klein_sweep.errors import KleinSweepError

    parser = argparse.ArgumentParser(prog="python -m klein_sweep.report", description="Rebuild a sweep's report from its study storage.")
    parser.add_argument("sweep", help="sweep name (reads sweeps/NAME/) or a folder holding study.db")
    parser.add_argument("--storage", help="Optuna storage URL, if not the folder's study.db")
    parser.add_argument("--study", help="study name, if the storage holds several")
    args = parser.parse_args(argv)
    folder = Path(args.sweep) if Path(args.sweep).is_dir() else Path("sweeps") / args.sweep
    try:
        out = write_report(folder, storage=args.storage, study_name=args.study)
    except KleinSweepError as exc:
        print(f"klein_sweep.report: error: {exc}", file=sys.stderr)
        return 2
    print(f"report written to {out / 'report.md'} (with {', '.join(p.name for p in sorted(out.glob('*.png')))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
