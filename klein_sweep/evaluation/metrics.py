"""Image-quality and identity metrics over tensors. KID is the primary distribution metric at
LoRA scale (unbiased at small N); FID and IS are logged as indicative (FID is biased below
thousands of samples).

Every metric takes images (N, 3, H, W) in [0, 1] and a `FeatureNetwork`: swapping the network
(a random conv net for the tiny model, the mini world's own net, Inception, DINOv2...) changes
nothing else.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from klein_sweep.evaluation.feature_network import FeatureNetwork

# torchmetrics warns that it keeps features in memory: at a few hundred samples that is the point.
warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
warnings.filterwarnings("ignore", message=".*degrees of freedom is <= 0.*")


def network_output(net: FeatureNetwork, kind: str, images: torch.Tensor) -> torch.Tensor:
    """net.embed / logits / identity of `images`, run where the network is (the accelerator while
    evaluating, models/placement.py), returned on the CPU in float32."""
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return getattr(net, kind)(images.to(device)).float().cpu()


class _Precomputed(torch.nn.Module):
    """torchmetrics' `feature=` module for features computed beforehand: they pass through, so a
    set measured against several others (the training images at every checkpoint) is embedded once."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features):
        return features


def embed(net: FeatureNetwork, images: torch.Tensor) -> torch.Tensor:
    """(N, num_features) float64 features of `images` (N, 3, H, W) in [0, 1]: what KID and FID compare."""
    return network_output(net, "embed", images).double()


def kid_of(real: torch.Tensor, fake: torch.Tensor, subset_size: int | None = None, subsets: int = 50) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over random subsets) of two feature sets (embed()).
    The default subset size is half the smaller set: every subset differs, so the std says how
    noisy the mean is."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = subset_size or min(len(real), len(fake)) // 2
    size = max(2, min(size, len(real), len(fake)))
    metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    # The subset draws use torch's global RNG: the same draws at every checkpoint, on a forked
    # RNG, so training's own random stream (noise, timesteps, dropout) is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mean, std = metric.compute()
    return float(mean), float(std)


def kid(net: FeatureNetwork, real: torch.Tensor, fake: torch.Tensor, subset_size: int | None = None, subsets: int = 50) -> tuple[float, float]:
    """KID of two image sets (kid_of their features)."""
    return kid_of(embed(net, real), embed(net, fake), subset_size, subsets)


def fid_of(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance of the feature Gaussians of two feature sets. Indicative only at small N."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def fid(net: FeatureNetwork, real: torch.Tensor, fake: torch.Tensor) -> float:
    return fid_of(embed(net, real), embed(net, fake))


def inception_score(net: FeatureNetwork, images: torch.Tensor, splits: int = 1) -> float:
    """exp(E KL(p(y|x) || p(y))) over the network's class logits. Indicative only."""
    from torchmetrics.image.inception import InceptionScore

    logits = network_output(net, "logits", images)
    metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=splits)
    metric.update(logits)
    return float(metric.compute()[0])


def identity_embeddings(net: FeatureNetwork, images: torch.Tensor) -> torch.Tensor:
    """(N, D) unit-length identity embeddings; a row is NaN where the network found no identity
    (ArcFace: no face)."""
    return F.normalize(network_output(net, "identity", images), dim=1)


def mean_similarity(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine over all (generated, reference) pairs of identity_embeddings(). A NaN reference
    row is left out, a NaN generated row counts as similarity 0 (a miss, not a pass)."""
    r = reference[~torch.isnan(reference).any(dim=1)]
    if len(r) == 0:
        return float("nan")
    return float(torch.nan_to_num(generated @ r.T, nan=0.0).mean())


def identity_similarity(net: FeatureNetwork, generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity over all (generated, reference) pairs (DreamBooth's DINO/CLIP-I)."""
    return mean_similarity(identity_embeddings(net, generated), identity_embeddings(net, reference))


def mean_pairwise_similarity(net: FeatureNetwork, images: torch.Tensor) -> float:
    """Mean cosine between distinct samples' features: near 1 when diversity is gone."""
    e = F.normalize(network_output(net, "embed", images), dim=1)
    sim = e @ e.T
    n = len(images)
    return float((sim.sum() - sim.diagonal().sum()) / max(1, n * (n - 1)))


def image_sanity(images: torch.Tensor, flat_std: float, noise_level: float) -> dict[str, float]:
    """Fractions of non-finite, flat and noise-like images. Noise: the share of the signal in
    the highest frequencies (a 3x3 Laplacian relative to the pixel std) is large, as it is for
    white noise (~2.5) and small for images (~0.1-0.3)."""
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    x = torch.nan_to_num(images.float())
    gray = x.mean(dim=1, keepdim=True)
    std = gray.flatten(1).std(dim=1)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    lap = F.conv2d(gray, kernel).flatten(1).abs().mean(dim=1)
    flat = std < flat_std
    noisy = (~flat) & (lap / std.clamp_min(1e-6) / 4.0 > noise_level)
    n = len(images)
    return {
        "nan_frac": float((~finite).sum()) / n,
        "flat_frac": float(flat.sum()) / n,
        "noise_frac": float(noisy.sum()) / n,
    }
