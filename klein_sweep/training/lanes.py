"""Lanes: several LoRAs that differ only in learning rate, trained in one batched forward.

A small model is overhead-bound: on the mini model one training step at batch 1 costs 37 ms and
at batch 5 95 ms (19 ms per sample, 2 cores AVX-512). Lanes turn that into speed: the frozen base
runs once on the batch repeated per lane, (lanes x B, ...), and each adapted layer adds lane l's
own update B_l A_l x to lane l's rows. Each lane has its own LoRA parameters, its own AdamW
parameter group (its own lr) and its own gradient clipping; the lanes draw the same batches
(same seed), so lane l sees exactly what `train_lora` would feed a single LoRA at that lr.

Nothing mixes across the batch in the Flux2 transformer (attention, norms and modulation are per
sample), so a lane's gradient is its own loss's alone: the single-LoRA path (`loop.train_lora`)
stays the reference, and tests/test_lanes.py checks lanes against it.

At a checkpoint lane l's weights are copied into the model's ordinary peft adapter and the
callback sees a plain single-LoRA model: evaluation, saving and snapshots need no lane logic.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from klein_sweep.config import TrainConfig
from klein_sweep.data.encoding import EncodedData
from klein_sweep.tracking import NullTracker, Tracker
from klein_sweep.training.loop import (
    Batch, BatchSampler, CheckpointEvent, TrainResult, _build_optimizer, _mixed_precision, flow_matching_prediction,
)
from klein_sweep.training.resume import TrainState, lora_names, save_train_state

# (lane index, checkpoint, model holding that lane's LoRA) -> stop this lane?
OnLaneCheckpoint = Callable[[int, CheckpointEvent, torch.nn.Module], bool]


class LaneAdapters:
    """Per-lane copies of the peft adapter "default" already injected into `transformer` (so
    every lane starts from the same, seeded initialisation)."""

    def __init__(self, transformer: torch.nn.Module, n_lanes: int):
        from peft.tuners.lora import LoraLayer

        self.transformer = transformer
        self.layers = [m for m in transformer.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]
        # The adapter's own parameters, A then B per layer, in model order.
        self.adapter = [p for m in self.layers for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
        self.params = [[torch.nn.Parameter(p.detach().float().clone()) for p in self.adapter] for _ in range(n_lanes)]

    @contextlib.contextmanager
    def batched(self, lanes: Sequence[int]):
        """Inside the block the adapted layers run `lanes` side by side on a (len(lanes) x B, ...)
        batch whose lane blocks are contiguous: rows [i*B, (i+1)*B) belong to lanes[i]."""
        shadowed = [m.__dict__.get("forward") for m in self.layers]  # a hook's own wrapper, if any
        for i, m in enumerate(self.layers):
            a = [self.params[lane][2 * i] for lane in lanes]
            b = [self.params[lane][2 * i + 1] for lane in lanes]
            m.forward = functools.partial(_lane_forward, m, a, b)  # instance attribute: shadows peft's forward
        try:
            yield
        finally:
            for m, previous in zip(self.layers, shadowed):
                if previous is None:
                    del m.forward
                else:
                    m.forward = previous

    @torch.no_grad()
    def load(self, lane: int) -> None:
        """Copy lane `lane`'s weights into the model's ordinary adapter."""
        for p, q in zip(self.adapter, self.params[lane]):
            p.copy_(q)

    def state_of(self, lane: int) -> dict[str, torch.Tensor]:
        """Lane `lane`'s weights under the adapter's parameter names (TrainState.lora)."""
        names = lora_names(self.transformer, self.adapter)
        return {n: q.detach().cpu().clone() for n, q in zip(names, self.params[lane])}


def _lane_forward(layer, a: list[torch.Tensor], b: list[torch.Tensor], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """base(x) + per-lane B_l (A_l x) * scale. x (lanes x B, ..., in) -> (lanes x B, ..., out)."""
    result = layer.base_layer(x, *args, **kwargs)
    a_stack = torch.stack(a)  # (lanes, r, in)
    b_stack = torch.stack(b)  # (lanes, out, r)
    xs = x.to(a_stack.dtype).reshape(len(a), -1, x.shape[-1])  # (lanes, B*tokens, in)
    delta = torch.bmm(torch.bmm(xs, a_stack.transpose(1, 2)), b_stack.transpose(1, 2)) * layer.scaling["default"]
    return result + delta.reshape(result.shape).to(result.dtype)


def lane_losses(transformer: torch.nn.Module, batch: Batch, device: str, n_lanes: int) -> torch.Tensor:
    """(n_lanes,) flow-matching losses: the batch repeated once per lane, one forward."""
    repeated = Batch(*(t.repeat(n_lanes, *([1] * (t.ndim - 1))) for t in
                       (batch.latents, batch.prompt_embeds, batch.noise, batch.sigmas)))
    pred, target = flow_matching_prediction(transformer, repeated, device)
    return ((pred.float() - target.float()) ** 2).reshape(n_lanes, -1).mean(dim=1)


@dataclass
class LaneSpec:
    lr: float
    tracker: Tracker | None = None
    save_state_to: Path | None = None  # save this lane's training state when it ends at `steps`


def train_lanes(
    transformer: torch.nn.Module,
    adapters: LaneAdapters,
    lanes: Sequence[LaneSpec],
    data: EncodedData,
    cfg: TrainConfig,
    *,
    steps: int,
    device: str,
    checkpoints: Iterable[int] = (),
    on_checkpoint: OnLaneCheckpoint | None = None,
    caption_dropout: float = 0.0,
    progress: bool = True,
) -> list[TrainResult]:
    """`train_lora` for several lrs at once (everything else in `cfg` shared). Returns one
    TrainResult per lane; a lane that diverges or that its callback stops leaves the batch, the
    others go on."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    n = len(lanes)
    trackers = [lane.tracker or NullTracker() for lane in lanes]
    checkpoint_steps = set(checkpoints) or {steps}
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg, device), cpu=device == "cpu")
    optimizer = _build_optimizer([{"params": adapters.params[i], "lr": lane.lr} for i, lane in enumerate(lanes)], cfg)
    lr_scheduler = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    if cfg.gradient_checkpointing:
        accelerator.unwrap_model(transformer).enable_gradient_checkpointing()
    transformer.train()

    batches = BatchSampler(data, cfg, device, caption_dropout)
    active = list(range(n))
    results: list[TrainResult | None] = [None] * n
    losses: list[list[float]] = [[] for _ in range(n)]
    windows: list[list[float]] = [[] for _ in range(n)]
    bar = tqdm(total=steps, desc=f"train {n} lanes", unit="step", disable=None if progress else True, dynamic_ncols=True)
    try:
        for step in range(1, steps + 1):
            micro = []
            for _ in range(cfg.grad_accum):
                # Backward inside the block too: gradient checkpointing re-runs the forward there.
                with adapters.batched(active):
                    per_lane = lane_losses(transformer, batches.next(), device, len(active))
                    # The sum's gradient in lane l's parameters is lane l's loss's alone.
                    accelerator.backward(per_lane.sum() / cfg.grad_accum)
                micro.append(per_lane.detach())
            if cfg.max_grad_norm > 0:
                for lane in active:  # each lane clipped by its own norm, as a single LoRA is
                    accelerator.clip_grad_norm_(adapters.params[lane], cfg.max_grad_norm)
            optimizer.step()  # lanes out of the batch have no gradient: AdamW leaves them be
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_losses = torch.stack(micro).mean(dim=0).tolist()  # one device sync per step
            lrs = lr_scheduler.get_last_lr()
            for lane, loss in zip(list(active), step_losses):
                if not math.isfinite(loss):
                    trackers[lane].log_metrics({"train/nonfinite_step": step}, step=step)
                    results[lane] = TrainResult("diverged", step, f"non-finite training loss ({loss}) at step {step}", losses[lane])
                    active.remove(lane)
                    continue
                losses[lane].append(loss)
                windows[lane].append(loss)
                trackers[lane].log_metrics({"train/loss": loss, "train/lr": lrs[lane]}, step=step)
            bar.update(1)
            if step in checkpoint_steps and on_checkpoint is not None:
                for lane in list(active):
                    event = CheckpointEvent(step=step, loss=sum(windows[lane]) / len(windows[lane]), lr=lrs[lane])
                    windows[lane] = []
                    adapters.load(lane)
                    transformer.eval()
                    stop = on_checkpoint(lane, event, accelerator.unwrap_model(transformer))
                    transformer.train()
                    if stop:
                        results[lane] = TrainResult("stopped", step, f"stopped by the checkpoint callback at step {step}", losses[lane])
                        active.remove(lane)
            if not active:
                break
        sampler_state = batches.state()
        for lane in active:
            if lanes[lane].save_state_to is not None:
                save_train_state(lanes[lane].save_state_to, lane_train_state(adapters, lane, steps, optimizer, lr_scheduler, sampler_state))
            results[lane] = TrainResult("finished", steps, None, losses[lane])
        return results  # type: ignore[return-value]
    finally:
        bar.close()
        for t in trackers:
            t.flush()
        transformer.eval()


def lane_train_state(adapters: LaneAdapters, lane: int, step: int, optimizer, lr_scheduler, sampler: dict) -> TrainState:
    """Lane `lane`'s training state in the single-LoRA layout (one parameter group), so a
    continuation resumes it with `train_lora(resume_from=...)` like any other."""
    full = optimizer.state_dict()
    group = full["param_groups"][lane]
    index = {old: new for new, old in enumerate(group["params"])}
    opt_state = {
        "state": {index[k]: v for k, v in full["state"].items() if k in index},
        "param_groups": [{**group, "params": list(range(len(index)))}],
    }
    sched = lr_scheduler.state_dict()
    per_group = ("base_lrs", "_last_lr", "lr_lambdas")
    sched_state = {k: ([v[lane]] if k in per_group and isinstance(v, list) else v) for k, v in sched.items()}
    return TrainState(step=step, lora=adapters.state_of(lane), optimizer=opt_state, scheduler=sched_state, sampler=sampler)
