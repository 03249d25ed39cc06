"""LoRA files in the diffusers format that `Flux2KleinPipeline.load_lora_weights` reads back,
with the adapter's config (rank, alpha, targets) as metadata."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from klein_sweep.fileio import replaced_atomically

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights with PEFT names (no `transformer.` prefix), on CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def save_lora(transformer: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write `directory/pytorch_lora_weights.safetensors` in diffusers format with the adapter's
    config (rank, alpha, targets) as metadata: without alpha in the file, a LoRA with alpha != rank
    reloads at the wrong strength. Written to a temporary file and renamed, so a crash or a full
    disk never leaves a half-written LoRA under the final name."""
    from diffusers import Flux2KleinPipeline

    directory = Path(directory)
    metadata = transformer.peft_config["default"].to_dict()
    final = directory / LORA_WEIGHT_NAME
    with replaced_atomically(final) as tmp:  # diffusers writes exactly save_directory/weight_name
        Flux2KleinPipeline.save_lora_weights(
            tmp.parent,
            transformer_lora_layers=lora_state_dict(transformer),
            transformer_lora_adapter_metadata=metadata,
            weight_name=tmp.name,
        )
    return final
