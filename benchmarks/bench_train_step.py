"""Training speed and memory of a LoRA on the real FLUX.2 [klein] transformer architecture.

Builds the 9B or 4B transformer from its published config with random weights (speed and memory
do not depend on the values), injects the LoRA with klein_sweep's own code and runs klein_sweep's
own training loop (`train_lora`: accelerate, bf16 autocast, AdamW, clipping) on synthetic cached
latents of the given resolution. Prints s/step, peak GPU memory and model FLOP utilisation.

    python benchmarks/bench_train_step.py --model 9b                  # 512/768/1024 px on a GPU
    python benchmarks/bench_train_step.py --model 9b --no-gradient-checkpointing --resolutions 1024
    python benchmarks/bench_train_step.py --model 9b --quantize int8  # int8 base weights (torchao)
    python benchmarks/bench_train_step.py --model tiny --steps 3      # CPU smoke run (CI keeps it alive)
    python benchmarks/bench_train_step.py --model 9b --flops-only     # no GPU: FLOPs and the time floor only

Model FLOPs are counted once per resolution by torch's FlopCounterMode on one forward+backward
step without gradient checkpointing (the recomputation is not useful work), then divided by the
measured step time and the device's peak dense bf16 rate (--peak-tflops; H100 SXM 989).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from klein_sweep.cost.gpus import PEAK_TFLOPS  # noqa: E402 - after the sys.path line: runs from a checkout

TEXT_TOKENS = 512  # Klein pads every prompt to max_sequence_length = 512 tokens


def build_transformer(model: str, device: str):
    """(transformer, text tokens) in bf16 on `device` (fp32 on CPU), random weights."""
    from diffusers import Flux2Transformer2DModel

    from klein_sweep.models.registry import klein_transformer_config
    from klein_sweep.models.tiny import build_tiny_pipeline

    if model == "tiny":
        transformer = build_tiny_pipeline(seed=0).transformer.to(device)
    elif device == "meta":  # shapes only: FLOPs without memory or a GPU
        with torch.device("meta"):
            transformer = Flux2Transformer2DModel.from_config(klein_transformer_config(model))
    else:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build straight in bf16 on the GPU: no fp32 copy of 9B weights
        try:
            with torch.device(device):
                transformer = Flux2Transformer2DModel.from_config(klein_transformer_config(model))
        finally:
            torch.set_default_dtype(previous)
    transformer.requires_grad_(False)
    if model == "tiny":
        from klein_sweep.models.tiny import TINY_MAX_SEQUENCE_LENGTH

        return transformer, TINY_MAX_SEQUENCE_LENGTH
    return transformer, TEXT_TOKENS


def synthetic_data(transformer, resolution: int, text_tokens: int, n: int = 4):
    """Cached-latent data as encode_data makes it: latents (N, 128, res/16, res/16) for Klein
    (VAE /8, then 2x2 patches), prompt embeds (N, text tokens, text width)."""
    from klein_sweep.data.encoding import EncodedData

    g = torch.Generator().manual_seed(0)
    side, channels, width = resolution // 16, transformer.config.in_channels, transformer.config.joint_attention_dim
    return EncodedData(
        latents=torch.randn(n, channels, side, side, generator=g),
        prompt_embeds=torch.randn(n, text_tokens, width, generator=g),
        empty_prompt_embeds=torch.zeros(text_tokens, width),
    )


def train_config(args):
    from klein_sweep.config import TrainConfig

    return TrainConfig(lr=1e-4, steps=args.steps, rank=args.rank, batch_size=args.batch_size, checkpoint_every=0,
                       gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer, compile=args.compile)


def count_step_flops(transformer, data, cfg, device) -> float:
    """FLOPs of one forward + backward (model FLOPs: no checkpoint recomputation)."""
    from torch.utils.flop_counter import FlopCounterMode

    from klein_sweep.training.loop import BatchSampler, flow_matching_loss

    batch = BatchSampler(data, cfg, device).next()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    counter = FlopCounterMode(display=False)
    checkpointing = getattr(transformer, "is_gradient_checkpointing", False)  # on after the first resolution's training
    if checkpointing:
        transformer.disable_gradient_checkpointing()
    with counter, autocast:
        flow_matching_loss(transformer, batch, device).backward()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure(transformer, params, data, cfg, device, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per optimizer step, peak GPU GiB) over `steps` after `warmup` steps."""
    import dataclasses

    from klein_sweep.training.loop import train_lora

    def run(n):
        train_lora(transformer, params, data, dataclasses.replace(cfg, steps=n), steps=n, device=device, progress=False)

    run(warmup)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run(steps)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return seconds, peak


def peak_tflops(args, device: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def flops_only(args, resolutions) -> int:
    """The real architecture on the meta device: FLOPs per step, and the time they take at 100%
    and 50% of the peak. A floor to compare measured s/step with, not a measurement."""
    from klein_sweep.lora.adapters import inject_lora

    peak = args.peak_tflops or 989.0
    transformer, text_tokens = build_transformer(args.model, "meta")
    inject_lora(transformer, rank=args.rank, alpha=args.rank, preset="attn")
    n_params = sum(p.numel() for p in transformer.parameters())
    print(f"model {args.model}: {n_params / 1e9:.2f} B params; FLOPs counted on the meta device (nothing measured); "
          f"floor at {peak:.0f} TFLOP/s peak")
    print("| resolution | image tokens | TFLOP/step (fwd+bwd) | s/step at 100% | s/step at 50% MFU |")
    print("|---|---|---|---|---|")
    cfg = train_config(args)
    for res in resolutions:
        flops = count_step_flops(transformer, synthetic_data(transformer, res, text_tokens), cfg, "meta")
        print(f"| {res} | {(res // 16) ** 2} | {flops / 1e12:.1f} | {flops / (peak * 1e12):.3f} | {flops / (peak * 0.5e12):.3f} |")
    return 0


def main(argv=None) -> int:
    from klein_sweep.lora.adapters import inject_lora

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["9b", "4b", "tiny"], default="9b")
    p.add_argument("--resolutions", type=int, nargs="+", default=None, help="default: 512 768 1024 (tiny: 64 128)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quantize", choices=["none", "int8", "fp8"], default="none", help="frozen base weights through torchao")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    p.add_argument("--compile", action="store_true", help="train.compile: torch.compile the repeated blocks "
                   "(the warm-up steps pay the compile)")
    p.add_argument("--profile", action="store_true", help="after the table, 2 steps at the last resolution under "
                   "torch.profiler: the 20 kernels that take the most GPU time")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs on the meta device (no GPU, no weights) and "
                   "print the step-time floor at --peak-tflops (default 989, an H100)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    resolutions = args.resolutions or ([64, 128] if args.model == "tiny" else [512, 768, 1024])
    if args.flops_only or (device == "cpu" and args.model != "tiny"):
        return flops_only(args, resolutions)

    start = time.perf_counter()
    transformer, text_tokens = build_transformer(args.model, device)
    n_params = sum(p.numel() for p in transformer.parameters())
    if args.quantize != "none":
        from klein_sweep.models.loading import quantize_weights

        quantize_weights(transformer, args.quantize, device)
        if device == "cuda":
            torch.cuda.empty_cache()
    lora = inject_lora(transformer, rank=args.rank, alpha=args.rank, preset="attn")
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else float("nan")
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"model {args.model}: {n_params / 1e9:.2f} B params ({weights_gib:.1f} GiB on device), LoRA rank {args.rank} "
          f"({sum(p.numel() for p in lora) / 1e6:.1f} M params), built in {time.perf_counter() - start:.0f} s on {where}")
    print(f"batch {args.batch_size}, {text_tokens} text tokens, optimizer {args.optimizer}, base weights {args.quantize}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, blocks {'compiled' if args.compile else 'eager'}, "
          f"{args.steps} timed steps after {args.warmup}")
    peak = peak_tflops(args, device)
    print("| resolution | image tokens | s/step | peak GiB | GFLOP/step | MFU |")
    print("|---|---|---|---|---|---|")
    cfg = train_config(args)
    for res in resolutions:
        data = synthetic_data(transformer, res, text_tokens)
        flops = count_step_flops(transformer, data, cfg, device)
        seconds, peak_gib = measure(transformer, lora, data, cfg, device, args.steps, args.warmup)
        mfu = f"{flops / seconds / (peak * 1e12):.0%}" if peak else "n/a"
        print(f"| {res} | {(res // 16) ** 2} | {seconds:.3f} | {peak_gib:.1f} | {flops / 1e9:,.4g} | {mfu} |", flush=True)
    if args.profile:
        profile_steps(transformer, lora, data, cfg, device)
    return 0


def profile_steps(transformer, params, data, cfg, device: str, steps: int = 2) -> None:
    """Where a step's time goes: torch.profiler over `steps` optimizer steps, the top 20 kernels."""
    import dataclasses

    from torch.profiler import ProfilerActivity, profile

    from klein_sweep.training.loop import train_lora

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        train_lora(transformer, params, data, dataclasses.replace(cfg, steps=steps), steps=steps, device=device, progress=False)
    sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"profile of {steps} steps, sorted by {sort}:")
    print(prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=70))


if __name__ == "__main__":
    sys.exit(main())
