"""FLOPs of one LoRA training step and one transformer forward, counted by torch's
FlopCounterMode on the model's transformer built on the meta device: shapes only, no weights,
no GPU, nothing downloaded. Only the transformer is counted; the VAE decode and the metric
networks are a few percent of a sample at Klein sizes.

    model_flops(settings, resolution)   ModelFlops(train_step, forward) for that model and size
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from klein_sweep.config import Settings


@dataclass(frozen=True)
class ModelFlops:
    train_step: float  # one optimizer micro-step: forward + backward at train.batch_size (model FLOPs)
    forward: float  # one transformer forward of one image at the given resolution (a sampling step)


def transformer_config(model) -> dict:
    """The transformer's config from the same sources as loading: the tiny model's code, the
    shipped mini folder, a local model folder, or the registry for known hub models."""
    from diffusers import Flux2Transformer2DModel

    from klein_sweep.errors import ModelError
    from klein_sweep.models.registry import MINI_PIPELINE_DIR, klein_transformer_config, model_size

    if model.kind == "tiny":
        from klein_sweep.models.tiny import build_tiny_pipeline

        return dict(build_tiny_pipeline(model.seed).transformer.config)
    if model.kind == "mini":
        return dict(Flux2Transformer2DModel.load_config(MINI_PIPELINE_DIR / "transformer"))
    from pathlib import Path

    if model.path and (Path(model.path) / "transformer" / "config.json").exists():
        return dict(Flux2Transformer2DModel.load_config(Path(model.path) / "transformer"))
    if model_size(model.name):
        return klein_transformer_config(model_size(model.name))
    raise ModelError(f"no transformer config for model '{model.name}': set model.path to a folder with transformer/config.json")


def model_flops(settings: Settings, resolution: int, train_resolution: int | None = None) -> ModelFlops:
    """Forward FLOPs at `resolution` (sampling) and training-step FLOPs at `train_resolution`
    (default data.resolution) for the settings' model, LoRA rank and targets."""
    from klein_sweep.preflight import model_shape

    m, t = settings.model, settings.train
    shape = model_shape(m)
    multiple = shape.resolution_multiple if shape else 16
    key = (repr(m), t.rank, t.targets, t.batch_size)
    train_side, sample_side = (train_resolution or settings.data.resolution) // multiple, resolution // multiple
    if (key, "train", train_side) not in _COUNTED:
        _COUNTED[key, "train", train_side] = _train_step_flops(_meta_transformer(key, m, t), m, t, train_side)
    if (key, "forward", sample_side) not in _COUNTED:
        _COUNTED[key, "forward", sample_side] = _forward_flops(_meta_transformer(key, m, t), m, sample_side)
    return ModelFlops(train_step=_COUNTED[key, "train", train_side], forward=_COUNTED[key, "forward", sample_side])


# (model, rank, targets, batch) + what + latent side -> FLOPs; and the meta transformers counted on.
_COUNTED: dict[tuple, float] = {}
_TRANSFORMERS: dict[tuple, torch.nn.Module] = {}


def _meta_transformer(key, model, train):
    from diffusers import Flux2Transformer2DModel

    from klein_sweep.lora.adapters import inject_lora

    if key not in _TRANSFORMERS:
        with torch.device("meta"):
            transformer = Flux2Transformer2DModel.from_config(transformer_config(model))
        transformer.requires_grad_(False)
        inject_lora(transformer, rank=train.rank, alpha=train.alpha or train.rank, preset=train.targets)
        _TRANSFORMERS.clear()  # one at a time: a 9B skeleton holds no memory, but its modules do
        _TRANSFORMERS[key] = transformer
    return _TRANSFORMERS[key]


def _inputs(transformer, model, side: int, batch: int):
    """(latents (B, C, side, side), prompt embeds (B, L, D)) on the meta device."""
    c = transformer.config
    latents = torch.empty(batch, c.in_channels, side, side, device="meta")
    embeds = torch.empty(batch, model.max_sequence_length, c.joint_attention_dim, device="meta")
    return latents, embeds


def _train_step_flops(transformer, model, train, side: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from klein_sweep.training.loop import Batch, flow_matching_loss

    latents, embeds = _inputs(transformer, model, side, train.batch_size)
    batch = Batch(latents=latents, prompt_embeds=embeds, noise=torch.empty_like(latents),
                  sigmas=torch.empty(train.batch_size, device="meta"))
    counter = FlopCounterMode(display=False)
    with counter:
        flow_matching_loss(transformer, batch, "meta").backward()
    transformer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _forward_flops(transformer, model, side: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from klein_sweep.training.loop import Batch, flow_matching_loss

    latents, embeds = _inputs(transformer, model, side, 1)
    batch = Batch(latents=latents, prompt_embeds=embeds, noise=torch.empty_like(latents), sigmas=torch.empty(1, device="meta"))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        flow_matching_loss(transformer, batch, "meta")
    return float(counter.get_total_flops())
