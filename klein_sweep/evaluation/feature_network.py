"""The one interface every metric network implements (the mini world's, a random conv net, and
the real Inception / DINOv2 / CLIP / ArcFace). Nothing here knows any concrete network, so the
networks import it without importing each other."""

from __future__ import annotations

import torch


class FeatureNetwork(torch.nn.Module):
    """What metrics need from a network: an embedding (identity, KID/FID) and class logits (IS)."""

    num_features: int
    has_class_head: bool = True
    """False for pure embedding networks (DINOv2, CLIP, ArcFace): they have no class logits, so
    the Inception Score is not computed with them (eval/is is absent, not a failed trial)."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:  # (N, D)
        raise NotImplementedError

    def logits(self, images: torch.Tensor) -> torch.Tensor:  # (N, K)
        raise NotImplementedError

    def identity(self, images: torch.Tensor) -> torch.Tensor:  # (N, E)
        """The embedding whose cosine is identity similarity; by default the features."""
        return self.embed(images)
