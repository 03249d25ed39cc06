"""The LoRA training loop. Reads top to bottom: set up, then for each optimizer step: micro-batches
(sample -> noise -> predict -> loss -> backward), then clip, step, log, checkpoint.

Knows nothing of MLflow or Optuna: it takes a `Tracker` and an `on_checkpoint(event, transformer)
-> stop?` callback; evaluation and pruning hang there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from klein_sweep.config import TrainConfig
from klein_sweep.data.encoding import EncodedData
from klein_sweep.tracking import NullTracker, Tracker
from klein_sweep.training import flow_matching as fm
from klein_sweep.training.resume import TrainState, lora_names, restore_lora, save_train_state


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


OnCheckpoint = Callable[[CheckpointEvent, torch.nn.Module], bool]


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


def train_lora(
    transformer: torch.nn.Module,
    lora_params: list[torch.nn.Parameter],
    data: EncodedData,
    cfg: TrainConfig,
    *,
    steps: int,
    device: str,
    checkpoints: Iterable[int] = (),
    on_checkpoint: OnCheckpoint | None = None,
    caption_dropout: float = 0.0,
    tracker: Tracker | None = None,
    progress: bool = True,
    resume_from: "TrainState | None" = None,
    save_state_to: Path | None = None,
) -> TrainResult:
    """Train the LoRA already injected into `transformer` up to optimizer step `steps`.
    `resume_from`: continue a saved training (its LoRA, optimizer, schedule and data order)
    from its step instead of from 0. `save_state_to`: save that state when the training ends
    at `steps` (not when stopped early)."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    tracker = tracker or NullTracker()
    checkpoint_steps = set(checkpoints) or {steps}
    # Accumulation is written out in the loop below, so accelerate is not told about it (it
    # would divide the loss a second time and skip optimizer calls behind our back).
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg, device), cpu=device == "cpu")
    optimizer = _build_optimizer(lora_params, cfg)
    lr_scheduler = get_scheduler(
        cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps
    )
    start = 0
    if resume_from is not None:
        restore_lora(transformer, lora_params, resume_from)
        optimizer.load_state_dict(resume_from.optimizer)
        lr_scheduler.load_state_dict(resume_from.scheduler)
        start = resume_from.step
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    if cfg.gradient_checkpointing:
        accelerator.unwrap_model(transformer).enable_gradient_checkpointing()
    if cfg.compile:
        compile_blocks(accelerator.unwrap_model(transformer))
    transformer.train()

    batches = BatchSampler(data, cfg, device, caption_dropout)
    if resume_from is not None:
        batches.load_state(resume_from.sampler)
    losses: list[float] = []
    window: list[float] = []  # losses since the last checkpoint
    # disable=None: a live bar on a terminal, no bar in logs and CI.
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=None if progress else True, dynamic_ncols=True)
    try:
        for step in range(start + 1, steps + 1):
            micro_losses = []
            for _ in range(cfg.grad_accum):  # micro-batches: gradients add up, the mean is the step's
                loss = flow_matching_loss(transformer, batches.next(), device)
                accelerator.backward(loss / cfg.grad_accum)
                micro_losses.append(loss.detach())
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(lora_params, cfg.max_grad_norm)
            optimizer.step()  # once per optimizer step
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.stack(micro_losses).mean().item()  # one device sync per step
            lr = lr_scheduler.get_last_lr()[0]
            if not math.isfinite(step_loss):
                reason = f"non-finite training loss ({step_loss}) at step {step}"
                tracker.log_metrics({"train/nonfinite_step": step}, step=step)
                return TrainResult("diverged", step, reason, losses)
            losses.append(step_loss)
            window.append(step_loss)
            tracker.log_metrics({"train/loss": step_loss, "train/lr": lr}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if step in checkpoint_steps and on_checkpoint is not None:
                event = CheckpointEvent(step=step, loss=sum(window) / len(window), lr=lr)
                window = []
                transformer.eval()
                stop = on_checkpoint(event, accelerator.unwrap_model(transformer))
                transformer.train()
                if stop:
                    return TrainResult("stopped", step, f"stopped by the checkpoint callback at step {step}", losses)
        if save_state_to is not None:
            save_train_state(save_state_to, TrainState(
                step=steps, lora=dict(zip(lora_names(accelerator.unwrap_model(transformer), lora_params), (p.detach().cpu().clone() for p in lora_params))),
                optimizer=optimizer.state_dict(), scheduler=lr_scheduler.state_dict(), sampler=batches.state()))
        return TrainResult("finished", steps, None, losses)
    finally:
        bar.close()
        tracker.flush()
        transformer.eval()


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
            shift=cfg.timestep_shift,
            generator=self.gen,
        )
        to = dict(device=self.device)
        return Batch(latents.to(**to), embeds.to(**to), noise.to(**to), sigmas.to(**to))


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
