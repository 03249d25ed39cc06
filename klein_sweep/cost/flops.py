"""FLOPs of one LoRA training step and one transformer forward, counted by torch's
FlopCounterMode on the model's transformer built on the meta device: shapes only, no weights,
no GPU, nothing downloaded. Only the transformer is counted (the VAE decode and the metric
networks run once per image, against 10-50 transformer forwards; not counted, not yet measured).

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
        _COUNTED[key, "train", train_side] = _count(_meta_transformer(key, m, t), m, train_side, t.batch_size, backward=True)
    if (key, "forward", sample_side) not in _COUNTED:
        _COUNTED[key, "forward", sample_side] = _count(_meta_transformer(key, m, t), m, sample_side, 1, backward=False)
    return ModelFlops(train_step=_COUNTED[key, "train", train_side], forward=_COUNTED[key, "forward", sample_side])


# (model, rank, targets, batch) + what + latent side -> FLOPs; and the meta transformers counted on.
_COUNTED: dict[tuple, float] = {}
_TRANSFORMERS: dict[tuple, torch.nn.Module] = {}


def _meta_transformer(key, model, train):
    from klein_sweep.heap import import_model_libraries

    import_model_libraries()  # the first import of a dry run and of a one-worker sweep: no torchao noise
    from diffusers import Flux2Transformer2DModel

    from klein_sweep.lora.adapters import inject_lora
    from klein_sweep.models.loading import transformer_config

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


def _count(transformer, model, side: int, batch_size: int, backward: bool) -> float:
    """FLOPs of one flow-matching loss on a (batch_size, C, side, side) latent batch: the forward
    alone (a sampling step), or forward + backward (a training micro-step)."""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    from klein_sweep.training.loop import Batch, flow_matching_loss

    latents, embeds = _inputs(transformer, model, side, batch_size)
    batch = Batch(latents=latents, prompt_embeds=embeds, noise=torch.empty_like(latents),
                  sigmas=torch.empty(batch_size, device="meta"))
    counter = FlopCounterMode(display=False)
    with counter, (contextlib.nullcontext() if backward else torch.no_grad()):
        loss = flow_matching_loss(transformer, batch, "meta")
        if backward:
            loss.backward()
    transformer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())
