"""Deterministic validation losses: forward passes only, fixed noise and a fixed grid of noise
levels, identical in every trial of a sweep, so two checkpoints (of one trial or of two) differ
only by their LoRA.

  val/fit_loss    flow-matching loss on the first `eval.validation_images` training images:
                  how well the LoRA fits its subject (falls as it learns)
  val/prior_loss  the LoRA model's loss on the base model's own samples of the prior prompts,
                  minus the base model's loss on the same inputs: forgetting, without sampling
                  (0 before training; rises as the LoRA pulls the prior away)

Each loss is the mean over images x sigmas, one noise draw per (image, sigma) from
`eval.validation_seed`. Cost per checkpoint: (images + prior samples) x sigmas forwards, no
sampling loop, no backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from klein_sweep.config import Settings
from klein_sweep.record import ValidationPoint
from klein_sweep.training.loop import Batch, flow_matching_loss  # the loss the trials train on

@dataclass
class FixedBatch:
    """Inputs of one validation loss, expanded over the sigma grid: item i*S + j is image i at
    sigma j. Shapes: latents and noise (N*S, C, h, w), prompt_embeds (N*S, L, D), sigmas (N*S,)."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor

    @classmethod
    def build(cls, latents: torch.Tensor, embeds: torch.Tensor, sigmas: list[float], generator: torch.Generator) -> "FixedBatch":
        n, s = latents.shape[0], len(sigmas)
        grid = torch.tensor(sigmas, dtype=torch.float32)
        return cls(
            latents=latents.float().repeat_interleave(s, dim=0),
            prompt_embeds=embeds.float().repeat_interleave(s, dim=0),
            noise=torch.randn((n * s, *latents.shape[1:]), generator=generator),
            sigmas=grid.repeat(n),
        )

    def __len__(self) -> int:
        return self.latents.shape[0]


class ValidationLosses:
    """Built once per worker, before any LoRA exists: draws the base model's prior samples (as
    latents) and measures the base model's loss on them, the zero of val/prior_loss."""

    def __init__(self, settings: Settings, pipe, encoded):
        from klein_sweep.config.recipes import validation_images
        from klein_sweep.evaluation.base_samples import BaseSampleCache
        from klein_sweep.evaluation.evaluator import eval_prompts, sample_recipe
        from klein_sweep.evaluation.sampling import generate_latents

        e = settings.eval
        self.batch_size = e.batch_size
        gen = torch.Generator().manual_seed(e.validation_seed)
        k = validation_images(e)
        self.fit = FixedBatch.build(encoded.latents[:k], encoded.prompt_embeds[:k], e.validation_sigmas, gen)
        _, prior = eval_prompts(settings)
        # Seed-major: every prompt once before any prompt twice, then the first k.
        pairs = [(p, int(s)) for s in e.seeds for p in prior][:k]
        embeds = torch.stack([encoded.extra_prompt_embeds[p] for p, _ in pairs])
        prior_latents = generate_latents(pipe, embeds, encoded.empty_prompt_embeds, [s for _, s in pairs], sample_recipe(settings),
                                         cache=BaseSampleCache.for_settings(settings))
        self.prior = FixedBatch.build(prior_latents, embeds, e.validation_sigmas, gen)
        self.base_prior_loss = self._loss(pipe.transformer, self.prior)

    def measure(self, transformer: torch.nn.Module) -> dict[str, float]:
        """{fit_loss, prior_loss} for the transformer as it is now (with its LoRA)."""
        return {"fit_loss": self._loss(transformer, self.fit), "prior_loss": self._loss(transformer, self.prior) - self.base_prior_loss}

    @torch.no_grad()
    def _loss(self, transformer: torch.nn.Module, batch: FixedBatch) -> float:
        was_training = transformer.training
        transformer.eval()
        device, dtype = transformer.device, transformer.dtype
        total = 0.0
        try:
            for start in range(0, len(batch), self.batch_size):
                part = slice(start, start + self.batch_size)
                chunk = Batch(*(t[part].to(device=device, dtype=dtype if t.is_floating_point() else None)
                                for t in (batch.latents, batch.prompt_embeds, batch.noise, batch.sigmas)))
                total += flow_matching_loss(transformer, chunk, device).item() * chunk.latents.shape[0]
        finally:
            transformer.train(was_training)
        return total / len(batch)


def prior_moved(points: list[ValidationPoint], prior_loss: float, limit: float | None) -> bool:
    """Screening by the cheap signal: has val/prior_loss risen by `limit` since the last sampled
    evaluation among `points` (since the base model, 0, before the first)? Then the prior is
    moving, and this checkpoint gets a sampled evaluation too."""
    if limit is None or not math.isfinite(prior_loss):
        return False
    last = next((v.prior_loss for v in reversed(points) if v.sampled), 0.0)
    return prior_loss - last >= limit
