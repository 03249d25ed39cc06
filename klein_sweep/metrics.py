"""Image-quality and identity metrics over tensors. KID is the primary distribution metric at
LoRA scale (unbiased at small N); FID and IS are logged as indicative (FID is biased below
thousands of samples).

Every metric takes images (N, 3, H, W) in [0, 1] and a `FeatureNetwork`: swapping the network
(a random conv net for the tiny model, the mini world's own net, Inception, DINOv2...) changes
nothing else.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F


# torchmetrics warns that it keeps features in memory: at a few hundred samples that is the point.
warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
warnings.filterwarnings("ignore", message=".*degrees of freedom is <= 0.*")


class FeatureNetwork(torch.nn.Module):
    """What metrics need from a network: an embedding (identity, KID/FID) and class logits (IS)."""

    num_features: int

    def embed(self, images: torch.Tensor) -> torch.Tensor:  # (N, D)
        raise NotImplementedError

    def logits(self, images: torch.Tensor) -> torch.Tensor:  # (N, K)
        raise NotImplementedError

    def identity(self, images: torch.Tensor) -> torch.Tensor:  # (N, E)
        """The embedding whose cosine is identity similarity; by default the features."""
        return self.embed(images)


class RandomConvFeatures(FeatureNetwork):
    """A fixed, seeded random conv net. Random conv features are a generic image descriptor
    (colour, layout, texture statistics): enough to tell the tiny model's samples apart, with no
    weights to download. Not a semantic identity model."""

    def __init__(self, seed: int = 0, width: int = 32, num_classes: int = 16, size: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.size = size
        chans = [3, width, width * 2]
        self.convs = torch.nn.ModuleList()
        for cin, cout in zip(chans, chans[1:]):
            conv = torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (cin * 9)))
                conv.bias.zero_()
            self.convs.append(conv)
        self.num_features = chans[-1] * 2  # mean and std pooling
        self.head = torch.nn.Linear(self.num_features, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) / math.sqrt(self.num_features))
            self.head.bias.zero_()
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def embed(self, images):
        x = F.interpolate(images.float() * 2 - 1, size=(self.size, self.size), mode="bilinear", align_corners=False)
        for conv in self.convs:
            x = F.relu(conv(x))
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    @torch.no_grad()
    def logits(self, images):
        return self.head(self.embed(images)) * 4.0


def resolve_networks(eval_cfg, model_kind: str) -> tuple[str, str | None]:
    """(feature network, identity network) with `auto` decided: the network that knows the
    model's world - the mini world's own net, a random conv net for the random tiny model, for
    real images Inception (distribution metrics) and DINOv2 (identity). Identity None: the
    feature network's own identity embedding."""
    feature = eval_cfg.feature_network
    if feature == "auto":
        feature = {"pretrained": "inception", "mini": "mini"}.get(model_kind, "random_conv")
    identity = eval_cfg.identity_network
    if identity == "auto":
        identity = "dinov2" if model_kind == "pretrained" else "same"
    return feature, (None if identity == "same" else identity)


def build_feature_network(name: str, paths: dict | None = None) -> FeatureNetwork:
    """A network by name (after resolve_networks); the real ones from eval.network_paths."""
    from klein_sweep.errors import ConfigError

    if name == "random_conv":
        return RandomConvFeatures(seed=0)
    if name == "mini":
        from klein_sweep.mini.features import load_mini_features

        return load_mini_features()
    if name in ("inception", "dinov2", "clip", "arcface"):
        from klein_sweep.real_networks import load_real_network

        return load_real_network(name, paths or {})
    raise ConfigError("eval.feature_network", name, "mini, random_conv, inception, dinov2, clip (identity also: arcface)")


class _Embedder(torch.nn.Module):
    """Adapts a FeatureNetwork to torchmetrics' `feature=` argument."""

    def __init__(self, net: FeatureNetwork, logits: bool = False):
        super().__init__()
        self.net, self.use_logits = net, logits
        self.num_features = net.num_features

    def forward(self, images):
        out = self.net.logits(images) if self.use_logits else self.net.embed(images)
        return out.double() if not self.use_logits else out


def kid(net: FeatureNetwork, real: torch.Tensor, fake: torch.Tensor, subset_size: int | None = None, subsets: int = 50) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over random subsets). The default subset size is half
    the smaller set: every subset differs, so the std says how noisy the mean is."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = subset_size or min(len(real), len(fake)) // 2
    size = max(2, min(size, len(real), len(fake)))
    metric = KernelInceptionDistance(feature=_Embedder(net), subsets=subsets, subset_size=size, normalize=True)
    torch.manual_seed(0)  # subset draws: the same for every checkpoint
    metric.update(real, real=True)
    metric.update(fake, real=False)
    mean, std = metric.compute()
    return float(mean), float(std)


def fid(net: FeatureNetwork, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance of the feature Gaussians. Indicative only at small N."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Embedder(net), normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def inception_score(net: FeatureNetwork, images: torch.Tensor, splits: int = 1) -> float:
    """exp(E KL(p(y|x) || p(y))) over the network's class logits. Indicative only."""
    from torchmetrics.image.inception import InceptionScore

    # normalize=False: with True, torchmetrics turns even a custom network's input into uint8.
    metric = InceptionScore(feature=_Embedder(net, logits=True), splits=splits, normalize=False)
    metric.update(images)
    return float(metric.compute()[0])


def identity_similarity(net: FeatureNetwork, generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity over all (generated, reference) pairs (DreamBooth's DINO/CLIP-I).
    A network may embed an image as NaN (ArcFace: no face found): such a reference image is left
    out, such a generated image counts as similarity 0 (a miss, not a pass)."""
    g = F.normalize(net.identity(generated), dim=1)
    r = F.normalize(net.identity(reference), dim=1)
    r = r[~torch.isnan(r).any(dim=1)]
    if len(r) == 0:
        return float("nan")
    return float(torch.nan_to_num(g @ r.T, nan=0.0).mean())


def mean_pairwise_similarity(net: FeatureNetwork, images: torch.Tensor) -> float:
    """Mean cosine between distinct samples' features: near 1 when diversity is gone."""
    e = F.normalize(net.embed(images), dim=1)
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
