"""Sampling speed of the real FLUX.2 [klein] architectures: seconds per image of the base recipe
(50 steps, CFG 4: two transformer forwards a step) and of the distilled recipe (4 steps, no CFG),
through klein_sweep's own evaluation sampler (`evaluation.sampling.generate`: per-image seeded
noise, cached prompt embeddings, VAE decode included). These are the figures the cost preview's
evaluation share turns into hours.

    python benchmarks/bench_sampling.py --model 9b                   # 512 and 1024 px, batch 4, on a GPU
    python benchmarks/bench_sampling.py --model 4b --batch-size 8 --resolutions 1024
    python benchmarks/bench_sampling.py --model tiny                 # CPU smoke run (CI keeps it alive)

Random weights of the real transformer and VAE (speed does not depend on the values); prompts
are random embeddings of Klein's shape (512 tokens x 3 stacked text layers), so the text
encoder is never run and is built with 2 layers only. Each timed call follows one untimed
1-step call at the same batch and resolution (kernel selection, allocator warm-up).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RECIPES = {"base": (50, 4.0), "distilled": (4, 1.0)}  # (steps, guidance scale); guidance <= 1: no CFG pass


def build_pipeline(model: str, device: str):
    """(pipeline, prompt tokens) with random weights, bf16 on a GPU, fp32 on the CPU."""
    if model == "tiny":
        from klein_sweep.models.tiny import TINY_MAX_SEQUENCE_LENGTH, build_tiny_pipeline

        return build_tiny_pipeline(seed=0).to(device), TINY_MAX_SEQUENCE_LENGTH
    from klein_sweep.models.random_klein import build_random_klein

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return build_random_klein(model, text_layers=2, dtype=dtype, device=device), 512


def time_recipe(pipe, tokens: int, resolution: int, batch: int, steps: int, guidance: float) -> float:
    """Seconds per image of one `generate` call of `batch` images."""
    from klein_sweep.evaluation.sampling import SampleRecipe, generate

    width = pipe.transformer.config.joint_attention_dim
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, tokens, width, generator=g)
    negative = torch.zeros(tokens, width)
    seeds = list(range(batch))
    generate(pipe, embeds, negative, seeds, SampleRecipe(1, guidance, resolution, batch))  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = generate(pipe, embeds, negative, seeds, SampleRecipe(steps, guidance, resolution, batch))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert images.shape == (batch, 3, resolution, resolution) and torch.isfinite(images).all()
    return seconds / batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["9b", "4b", "tiny"], default="9b")
    p.add_argument("--resolutions", type=int, nargs="+", default=None, help="default: 512 1024 (tiny: 32 64)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["distilled", "base"])
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.model != "tiny":
        print(f"--model {args.model} needs a GPU; on the CPU use --model tiny")
        return 2
    resolutions = args.resolutions or ([32, 64] if args.model == "tiny" else [512, 1024])
    start = time.perf_counter()
    pipe, tokens = build_pipeline(args.model, device)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"model {args.model}: transformer {n_params / 1e9:.2f} B params, built in {time.perf_counter() - start:.0f} s "
          f"on {where}; batch {args.batch_size}, {tokens} prompt tokens, VAE decode included")
    print("| recipe | steps | CFG | resolution | s/image | s/step per image |")
    print("|---|---|---|---|---|---|")
    for recipe in args.recipes:
        steps, guidance = RECIPES[recipe]
        for res in resolutions:
            per_image = time_recipe(pipe, tokens, res, args.batch_size, steps, guidance)
            cfg = f"{guidance:g}" if guidance > 1 else "none"
            print(f"| {recipe} | {steps} | {cfg} | {res} | {per_image:.3f} | {per_image / steps:.4f} |", flush=True)
    if device == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
