"""Building a metric network by name (network_choice.py picks which): a fixed random conv net
(for the random tiny model), the mini world's own network, or a real one from a local folder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from klein_sweep.errors import ConfigError
from klein_sweep.evaluation.feature_network import FeatureNetwork
from klein_sweep.evaluation.network_choice import DOWNLOADS
from klein_sweep.evaluation.real_networks import load_real_network


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


def build_feature_network(name: str, paths: dict | None = None) -> FeatureNetwork:
    """A network by name (after resolve_networks); the real ones from eval.network_paths."""
    if name == "random_conv":
        return RandomConvFeatures(seed=0)
    if name == "mini":
        from klein_sweep.mini.features import load_mini_features

        return load_mini_features()
    if name in DOWNLOADS:
        return load_real_network(name, paths or {})
    raise ConfigError("eval.feature_network", name, "mini, random_conv, inception, dinov2, clip (identity also: arcface)")
