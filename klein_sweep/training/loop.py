"""The LoRA training loop: one loop for one LoRA or several (lanes, training/lanes.py: LoRAs that
differ only in lr, trained in one batched forward; one LoRA is the one-lane case). Reads top to
bottom: set up (optimizer groups, schedule, data order, a saved state to continue from), then for
each optimizer step: micro-batches (sample -> noise -> predict -> per-lane loss -> backward), clip
each lane, step, log, checkpoint.

Knows nothing of MLflow or Optuna: it takes a `Tracker` per lane and an `on_checkpoint(lane,
event, model) -> stop?` callback; evaluation and pruning hang there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from klein_sweep.config import TrainConfig
from klein_sweep.data.encoding import EncodedData
from klein_sweep.interrupts import raise_if_requested
from klein_sweep.tracking import NullTracker, Tracker
from klein_sweep.training.batches import Batch, BatchSampler, flow_matching_loss, flow_matching_prediction  # noqa: F401 - the step's parts, here by name
from klein_sweep.training.lanes import LaneAdapters, lane_losses, lane_train_state, resume_lanes
from klein_sweep.training.resume import TrainState, save_train_state


@dataclass
class CheckpointEvent:
    step: int
    loss: float  # mean training loss since the previous checkpoint
    lr: float
    lora_norm: float | None = None  # filled in by the trial before evaluation
    sampled: bool = True  # False: a validation-loss checkpoint, no sampled evaluation planned here


@dataclass
class TrainResult:
    status: str  # "finished" | "stopped" (callback asked) | "diverged" (non-finite loss)
    steps_done: int
    reason: str | None = None
    losses: list[float] = field(default_factory=list)  # per optimizer step


@dataclass
class LaneSpec:
    """One lane: its lr, where its metrics go, its saved state to continue from and to save."""

    lr: float
    tracker: Tracker | None = None
    resume_from: TrainState | None = None  # continue this saved training from its step
    save_state_to: Path | None = None  # save the lane's state when it ends at `steps` (not when stopped early)


# (lane, checkpoint, the model holding that lane's LoRA) -> stop this lane?
OnCheckpoint = Callable[[int, CheckpointEvent, torch.nn.Module], bool]


def checkpoint_schedule(steps: int, every: int, extra: Iterable[int] = ()) -> list[int]:
    """Steps at which the checkpoint callback runs: every `every` steps, the `extra` steps that
    fall inside the run, and always the last."""
    marks = set(range(every, steps + 1, every)) if every > 0 else set()
    marks.update(s for s in extra if 0 < s <= steps)
    marks.add(steps)
    return sorted(marks)


def compile_blocks(transformer: torch.nn.Module) -> None:
    """torch.compile each repeated block of the transformer (diffusers' regional compilation: the
    8 double and 24 single blocks of the 9B share two compiled graphs). Once per model: later
    trainings on the same model reuse it."""
    if getattr(transformer, "_klein_compiled", False):
        return
    transformer.compile_repeated_blocks()
    transformer._klein_compiled = True


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
    on_checkpoint: OnCheckpoint | None = None,
    caption_dropout: float = 0.0,
    progress: bool = True,
) -> list[TrainResult]:
    """Train the lanes' LoRAs (everything in `cfg` but the lr shared) up to optimizer step
    `steps`, from 0 or from their saved states. Returns one TrainResult per lane; a lane that
    diverges or that its callback stops leaves the batch, the others go on."""
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    n = len(lanes)
    trackers = [lane.tracker or NullTracker() for lane in lanes]
    checkpoint_steps = set(checkpoints) or {steps}
    # Accumulation is written out below, so accelerate is not told about it (it would divide the
    # loss a second time and skip optimizer calls behind our back).
    accelerator = _accelerator(_mixed_precision(cfg, device), cpu=device == "cpu")
    optimizer = _build_optimizer([{"params": adapters.params[i], "lr": lane.lr} for i, lane in enumerate(lanes)], cfg)
    lr_scheduler = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
    batches = BatchSampler(data, cfg, device, caption_dropout)
    start, sampler_state = resume_lanes(adapters, [lane.resume_from for lane in lanes], optimizer, lr_scheduler)
    if sampler_state is not None:
        batches.load_state(sampler_state)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    if cfg.gradient_checkpointing:
        accelerator.unwrap_model(transformer).enable_gradient_checkpointing()
    if cfg.compile:
        compile_blocks(accelerator.unwrap_model(transformer))
    transformer.train()

    run = _Run(n)
    title = "train" if n == 1 else f"train {n} lanes"
    # disable=None: a live bar on a terminal, no bar in logs and CI.
    bar = tqdm(total=steps, initial=start, desc=title, unit="step", disable=None if progress else True, dynamic_ncols=True)
    try:
        for step in range(start + 1, steps + 1):
            step_losses = _optimizer_step(transformer, adapters, run.active, batches, optimizer, lr_scheduler, accelerator, cfg, device)
            run.record(step, step_losses, lr_scheduler.get_last_lr(), trackers)
            bar.update(1)
            if n == 1 and run.active:
                bar.set_postfix(loss=f"{step_losses[0]:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}", refresh=False)
            if step in checkpoint_steps and on_checkpoint is not None:
                run.checkpoint(step, lr_scheduler.get_last_lr(), adapters, transformer, accelerator, on_checkpoint)
            if not run.active:
                break
            # A Ctrl-C that a library swallowed (printed in a __del__ or weakref callback) stops
            # the training here, not after its last step: a worker has seconds before it is killed.
            raise_if_requested()
        sampler_state = batches.state()
        for lane in run.active:
            if lanes[lane].save_state_to is not None:
                save_train_state(lanes[lane].save_state_to, lane_train_state(adapters, lane, steps, optimizer, lr_scheduler, sampler_state))
            run.results[lane] = TrainResult("finished", steps, None, run.losses[lane])
        return run.results  # type: ignore[return-value]
    finally:
        bar.close()
        for t in trackers:
            t.flush()
        transformer.eval()


def _optimizer_step(transformer, adapters: LaneAdapters, active: list[int], batches: BatchSampler, optimizer, lr_scheduler,
                    accelerator, cfg: TrainConfig, device: str) -> list[float]:
    """One optimizer step of the active lanes: their losses, in `active`'s order."""
    micro = []
    for _ in range(cfg.grad_accum):  # micro-batches: gradients add up, the mean is the step's
        batch = batches.next()
        # Backward inside the block too: gradient checkpointing re-runs the forward there.
        with adapters.batched(active):
            if adapters.single:
                per_lane = flow_matching_loss(transformer, batch, device).reshape(1)
            else:
                per_lane = lane_losses(transformer, batch, device, len(active))
            # The sum's gradient in lane l's parameters is lane l's loss's alone.
            accelerator.backward(per_lane.sum() / cfg.grad_accum)
        micro.append(per_lane.detach())
    adapters.keep_grads_of(active)
    if cfg.max_grad_norm > 0:
        for lane in active:  # each lane clipped by its own norm, as a lone training is
            accelerator.clip_grad_norm_(adapters.params[lane], cfg.max_grad_norm)
    optimizer.step()  # once per optimizer step; lanes out of the batch have no gradient: AdamW leaves them be
    lr_scheduler.step()
    adapters.zero_grad(optimizer)
    return torch.stack(micro).mean(dim=0).tolist()  # one device sync per step


class _Run:
    """The lanes' progress: which are still training, their losses, their results."""

    def __init__(self, n: int):
        self.active = list(range(n))
        self.results: list[TrainResult | None] = [None] * n
        self.losses: list[list[float]] = [[] for _ in range(n)]
        self.windows: list[list[float]] = [[] for _ in range(n)]  # losses since the last checkpoint

    def record(self, step: int, step_losses: list[float], lrs: list[float], trackers) -> None:
        for lane, loss in zip(list(self.active), step_losses):
            if not math.isfinite(loss):
                trackers[lane].log_metrics({"train/nonfinite_step": step}, step=step)
                self.leave(lane, TrainResult("diverged", step, f"non-finite training loss ({loss}) at step {step}", self.losses[lane]))
                continue
            self.losses[lane].append(loss)
            self.windows[lane].append(loss)
            trackers[lane].log_metrics({"train/loss": loss, "train/lr": lrs[lane]}, step=step)

    def checkpoint(self, step: int, lrs: list[float], adapters: LaneAdapters, transformer, accelerator, on_checkpoint) -> None:
        for lane in list(self.active):
            event = CheckpointEvent(step=step, loss=sum(self.windows[lane]) / len(self.windows[lane]), lr=lrs[lane])
            self.windows[lane] = []
            adapters.load(lane)
            transformer.eval()
            stop = on_checkpoint(lane, event, accelerator.unwrap_model(transformer))
            transformer.train()
            if stop:
                self.leave(lane, TrainResult("stopped", step, f"stopped by the checkpoint callback at step {step}", self.losses[lane]))

    def leave(self, lane: int, result: TrainResult) -> None:
        self.results[lane] = result
        self.active.remove(lane)


def train_lora(
    transformer: torch.nn.Module,
    lora_params: list[torch.nn.Parameter],
    data: EncodedData,
    cfg: TrainConfig,
    *,
    steps: int,
    device: str,
    checkpoints: Iterable[int] = (),
    on_checkpoint: Callable[[CheckpointEvent, torch.nn.Module], bool] | None = None,
    caption_dropout: float = 0.0,
    tracker: Tracker | None = None,
    progress: bool = True,
    resume_from: TrainState | None = None,
    save_state_to: Path | None = None,
) -> TrainResult:
    """One LoRA, the one-lane case of `train_lanes`: the LoRA already injected into
    `transformer` (its parameters `lora_params`) trained up to optimizer step `steps`."""
    adapters = LaneAdapters(transformer, 1)
    if {id(p) for p in lora_params} != {id(p) for p in adapters.adapter}:
        raise ValueError("lora_params are not the parameters of the transformer's adapter 'default'")
    callback = (lambda lane, event, model: on_checkpoint(event, model)) if on_checkpoint is not None else None
    return train_lanes(transformer, adapters, [LaneSpec(cfg.lr, tracker, resume_from, save_state_to)], data, cfg, steps=steps,
                       device=device, checkpoints=checkpoints, on_checkpoint=callback, caption_dropout=caption_dropout,
                       progress=progress)[0]


def _accelerator(mixed_precision: str, cpu: bool):
    """accelerate keeps one state per process and refuses a later Accelerator with another
    precision or device ("restart your runtime completely"): in a notebook, a bf16 training after
    an fp32 one would need a restart. The state is set up afresh when either changes."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state and state != PartialState._shared_state:  # an earlier training's
        device = state.get("device")
        if state.get("_mixed_precision") != mixed_precision or (device is not None and (device.type == "cpu") != cpu):
            AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def _mixed_precision(cfg: TrainConfig, device: str) -> str:
    if cfg.mixed_precision == "auto":
        return "bf16" if device == "cuda" else "no"
    return cfg.mixed_precision


def _build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise RuntimeError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'klein_sweep[bnb]'") from exc
        return bnb.optim.AdamW8bit(params, **kwargs)
    # fused: one kernel per parameter instead of ~10 ops each; on the CPU torch defaults to the
    # per-op loop, 1.0 ms of a ~30 ms mini step against 0.22 ms fused (one thread, 2 cores AVX-512).
    return torch.optim.AdamW(params, fused=_fusable(params), **kwargs)


def _fusable(params) -> bool:
    """torch's fused AdamW takes floating-point tensors on the CPU or CUDA."""
    tensors = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else list(params)
    return bool(tensors) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
