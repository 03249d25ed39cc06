"""The cost preview of every shipped sweep on FLUX.2 [klein] base 9B and 4B at 1024 px: the
model's own evaluation recipe (eval.recipe=full: 50 steps, CFG 4, 1024 px, every seed at every
checkpoint) against the shipped default for real models (eval.recipe=auto -> economy). FLOPs
are counted on the real architectures on the meta device: no GPU, no weights, runs anywhere.

    python benchmarks/bench_sweep_cost.py
    python benchmarks/bench_sweep_cost.py --gpu "RTX 4090" --mfu 0.30 --sample-mfu 0.40 --sweeps lr_vs_steps

Hours at sweep.cost_mfu / sweep.cost_sample_mfu (training / sampling) unless given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SWEEPS = ["lr_vs_steps", "reproduce_2500_2e-4", "rank_vs_lr", "grad_accum_repeats", "search"]


def plan_for(sweep: str, size: str, images: Path, output: Path, extra: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from klein_sweep.config import CONF_DIR, build_settings, register_resolvers
    from klein_sweep.sweep.plan import plan_sweep

    register_resolvers()
    overrides = [f"+sweep={sweep}", f"model=flux2_klein_base_{size}", "data=folder", f"data.path={images}",
                 "data.resolution=1024", "sweep.dry_run=true", f"sweep.output_dir={output}", "tracking=none", *extra]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    return plan_sweep(build_settings(cfg), cfg)


def main(argv=None) -> int:
    from PIL import Image

    from klein_sweep.cost.preview import estimate_sweep_cost

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweeps", nargs="+", default=SWEEPS)
    parser.add_argument("--sizes", nargs="+", default=["9b", "4b"])
    parser.add_argument("--gpu", default="H100")
    parser.add_argument("--mfu", type=float, default=None, help="training's MFU (default: sweep.cost_mfu)")
    parser.add_argument("--sample-mfu", type=float, default=None, help="sampling's MFU (default: sweep.cost_sample_mfu)")
    args = parser.parse_args(argv)
    chosen = [f"sweep.cost_gpu='{args.gpu}'"] + [f"sweep.{k}={v}" for k, v in (("cost_mfu", args.mfu), ("cost_sample_mfu", args.sample_mfu)) if v]
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "imgs"
        images.mkdir()
        for i in range(4):  # the preview checks the data folder like a real run: 1024-px images
            Image.new("RGB", (1024, 1024), (40 * i, 90, 160)).save(images / f"{i}.png")
            (images / f"{i}.txt").write_text("photo of [trigger]")
        header = None
        for sweep in args.sweeps:
            for size in args.sizes:
                for label, extra in (("model's own (full)", ["eval.recipe=full"]), ("shipped (economy)", [])):
                    cost = estimate_sweep_cost(plan_for(sweep, size, images, Path(tmp) / "out", [*extra, *chosen]))
                    if header is None:
                        header = (f"| sweep | model | recipe | trainings | optimizer steps | checkpoints | train PFLOP | eval PFLOP "
                                  f"| eval share | {cost.gpu} h (train {cost.mfu:.0%}, sample {cost.sample_mfu:.0%} MFU) |")
                        print(header + "\n" + "|---" * 10 + "|")
                    print(f"| {sweep} | {size} | {label} | {cost.trainings} | {cost.optimizer_steps:,} | {cost.checkpoints_evaluated} "
                          f"| {cost.train_pflop:,.0f} | {cost.eval_pflop:,.0f} | {cost.eval_share:.0%} | {cost.gpu_hours:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
