"""Build the mini world's models: `python -m klein_sweep.mini.build [--only features|vae|transformer|distilled]`.

Seeded and reproducible on the CPU. Writes into klein_sweep/mini/weights/:
  features.safetensors   the feature network (attribute heads + identity embedding)
  pipeline/              a Flux2KleinPipeline (save_pretrained layout): VAE trained to
                         reconstruct world images, a frozen random Qwen3 text encoder with a
                         locally built tokenizer, the transformer pre-trained on world captions
  distilled_transformer/ the 4-step, no-CFG student of that transformer (mini/distill.py)
  build.json             what was built, with the quality figures measured at the end
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from klein_sweep.mini.distill import build_distilled
from klein_sweep.mini.world import ATTRIBUTES, render, world_samples

log = logging.getLogger("klein_sweep.mini.build")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def images_tensor(creatures) -> torch.Tensor:
    """(N, 3, 32, 32) float in [0, 1]."""
    arr = np.stack([np.asarray(render(c), dtype=np.uint8) for c in creatures])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def labels_tensor(creatures) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([c.labels()[k] for c in creatures]) for k in ATTRIBUTES}


# --- feature network ----------------------------------------------------------------------


def build_features(out: Path, seed: int = 0, n_train: int = 10000, epochs: int = 20) -> dict:
    from safetensors.torch import save_file

    from klein_sweep.mini.features import MiniFeatures

    torch.manual_seed(seed)
    train = [c for c, _ in world_samples(n_train, seed=seed + 1, allow_held_out=True)]
    test = [c for c, _ in world_samples(1000, seed=seed + 2, allow_held_out=True)]
    x, y = images_tensor(train), labels_tensor(train)
    xt, yt = images_tensor(test), labels_tensor(test)
    net = MiniFeatures()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    net.train()
    for step in range(steps):
        idx = torch.randint(len(x), (128,), generator=g)
        xb = _augment(x[idx], g)
        out_logits = net.head_logits(xb)
        loss = sum(F.cross_entropy(out_logits[k], y[k][idx]) for k in ATTRIBUTES)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log.info("features step %d/%d loss %.3f", step, steps, loss.item())
    net.eval()
    pred = net.predict(xt)
    accuracy = {k: float((pred[k] == yt[k]).float().mean()) for k in ATTRIBUTES}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out)
    log.info("feature network held-out accuracy: %s", accuracy)
    return {"held_out_accuracy": accuracy}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Noise and blur, so the network reads generated samples as well as renders."""
    noise = torch.randn(x.shape, generator=g) * torch.rand(len(x), 1, 1, 1, generator=g) * 0.08
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(len(x), 1, 1, 1, generator=g) * 0.6
    return (x * (1 - mix) + blurred * mix + noise).clamp(0, 1)


# --- VAE ----------------------------------------------------------------------------------------


def new_vae():
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
    )


def build_vae(seed: int = 0, steps: int = 1200, batch: int = 32, n_train: int = 12000):
    """Train the VAE to reconstruct world images, then set its batch-norm running stats from the
    patchified latents of world images (the pipeline normalises latents with them)."""
    torch.manual_seed(seed)
    vae = new_vae()
    x = images_tensor([c for c, _ in world_samples(n_train, seed=seed + 3)])
    xt = images_tensor([c for c, _ in world_samples(256, seed=seed + 4)])
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    vae.train()
    for step in range(steps):
        xb = x[torch.randint(len(x), (batch,), generator=g)] * 2 - 1
        posterior = vae.encode(xb).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        kl = posterior.kl().mean() / xb[0].numel()
        loss = F.l1_loss(recon, xb) + F.mse_loss(recon, xb) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0:
            log.info("vae step %d/%d loss %.4f", step, steps, loss.item())
    vae.eval()
    with torch.no_grad():
        recon = vae.decode(vae.encode(xt * 2 - 1).latent_dist.mode()).sample
        mse = F.mse_loss((recon.clamp(-1, 1) + 1) / 2, xt).item()
        psnr = 10 * np.log10(1.0 / mse)
        _set_latent_stats(vae, x[:4000])
    log.info("vae held-out PSNR %.1f dB", psnr)
    return vae, {"held_out_psnr_db": round(float(psnr), 2)}


@torch.no_grad()
def _set_latent_stats(vae, images: torch.Tensor) -> None:
    from diffusers import Flux2KleinPipeline

    lat = torch.cat([vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mode() for i in range(0, len(images), 256)])
    lat = Flux2KleinPipeline._patchify_latents(lat)
    vae.bn.running_mean.copy_(lat.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(lat.var(dim=(0, 2, 3)))


def build_pipeline(seed: int = 0) -> dict:
    """Text encoder + trained VAE + pre-trained transformer -> weights/pipeline/, then the
    quality check on held-out captions."""
    import shutil

    from diffusers import AutoencoderKLFlux2

    from klein_sweep.mini.features import load_mini_features
    from klein_sweep.evaluation.sampling import image_grid

    vae = AutoencoderKLFlux2.from_pretrained(WEIGHTS_DIR / "vae_stage").eval()
    text_encoder, tokenizer = new_text_encoder_and_tokenizer(seed)
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, new_transformer(seed))
    result = build_transformer(pipe, seed=seed)
    quality, images = measure_quality(pipe, load_mini_features())
    result["quality_256_held_out_captions"] = quality
    log.info("mini model quality: %s", quality)
    out = WEIGHTS_DIR / "pipeline"
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(WEIGHTS_DIR / "vae_stage", ignore_errors=True)
    image_grid(images[:64], ncol=16).resize((16 * 34 * 2, 4 * 34 * 2)).save(WEIGHTS_DIR / "samples.png")
    return result


# --- text encoder, transformer, pipeline ---------------------------------------------------------

MINI_TEXT_LAYERS = (1, 2, 3)
MINI_MAX_SEQUENCE_LENGTH = 40
MINI_SAMPLE_STEPS = 12
MINI_GUIDANCE = 4.0


def new_text_encoder_and_tokenizer(seed: int = 0):
    """A frozen random 3-layer Qwen3 (hidden 32): its stacked layers give 96-d token embeddings
    that tell the world's words apart, which is all the transformer needs from it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from klein_sweep.mini.world import vocabulary
    from klein_sweep.models.tiny import build_tokenizer

    tokenizer = build_tokenizer(vocabulary())
    torch.manual_seed(seed + 10)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
            tie_word_embeddings=True,
        )
    ).eval()
    return text_encoder, tokenizer


def new_transformer(seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed + 20)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=32 * len(MINI_TEXT_LAYERS), timestep_guidance_channels=64, mlp_ratio=3.0,
        axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False,
    )


def assemble_pipeline(vae, text_encoder, tokenizer, transformer):
    from diffusers import Flux2KleinPipeline

    from klein_sweep.models.tiny import build_klein_scheduler

    return Flux2KleinPipeline(
        scheduler=build_klein_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


@torch.no_grad()
def encode_world(pipe, samples, batch: int = 256):
    """Latents (N, 16, 8, 8) and prompt embeddings (N, 40, 96) of (creature, caption) pairs."""
    from klein_sweep.data.encoding import EncodingKey, text_encode, vae_encode

    key = EncodingKey("mini-build", 32, MINI_TEXT_LAYERS, MINI_MAX_SEQUENCE_LENGTH)
    lat, emb = [], []
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        lat.append(vae_encode(pipe, images_tensor([c for c, _ in chunk]) * 2 - 1))
        emb.append(text_encode(pipe, [cap for _, cap in chunk], key))
    return torch.cat(lat), torch.cat(emb), text_encode(pipe, [""], key)[0]


def build_transformer(pipe, seed: int = 0, steps: int = 4000, batch: int = 32, n_train: int = 20000, lr: float = 5e-4) -> dict:
    """Pre-train the transformer on world images and captions (rectified flow, logit-normal
    timesteps shifted towards noise as the sampler's schedule is, 10% caption dropout)."""
    from klein_sweep.training import flow_matching as fm
    from klein_sweep.mini.full_training import train_all_weights
    from klein_sweep.training.loop import Batch

    samples = world_samples(n_train, seed=seed + 5)
    latents, embeds, empty = encode_world(pipe, samples)
    log.info("encoded %d world images for pre-training", len(samples))

    def world_batch(g: torch.Generator) -> Batch:
        idx = torch.randint(len(latents), (batch,), generator=g)
        emb = embeds[idx].clone()
        emb[torch.rand(batch, generator=g) < 0.1] = empty
        x0 = latents[idx]
        return Batch(x0, emb, torch.randn(x0.shape, generator=g), fm.sample_sigmas(batch, "logit_normal", shift=3.0, generator=g))

    loss = train_all_weights(pipe.transformer, world_batch, steps=steps, lr=lr, weight_decay=1e-4, seed=seed + 6, what="transformer")
    return {"steps": steps, "batch": batch, "final_loss": round(loss, 4)}


@torch.no_grad()
def measure_quality(pipe, features, n: int = 256, seed: int = 7, recipe: tuple[int, float] = (MINI_SAMPLE_STEPS, MINI_GUIDANCE)
                    ) -> tuple[dict, torch.Tensor]:
    """Sample n held-out full captions with `recipe` (steps, CFG scale); the feature network
    judges shape, colour, pattern and background."""
    from klein_sweep.data.encoding import EncodingKey, text_encode
    from klein_sweep.evaluation.sampling import SampleRecipe, generate

    rng = random.Random(seed)
    from klein_sweep.mini.world import caption, sample_creature

    creatures = [sample_creature(rng) for _ in range(n)]
    key = EncodingKey("mini-build", 32, MINI_TEXT_LAYERS, MINI_MAX_SEQUENCE_LENGTH)
    embeds = text_encode(pipe, [caption(c) for c in creatures], key)
    empty = text_encode(pipe, [""], key)[0]
    images = generate(pipe, embeds, empty, list(range(n)), SampleRecipe(recipe[0], recipe[1], 32, 64))
    pred = features.predict(images)
    truth = labels_tensor(creatures)
    acc = {k: round(float((pred[k] == truth[k]).float().mean()), 3) for k in ("shape", "colour", "pattern", "background")}
    return acc, images


def distillation_prompts(pipe, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings of n world captions (and of the empty prompt) for the distillation."""
    _, embeds, empty = encode_world(pipe, world_samples(n, seed=seed + 30))
    return embeds, empty


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("features", "vae", "transformer", "distilled"), help="build one part")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    random.seed(args.seed)
    report_path = WEIGHTS_DIR / "build.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    parts = [args.only] if args.only else ["features", "vae", "transformer", "distilled"]
    for part in parts:
        start = time.perf_counter()
        if part == "features":
            report["features"] = build_features(WEIGHTS_DIR / "features.safetensors", seed=args.seed)
        elif part == "vae":
            vae, report["vae"] = build_vae(seed=args.seed)
            vae.save_pretrained(WEIGHTS_DIR / "vae_stage")
        elif part == "transformer":
            report["transformer"] = build_pipeline(seed=args.seed)
        else:
            report["distilled"] = build_distilled(WEIGHTS_DIR, distillation_prompts, measure_quality,
                                                  (MINI_SAMPLE_STEPS, MINI_GUIDANCE), seed=args.seed)
        report.setdefault("seconds", {})[part] = round(time.perf_counter() - start, 1)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2))
    log.info("build report: %s", json.dumps(report))


if __name__ == "__main__":
    main()
