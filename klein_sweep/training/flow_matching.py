"""Rectified-flow training math, as FLUX.2 is trained. Pure torch, no model knowledge.

    x_t    = (1 - sigma) * x0 + sigma * eps        sigma in (0, 1), sigma=1 is pure noise
    target = eps - x0                              the velocity the transformer predicts
    loss   = mean((pred - target)^2)
"""

from __future__ import annotations

import torch


def sample_sigmas(
    n: int,
    scheme: str = "logit_normal",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Noise levels for a batch: (n,) floats in (0, 1).

    `uniform` draws t ~ U(0, 1); `logit_normal` draws t = sigmoid(N(mean, std)), which puts most
    samples at mid noise (SD3/FLUX practice). A shift s > 1 then moves mass to noisier levels:
    sigma = s*t / (1 + (s-1)*t), the same map the sampler uses at inference.
    """
    if scheme == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif scheme == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"unknown timestep sampling '{scheme}'; valid: uniform, logit_normal")
    sigma = shift_sigmas(t, shift)
    # Keep away from exactly 0 and 1, where the target or the input carries no signal.
    return sigma.clamp(1e-4, 1.0 - 1e-4)


def empirical_shift(image_tokens: int, steps: int) -> float:
    """The shift FLUX.2's pipeline samples with: exp(mu) of diffusers' `compute_empirical_mu`
    (Black Forest Labs' fit over image tokens and denoising steps), the same map as
    `shift_sigmas` with s = exp(mu). E.g. 1024 px (4096 tokens) at 50 steps: mu 2.02, shift 7.6;
    the mini world's 32 px (64 tokens) at 12 steps: mu 1.89, shift 6.6."""
    import math

    a1, b1 = 8.73809524e-05, 1.89833333  # mu at 10 steps, linear in tokens
    a2, b2 = 0.00016927, 0.45666666  # mu at 200 steps (and beyond 4300 tokens at any step count)
    if image_tokens > 4300:
        return math.exp(a2 * image_tokens + b2)
    mu_200, mu_10 = a2 * image_tokens + b2, a1 * image_tokens + b1
    slope = (mu_200 - mu_10) / 190.0
    return math.exp(mu_200 + slope * (steps - 200.0))


def shift_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    """s*t / (1 + (s-1)*t): identity at s=1, monotone, fixes 0 and 1."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps, sigma (B,) broadcast over the remaining dims of x0."""
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d sigma = eps - x0."""
    return noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 (bf16 squares lose the small residuals late in training)."""
    return torch.mean((pred.float() - target.float()) ** 2)
