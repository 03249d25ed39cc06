"""Training steps/s on the tiny model with and without the encoding cache.

    python benchmarks/bench_encoding_cache.py [--steps 200] [--batch-size 4] [--resolution 32]

with cache:    latents and prompt embeddings are read from memory (encoded once, up front)
without cache: every micro-batch loads its images and runs the VAE encoder and the text
               encoder again, as a trainer without caching does

Also times the encode stage of a run: a cold cache (encode everything, write to disk) against a
warm one (read everything back). Ratios from one run on one machine are the figures to quote.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from klein_sweep.config import ASSETS_DIR, DataConfig, TrainConfig
from klein_sweep.data.folder import load_examples, load_image
from klein_sweep.data.encoding import EncodingCache, EncodingKey, encode_data, text_encode, vae_encode
from klein_sweep.lora.adapters import inject_lora
from klein_sweep.models.tiny import TINY_MAX_SEQUENCE_LENGTH, TINY_TEXT_LAYERS, build_tiny_pipeline
from klein_sweep.training.loop import Batch, flow_matching_loss, train_lora
from klein_sweep.training import flow_matching as fm


def fresh_pipe():
    pipe = build_tiny_pipeline(0)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    return pipe


def steps_per_second_cached(examples, key, cfg, steps):
    pipe = fresh_pipe()
    data = encode_data(pipe, examples, key, EncodingCache(None))
    params = inject_lora(pipe.transformer, rank=cfg.rank, alpha=cfg.alpha, preset=cfg.targets)
    start = time.perf_counter()
    train_lora(pipe.transformer, params, data, cfg, steps=steps, device="cpu", progress=False)
    return steps / (time.perf_counter() - start)


def steps_per_second_uncached(examples, key, cfg, steps, resolution):
    pipe = fresh_pipe()
    params = inject_lora(pipe.transformer, rank=cfg.rank, alpha=cfg.alpha, preset=cfg.targets)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(examples), (cfg.batch_size,), generator=gen).tolist()
        pixels = torch.stack([load_image(examples[i].image_path, resolution) for i in idx])
        latents = vae_encode(pipe, pixels)
        embeds = text_encode(pipe, [examples[i].caption for i in idx], key)
        batch = Batch(latents, embeds, torch.randn(latents.shape, generator=gen), fm.sample_sigmas(len(idx), generator=gen))
        loss = flow_matching_loss(pipe.transformer, batch, "cpu")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


def encode_stage_seconds(examples, key):
    with tempfile.TemporaryDirectory() as tmp:
        pipe = fresh_pipe()
        start = time.perf_counter()
        encode_data(pipe, examples, key, EncodingCache(tmp))
        cold = time.perf_counter() - start
        start = time.perf_counter()
        encode_data(pipe, examples, key, EncodingCache(tmp))
        warm = time.perf_counter() - start
    return cold, warm


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    examples = load_examples(DataConfig(path=str(ASSETS_DIR / "tiny_character"), resolution=args.resolution))
    key = EncodingKey("tiny-bench", args.resolution, tuple(TINY_TEXT_LAYERS), TINY_MAX_SEQUENCE_LENGTH)
    cfg = TrainConfig(lr=1e-4, steps=args.steps, rank=16, batch_size=args.batch_size)
    print(f"tiny model, {len(examples)} images at {args.resolution} px, batch {args.batch_size}, "
          f"{args.steps} steps, {torch.get_num_threads()} threads")
    steps_per_second_cached(examples, key, cfg, 10)  # warm-up: imports, allocator
    cached = steps_per_second_cached(examples, key, cfg, args.steps)
    uncached = steps_per_second_uncached(examples, key, cfg, args.steps, args.resolution)
    cold, warm = encode_stage_seconds(examples, key)
    print(f"train steps/s  with cache:    {cached:8.1f}")
    print(f"train steps/s  without cache: {uncached:8.1f}")
    print(f"speed-up from caching:        {cached / uncached:8.2f}x")
    print(f"encode stage, cold cache:     {cold * 1000:8.1f} ms")
    print(f"encode stage, warm cache:     {warm * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
