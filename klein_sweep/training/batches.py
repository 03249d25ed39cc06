"""What one training step feeds the transformer: batches of cached latents with their noise and
noise levels (drawn from one seeded generator, so a seed gives the same run on any device), and
the rectified-flow prediction and loss on them. Shared by the training loop, the lanes, the
validation losses and the FLOP counter."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from klein_sweep.config import TrainConfig
from klein_sweep.data.encoding import EncodedData
from klein_sweep.training import flow_matching as fm


def flow_matching_loss(transformer: torch.nn.Module, batch: "Batch", device: str) -> torch.Tensor:
    """One rectified-flow loss on a batch of cached latents."""
    return fm.flow_loss(*flow_matching_prediction(transformer, batch, device))


def flow_matching_prediction(transformer: torch.nn.Module, batch: "Batch", device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target) of the velocity on a batch of cached latents. Shapes for B images,
    h x w latent patches, C = 4 x latent channels, L text tokens, D text width:
    latents (B, C, h, w) -> tokens (B, h*w, C); prompt_embeds (B, L, D); both results (B, h*w, C)."""
    from diffusers import Flux2KleinPipeline

    x0 = batch.latents
    noisy = fm.add_noise(x0, batch.noise, batch.sigmas)
    tokens = Flux2KleinPipeline._pack_latents(noisy)
    target = Flux2KleinPipeline._pack_latents(fm.velocity_target(x0, batch.noise))
    img_ids = Flux2KleinPipeline._prepare_latent_ids(x0).to(device)
    txt_ids = Flux2KleinPipeline._prepare_text_ids(batch.prompt_embeds).to(device)
    pred = transformer(
        hidden_states=tokens,
        encoder_hidden_states=batch.prompt_embeds,
        timestep=batch.sigmas,  # the transformer scales by 1000 itself
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=None,
        return_dict=False,
    )[0]
    return pred[:, : tokens.shape[1]], target


@dataclass
class Batch:
    latents: torch.Tensor  # (B, C, h, w)
    prompt_embeds: torch.Tensor  # (B, L, D)
    noise: torch.Tensor  # (B, C, h, w)
    sigmas: torch.Tensor  # (B,)


class BatchSampler:
    """Shuffled epochs over the cached data, with caption dropout, noise and noise levels all
    drawn from one seeded CPU generator: the same seed gives the same run on any device."""

    def __init__(self, data: EncodedData, cfg: TrainConfig, device: str, caption_dropout: float = 0.0):
        self.data, self.cfg, self.device, self.caption_dropout = data, cfg, device, caption_dropout
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.order: list[int] = []
        if cfg.timestep_shift == "auto":
            raise ValueError("train.timestep_shift=auto is resolved for a model by training.trial.resolve_plan first")
        # A trial's plan resolves the model's default (training.trial.resolve_timestep_shift);
        # a bare TrainConfig trains unshifted.
        self.shift = 1.0 if cfg.timestep_shift is None else float(cfg.timestep_shift)

    def state(self) -> dict:
        """Where the sampler stands: its generator and the rest of the current epoch."""
        return {"generator": self.gen.get_state(), "order": list(self.order)}

    def load_state(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.order = [int(i) for i in state["order"]]

    def next(self) -> Batch:
        cfg, n = self.cfg, self.data.latents.shape[0]
        idx = []
        while len(idx) < cfg.batch_size:
            if not self.order:
                self.order = torch.randperm(n, generator=self.gen).tolist()
            idx.append(self.order.pop())
        latents = self.data.latents[idx].float()
        embeds = self.data.prompt_embeds[idx].float().clone()
        if self.caption_dropout > 0:
            drop = torch.rand(len(idx), generator=self.gen) < self.caption_dropout
            embeds[drop] = self.data.empty_prompt_embeds.float()
        noise = torch.randn(latents.shape, generator=self.gen)
        sigmas = fm.sample_sigmas(
            len(idx),
            cfg.timestep_sampling,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            shift=self.shift,
            generator=self.gen,
        )
        to = dict(device=self.device)
        return Batch(latents.to(**to), embeds.to(**to), noise.to(**to), sigmas.to(**to))
