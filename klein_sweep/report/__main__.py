"""Rebuild a sweep's report from its study storage, or read its boundary at your settings:

    python -m klein_sweep.report lr_vs_steps            # reads sweeps/lr_vs_steps/study.db
    python -m klein_sweep.report path/to/folder --storage postgresql://...
    python -m klein_sweep.report lr_vs_steps_images --recommend data.max_images=15 train.rank=16
        # the fitted boundary at 15 images per grid lr (from the study, or report.json alone)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from klein_sweep.report.writer import write_report


def main(argv: list[str] | None = None) -> int:
    from klein_sweep.errors import KleinSweepError
    from klein_sweep.quick_exit import skip_collection_at_exit

    skip_collection_at_exit()
    parser = argparse.ArgumentParser(prog="python -m klein_sweep.report", description="Rebuild a sweep's report from its study storage.")
    parser.add_argument("sweep", help="sweep name (reads sweeps/NAME/) or a folder holding study.db")
    parser.add_argument("--storage", help="Optuna storage URL, if not the folder's study.db")
    parser.add_argument("--study", help="study name, if the storage holds several")
    parser.add_argument("--recommend", nargs="*", metavar="KEY=VALUE",
                        help="print the fitted collapse step, its band and the safe steps and repeats per image at "
                             "these settings (data.max_images=N, train.rank=R) per lr of the grid, instead of writing the "
                             "report; settings outside the measured range are refused")
    args = parser.parse_args(argv)
    folder = Path(args.sweep) if Path(args.sweep).is_dir() else Path("sweeps") / args.sweep
    try:
        if args.recommend is not None:
            print(recommendation(folder, args))
            return 0
        out = write_report(folder, storage=args.storage, study_name=args.study)
    except KleinSweepError as exc:
        print(f"klein_sweep.report: error: {exc}", file=sys.stderr)
        return 2
    print(f"report written to {out / 'report.md'} (with {', '.join(p.name for p in sorted(out.glob('*.png')))})")
    return 0


def recommendation(folder: Path, args) -> str:
    """From the study when there is one (study.db or --storage), else from report.json."""
    from klein_sweep.report.recommend import (RecommendError, basis_from_report, basis_from_results, format_recommendation,
                                              parse_settings, recommend)

    wanted = parse_settings(args.recommend)  # a bad KEY=VALUE is refused before anything is read
    if args.storage or (folder / "study.db").exists():
        from klein_sweep.report.results import load_results
        from klein_sweep.report.writer import load_study

        basis = basis_from_results(load_results(load_study(folder, args.storage, args.study)))
    elif (folder / "report.json").exists():
        basis = basis_from_report(folder / "report.json")
    else:
        raise RecommendError(f"--recommend: no study or report in {folder} (expected {folder / 'study.db'} or {folder / 'report.json'})")
    return format_recommendation(basis, wanted, recommend(basis, wanted))


if __name__ == "__main__":
    sys.exit(main())
