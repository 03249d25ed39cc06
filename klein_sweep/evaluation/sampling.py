"""Fixed prompts x fixed seeds -> images, with the model's sampling recipe (base Klein: ~50
steps, real CFG ~4; distilled: 4 steps, no CFG). The text encoder is gone by the time we sample:
prompts come as cached embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from klein_sweep.evaluation.base_samples import BaseSampleCache


@dataclass(frozen=True)
class SampleRecipe:
    steps: int
    guidance_scale: float
    resolution: int
    batch_size: int = 16


@torch.no_grad()
def generate(
    pipe,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    seeds: list[int],
    recipe: SampleRecipe,
    lora_scale: float | None = None,
    progress: bool = False,
    output: str = "pt",
    cache: BaseSampleCache | None = None,
) -> torch.Tensor:
    """Images (N, 3, R, R) in [0, 1] on CPU, image i from prompt_embeds[i] (L, D) and seeds[i].
    Each image has its own generator, so a sample does not depend on its batch neighbours.
    `output="latent"`: the VAE latents (N, C, R/f, R/f) instead, not decoded. `cache`: the base
    model's samples kept on disk (only for a transformer without a LoRA: the key cannot see one)."""
    device = pipe.transformer.device
    key = cache.key(pipe, prompt_embeds, negative_embeds, seeds, recipe) if cache is not None else None
    stored = cache.get(key) if key is not None else None
    pipe.set_progress_bar_config(disable=not progress)
    attention_kwargs = {"scale": lora_scale} if lora_scale is not None else None
    out, denoised = [], []
    for start in range(0, len(seeds), recipe.batch_size):
        if stored is not None:
            latents = stored[start : start + recipe.batch_size].to(device)
        else:
            latents = _denoise(pipe, prompt_embeds[start : start + recipe.batch_size], negative_embeds,
                               seeds[start : start + recipe.batch_size], recipe, attention_kwargs)
            if key is not None:  # kept for the cache only: no copies on the evaluation's path
                denoised.append(latents.cpu())
        out.append((latents if output == "latent" else decode(pipe, latents)).float().cpu())
    if key is not None and stored is None:
        cache.put(key, torch.cat(denoised))
    return torch.cat(out) if output == "latent" else torch.cat(out).clamp(0, 1)


def _denoise(pipe, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, seeds: list[int], recipe: SampleRecipe,
             attention_kwargs: dict | None) -> torch.Tensor:
    """One batch through the pipeline: latents (n, C, R/f, R/f) in the transformer's dtype."""
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    embeds = prompt_embeds.to(device=device, dtype=dtype)
    n = embeds.shape[0]
    neg = negative_embeds.to(device=device, dtype=dtype).unsqueeze(0).expand(n, -1, -1)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    # Initial noise drawn on CPU from per-image generators: identical on every device.
    return pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=neg,
        height=recipe.resolution,
        width=recipe.resolution,
        num_inference_steps=recipe.steps,
        guidance_scale=recipe.guidance_scale,
        latents=_initial_latents(pipe, generators, recipe.resolution).to(device=device, dtype=dtype),
        attention_kwargs=attention_kwargs,
        output_type="latent",
    ).images


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (N, C, h, w) -> images (N, 3, H, W) in [0, 1], decoded in the VAE's own dtype.
    During training accelerate's mixed-precision wrapper returns the transformer's prediction in
    float32, so the latents arrive in float32 while a GPU's VAE is bf16: the pipeline's own decode
    then fails ("Input type (float) and bias type (c10::BFloat16) should be the same")."""
    images = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type="pt")


def generate_latents(pipe, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, seeds: list[int],
                     recipe: SampleRecipe, cache: BaseSampleCache | None = None) -> torch.Tensor:
    """The samples of `generate` as training latents (N, 4C, R/2f, R/2f): what the model's
    own images look like to its flow-matching loss, without a VAE round trip."""
    from klein_sweep.data.encoding import normalise_latents

    return normalise_latents(pipe, generate(pipe, prompt_embeds, negative_embeds, seeds, recipe, output="latent", cache=cache))


def _initial_latents(pipe, generators, resolution: int) -> torch.Tensor:
    """(N, C*4, h, w) noise in the patchified latent layout the pipeline expects."""
    channels = pipe.transformer.config.in_channels
    side = 2 * (resolution // (pipe.vae_scale_factor * 2)) // 2
    return torch.stack([torch.randn((channels, side, side), generator=g) for g in generators])


def labelled_grid(images: torch.Tensor, prompts: list[str], seeds: list, min_tile: int = 128) -> "PIL.Image.Image":  # noqa: F821
    """(len(prompts) * len(seeds), 3, H, W) in [0, 1], prompt-major -> one PIL image: a row per
    prompt (labelled on the left), a column per seed (labelled on top). Tiles are enlarged by an
    integer factor with nearest neighbour to at least `min_tile` px, so a 32-px sample stays
    crisp and readable in a browser."""
    from PIL import Image, ImageDraw, ImageFont

    n, _, h, w = images.shape
    if n != len(prompts) * len(seeds):
        raise ValueError(f"{n} images for {len(prompts)} prompts x {len(seeds)} seeds")
    factor = max(1, -(-min_tile // max(h, w)))
    tile_h, tile_w, pad = h * factor, w * factor, 4
    font = ImageFont.load_default(size=max(12, min(tile_h // 8, 28)))
    labels = [p if len(p) <= 48 else p[:45] + "..." for p in prompts]
    label_w = int(max(font.getlength(t) for t in labels)) + 2 * pad
    head_h = font.size + 2 * pad
    canvas = Image.new("RGB", (label_w + len(seeds) * (tile_w + pad) + pad, head_h + len(prompts) * (tile_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    for c, seed in enumerate(seeds):
        draw.text((label_w + c * (tile_w + pad) + pad, pad), f"seed {seed}", fill="black", font=font)
    for r, label in enumerate(labels):
        y = head_h + r * (tile_h + pad) + pad
        draw.text((pad, y + tile_h // 2 - font.size // 2), label, fill="black", font=font)
        for c in range(len(seeds)):
            tile = Image.fromarray(array[r * len(seeds) + c]).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (tile_w + pad) + pad, y))
    return canvas


def image_grid(images: torch.Tensor, ncol: int) -> "PIL.Image.Image":  # noqa: F821
    """(N, 3, H, W) in [0, 1] -> one PIL image, `ncol` images a row."""
    from PIL import Image

    n, _, h, w = images.shape
    nrow = -(-n // ncol)
    grid = torch.ones(3, nrow * (h + 2), ncol * (w + 2))
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = images[i]
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)
