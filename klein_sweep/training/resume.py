"""The state that lets a training continue exactly where it stopped: the LoRA's weights, the
optimizer's moments, the schedule's position and the data sampler's random state. Refinement
continues a grid training past its last step from this file instead of training again from 0;
continuing gives the same weights as one uninterrupted run (tests/test_refine.py).

One file, train_state.pt, beside the trial's LoRA: for a rank-16 LoRA on the 9B model about
3x the LoRA's float32 size (weights + two Adam moments).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

STATE_FILE = "train_state.pt"


@dataclass
class TrainState:
    step: int  # optimizer steps done
    lora: dict[str, torch.Tensor]  # parameter name -> weights
    optimizer: dict
    scheduler: dict
    sampler: dict  # BatchSampler.state()


def lora_names(transformer: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[str]:
    """The parameters' names in the transformer, in the order the optimizer holds them."""
    by_id = {id(p): name for name, p in transformer.named_parameters()}
    return [by_id[id(p)] for p in params]


def save_train_state(path: Path, state: TrainState) -> Path:
    from klein_sweep.fileio import replaced_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp:
        torch.save({"step": state.step, "lora": state.lora, "optimizer": state.optimizer, "scheduler": state.scheduler,
                    "sampler": state.sampler}, tmp)
    return path


def load_train_state(path: Path) -> TrainState:
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return TrainState(step=int(raw["step"]), lora=raw["lora"], optimizer=raw["optimizer"], scheduler=raw["scheduler"],
                      sampler=raw["sampler"])
