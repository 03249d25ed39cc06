"""One trial: one LoRA trained and checkpointed, tracked in one run.

Stages, in order, each a function below:
  resolve_plan   check data and settings, work out steps; nothing written anywhere yet
  prepare_model  load the pipeline, encode (or read cached) latents and prompts, drop the text encoder
  run_training   open the tracker run, inject the LoRA, train, save, log

Bad input fails in the first two stages, so a failed check never leaves a run in the tracking store.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from klein_sweep.config import ConfigError, Settings, flatten
from klein_sweep.data.folder import Example, load_examples, repeats_per_image, steps_for_repeats


@dataclass
class TrialPlan:
    settings: Settings
    examples: list[Example]
    steps: int
    checkpoints: list[int]  # sampled evaluation (and validation losses)
    validation_steps: list[int] = field(default_factory=list)  # validation losses only (eval.validation_every)
    resume_from: Path | None = None  # a saved training state (training/resume.py) to continue from its step
    save_state: bool = False  # save the training state when it ends, for a later continuation

    @property
    def callback_steps(self) -> list[int]:
        """Every step at which training stops for the checkpoint callback."""
        return sorted(set(self.checkpoints) | set(self.validation_steps))

    @property
    def repeats_per_image(self) -> float:
        t = self.settings.train
        return repeats_per_image(self.steps, t.batch_size, t.grad_accum, len(self.examples))


@dataclass
class PreparedModel:
    pipe: object
    data: object  # EncodedData
    runtime: object  # models.Runtime
    encode_seconds: float


@dataclass
class TrialOutcome:
    status: str
    steps_done: int
    reason: str | None
    final_loss: float | None
    lora_path: Path | None
    run_description: str | None
    checkpoint_log: list[dict] = field(default_factory=list)


def resolve_plan(settings: Settings, extra_checkpoints: list[int] = ()) -> TrialPlan:
    """Validate the data folder and derive the step count (from train.repeats when set)."""
    from klein_sweep.training.loop import checkpoint_schedule

    if settings.model.is_distilled:
        raise ConfigError(
            "model", settings.model.name, "a base model to train on; distilled models are for evaluation only"
        )
    examples = load_examples(settings.data)
    t = settings.train
    steps = t.steps
    if t.repeats is not None:
        steps = steps_for_repeats(t.repeats, len(examples), t.batch_size, t.grad_accum)
    checkpoints = checkpoint_schedule(steps, t.checkpoint_every, extra_checkpoints)
    every = settings.eval.validation_every or 0
    dense = range(every, steps + 1, every) if settings.eval.enabled and every > 0 else ()
    validation_steps = sorted(set(dense) - set(checkpoints))
    return TrialPlan(settings=settings, examples=examples, steps=steps, checkpoints=checkpoints, validation_steps=validation_steps)


def prepare_model(plan: TrialPlan, extra_prompts: list[str] = ()) -> PreparedModel:
    """Load the pipeline and the encodings of every image and prompt, then release the text
    encoder and the VAE encoder (what a 9B LoRA needs to fit a 24 GB card)."""
    from klein_sweep.data.encoding import EncodingCache, EncodingKey, encode_data, release_text_encoder, release_vae_encoder
    from klein_sweep.models.loading import load_pipeline, model_cache_id, pick_runtime

    s = plan.settings
    runtime = pick_runtime(s.model, s.train.device)
    pipe = load_pipeline(s.model, runtime)
    multiple = pipe.vae_scale_factor * 2
    if s.data.resolution % multiple:
        raise ConfigError("data.resolution", s.data.resolution, f"a multiple of {multiple} for model {s.model.name}")
    n_layers = pipe.text_encoder.config.num_hidden_layers
    if max(s.model.text_encoder_layers) > n_layers:
        raise ConfigError(
            "model.text_encoder_layers", s.model.text_encoder_layers, f"layer indices <= {n_layers} for this text encoder"
        )
    key = EncodingKey(
        model_id=model_cache_id(s.model),
        resolution=s.data.resolution,
        text_layers=tuple(s.model.text_encoder_layers),
        max_sequence_length=s.model.max_sequence_length,
        background=s.data.background,
    )
    cache = EncodingCache(s.data.cache_dir if s.data.use_cache else None)
    start = time.perf_counter()
    data = encode_data(pipe, plan.examples, key, cache, extra_prompts=list(extra_prompts))
    release_text_encoder(pipe)
    release_vae_encoder(pipe)
    return PreparedModel(pipe=pipe, data=data, runtime=runtime, encode_seconds=time.perf_counter() - start)


def run_training(
    plan: TrialPlan,
    prepared: PreparedModel,
    tracker,
    evaluate: Callable | None = None,
    progress: bool = True,
    lora_artifact_path: str = "lora",
) -> TrialOutcome:
    """Inject the LoRA, train with checkpoints, save the LoRA and log it to `tracker`.
    `evaluate(event, model) -> (metrics, stop?)` runs at every callback step: the sampled
    checkpoints (event.sampled) and the validation-loss steps between them."""
    import torch

    from klein_sweep.lora.adapters import inject_lora, lora_weight_norm
    from klein_sweep.training.loop import train_lora

    s = plan.settings
    transformer = prepared.pipe.transformer
    params = inject_lora(
        transformer, rank=s.train.rank, alpha=s.train.alpha, preset=s.train.targets, init=s.train.lora_init, seed=s.train.seed
    )
    tracker.log_params(trial_params(plan, n_lora_params=sum(p.numel() for p in params)))
    checkpoint_log: list[dict] = []

    sampled = set(plan.checkpoints)

    def on_checkpoint(event, model) -> bool:
        event.sampled = event.step in sampled
        norm = event.lora_norm = lora_weight_norm(model)
        metrics = {"train/loss_window": event.loss, "train/lora_norm": norm}
        stop = False
        if evaluate is not None:
            extra, stop = evaluate(event, model)
            metrics.update(extra)
        tracker.log_metrics(metrics, step=event.step)
        checkpoint_log.append({"step": event.step, **metrics})
        if not torch.isfinite(torch.tensor(norm)):
            return True  # weights went non-finite: nothing later can recover
        return stop

    from klein_sweep.training.resume import STATE_FILE, load_train_state

    result = train_lora(
        transformer,
        params,
        prepared.data,
        s.train,
        steps=plan.steps,
        device=prepared.runtime.device,
        checkpoints=plan.callback_steps,
        on_checkpoint=on_checkpoint,
        caption_dropout=s.data.caption_dropout,
        tracker=tracker,
        progress=progress,
        resume_from=load_train_state(plan.resume_from) if plan.resume_from else None,
        save_state_to=Path(s.output_dir) / STATE_FILE if plan.save_state else None,
    )
    lora_path = None
    if result.status != "diverged":
        lora_path = save_lora_files(transformer, Path(s.output_dir) / "lora", tracker, lora_artifact_path)
    final_loss = result.losses[-1] if result.losses else None
    return TrialOutcome(
        status=result.status,
        steps_done=result.steps_done,
        reason=result.reason,
        final_loss=final_loss,
        lora_path=lora_path,
        run_description=getattr(tracker, "describe", lambda: None)(),
        checkpoint_log=checkpoint_log,
    )


def save_lora_files(transformer, directory: Path, tracker, artifact_path: str) -> Path:
    """The diffusers LoRA and its ComfyUI / ai-toolkit export side by side, both logged to
    `artifact_path`. Returns the diffusers file."""
    from klein_sweep.lora.export import export_comfyui
    from klein_sweep.lora.io import save_lora

    lora_path = save_lora(transformer, directory)
    exported = export_comfyui(lora_path)
    tracker.log_artifact(lora_path, artifact_path)
    tracker.log_artifact(exported, artifact_path)
    return lora_path


def trial_params(plan: TrialPlan, n_lora_params: int) -> dict:
    """Every resolved setting under its dotted key, plus what was derived from them."""
    params = flatten(dataclasses.asdict(plan.settings))
    params["train.steps"] = plan.steps
    params["data.n_images"] = len(plan.examples)
    params["train.repeats_per_image"] = round(plan.repeats_per_image, 3)
    params["train.lora_scale"] = plan.settings.train.lora_scale
    params["lora.n_params"] = n_lora_params
    return params


def default_run_name(plan: TrialPlan) -> str:
    t = plan.settings.train
    return f"{plan.settings.model.name} lr={t.lr:g} r={t.rank} ga={t.grad_accum} steps={plan.steps}"
