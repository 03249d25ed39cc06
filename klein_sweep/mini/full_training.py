"""Training every weight of the mini transformer (not a LoRA): the build's pre-training on the
world and the distillation of its student share this loop; they differ in what a batch holds."""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger("klein_sweep.mini.build")


def train_all_weights(transformer, next_batch: Callable[[torch.Generator], "Batch"], *, steps: int, lr: float,  # noqa: F821
                      weight_decay: float, seed: int, what: str) -> float:
    """AdamW with a one-cycle schedule and gradient clipping at 1; `next_batch(generator)` draws
    a flow-matching Batch. Returns the last loss; leaves the transformer frozen in eval mode."""
    from klein_sweep.training.loop import flow_matching_loss

    transformer.train().requires_grad_(True)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        loss = flow_matching_loss(transformer, next_batch(g), "cpu")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0:
            log.info("%s step %d/%d loss %.4f", what, step, steps, loss.item())
    transformer.eval().requires_grad_(False)
    return float(loss.item())
