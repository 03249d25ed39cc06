"""The evaluation sampler decodes its latents itself, in the VAE's dtype."""

from __future__ import annotations

import torch

from klein_sweep.evaluation.sampling import SampleRecipe, generate
from klein_sweep.models.tiny import TINY_MAX_SEQUENCE_LENGTH, build_tiny_pipeline

RECIPE = SampleRecipe(steps=2, guidance_scale=4.0, resolution=32, batch_size=4)


def prompts(pipe, n=2):
    width = pipe.transformer.config.joint_attention_dim
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, TINY_MAX_SEQUENCE_LENGTH, width, generator=g), torch.zeros(TINY_MAX_SEQUENCE_LENGTH, width)


def test_the_images_are_the_pipelines_own_decode():
    pipe = build_tiny_pipeline(seed=0)
    embeds, negative = prompts(pipe)
    ours = generate(pipe, embeds, negative, [0, 1], RECIPE)
    latents = generate(pipe, embeds, negative, [0, 1], RECIPE, output="latent")
    theirs = pipe.image_processor.postprocess(pipe.vae.decode(latents, return_dict=False)[0], output_type="pt")
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs.clamp(0, 1))


def test_float32_predictions_decode_through_a_bf16_vae():
    """During training on a GPU accelerate's mixed-precision wrapper hands back float32 predictions
    while the VAE is bf16: the pipeline's own decode refused them (found on the 9B at 1024 px)."""
    pipe = build_tiny_pipeline(seed=0)
    pipe.vae.to(torch.bfloat16)
    embeds, negative = prompts(pipe)
    images = generate(pipe, embeds, negative, [0, 1], RECIPE)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32 and torch.isfinite(images).all()
