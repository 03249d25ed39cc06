"""The mini world's feature network: a small CNN trained to read every attribute of a creature.

It serves the metrics through the same `FeatureNetwork` interface the real networks use:
  embed(images)  (N, 128) penultimate features, for KID/FID
  logits(images) (N, 6) shape logits, for IS
  identity(images) (N, 17) the identity embedding: the shape, colour and pattern heads'
                 probabilities, each unit-normalised, concatenated and scaled by 1/sqrt(3) -
                 cosine = mean agreement on the three identity attributes (1: same identity,
                 ~0.67: one attribute differs, ~0: none shared).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from klein_sweep.evaluation.feature_network import FeatureNetwork
from klein_sweep.mini.world import ATTRIBUTES

WEIGHTS = Path(__file__).resolve().parent / "weights" / "features.safetensors"
IDENTITY_HEADS = ("shape", "colour", "pattern")


class MiniFeatures(FeatureNetwork):
    num_features = 128

    def __init__(self):
        super().__init__()
        chans = [3, 32, 64, 128, 128]
        layers = []
        for i, (cin, cout) in enumerate(zip(chans, chans[1:])):
            layers += [torch.nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.SiLU()]
        self.body = torch.nn.Sequential(*layers)
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(128, len(v)) for k, v in ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, 32, 32) in [0, 1] -> (N, 128)."""
        x = images.float()
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        return self.body(x * 2 - 1).mean(dim=(2, 3))

    def head_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {k: h(f) for k, h in self.heads.items()}

    @torch.no_grad()
    def embed(self, images):
        return self.features(images)

    @torch.no_grad()
    def logits(self, images):
        return self.heads["shape"](self.features(images))

    @torch.no_grad()
    def identity(self, images):
        out = self.head_logits(images)
        parts = [F.normalize(out[k].softmax(dim=1), dim=1) for k in IDENTITY_HEADS]
        return torch.cat(parts, dim=1) / len(parts) ** 0.5

    @torch.no_grad()
    def predict(self, images) -> dict[str, torch.Tensor]:
        """Predicted class index of every attribute."""
        return {k: v.argmax(dim=1) for k, v in self.head_logits(images).items()}


def load_mini_features(path: Path = WEIGHTS) -> MiniFeatures:
    from safetensors.torch import load_file

    from klein_sweep.errors import ModelError

    if not path.exists():
        raise ModelError(f"the mini feature network {path} is missing; rebuild it with python -m klein_sweep.mini.build")
    net = MiniFeatures()
    net.load_state_dict(load_file(path))
    return net.eval().requires_grad_(False)
