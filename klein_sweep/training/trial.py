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
    swept: tuple[str, ...] = ()  # a sweep trial's swept keys: its MLflow params (trial_params)

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
    placement: object = None  # models.placement.Placement: what is on the accelerator, stage by stage


@dataclass
class TrialOutcome:
    status: str
    steps_done: int
    reason: str | None
    final_loss: float | None
    lora_path: Path | None
    run_description: str | None
    checkpoint_log: list[dict] = field(default_factory=list)


# The training noise schedule when train.timestep_shift is null, by model kind. The real models
# train on the shift their pipeline samples with at the training resolution (`auto`); the mini
# world keeps shift 1, which its committed boundaries were measured on (docs/design.md, "The
# noise schedule", has the measurement under auto).
DEFAULT_TIMESTEP_SHIFT = {"pretrained": "auto", "mini": 1.0, "tiny": 1.0}


def resolve_timestep_shift(settings: Settings) -> float:
    """train.timestep_shift as the number training uses: `auto` is the pipeline's shift for the
    training resolution's image tokens at the model's sample_steps."""
    from klein_sweep.preflight import model_shape
    from klein_sweep.training.flow_matching import empirical_shift

    shift = settings.train.timestep_shift
    if shift is None:
        shift = DEFAULT_TIMESTEP_SHIFT[settings.model.kind]
    if shift == "auto":
        shape = model_shape(settings.model)
        factor = shape.vae_scale_factor if shape else 8  # FLUX.2's VAE when nothing local says otherwise
        tokens = (settings.data.resolution // (2 * factor)) ** 2  # latents pack 2x2 into one token
        return round(empirical_shift(tokens, settings.model.sample_steps), 4)
    return float(shift)


def resolve_plan(settings: Settings, extra_checkpoints: list[int] = ()) -> TrialPlan:
    """Validate the data folder and derive the step count (from train.repeats when set) and the
    training noise schedule's shift."""
    from klein_sweep.training.loop import checkpoint_schedule

    if settings.model.is_distilled:
        raise ConfigError(
            "model", settings.model.name, "a base model to train on; distilled models are for evaluation only"
        )
    examples = load_examples(settings.data)
    settings.train = dataclasses.replace(settings.train, timestep_shift=resolve_timestep_shift(settings))
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
    """Load the pipeline on the host and the encodings of every image and prompt (the text
    encoder and VAE on the accelerator only while they encode), release the text encoder and the
    VAE encoder, then put the transformer and the VAE's decoder on the accelerator: what a 9B
    LoRA needs to fit a 24 GB card (models/placement.py)."""
    from klein_sweep.data.encoding import EncodingCache, EncodingKey, encode_data, release_text_encoder, release_vae_encoder
    from klein_sweep.heap import freeze_libraries
    from klein_sweep.models import placement as placements
    from klein_sweep.models.loading import load_pipeline, model_cache_id, pick_runtime

    freeze_libraries()  # before the model exists: the collections that release memory skip the libraries
    s = plan.settings
    runtime = pick_runtime(s.model, s.train.device)
    pipe = load_pipeline(s.model, runtime)
    placement = placements.placement_for(runtime.device)
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
    with placement.stage("encode"):
        data = encode_data(pipe, plan.examples, key, cache, extra_prompts=list(extra_prompts), placement=placement)
        release_text_encoder(pipe, placement)
        release_vae_encoder(pipe)
    with placement.stage("train"):
        placement.to_device("transformer", pipe.transformer)
        placement.to_device("vae", pipe.vae)  # its decoder: evaluation samples
    return PreparedModel(pipe=pipe, data=data, runtime=runtime, encode_seconds=time.perf_counter() - start, placement=placement)


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
    from klein_sweep.training.loop import train_lora

    s = plan.settings
    transformer = prepared.pipe.transformer
    params = inject_trial_lora(transformer, s)
    tracker.log_params(trial_params(plan))
    checkpoint_log: list[dict] = []
    on_checkpoint = checkpoint_callback(plan, tracker, evaluate, checkpoint_log)

    from klein_sweep.training.resume import STATE_FILE, load_train_state

    with training_stage(prepared):
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
    return trial_outcome(plan, result, transformer, tracker, lora_artifact_path, checkpoint_log)


@dataclass
class LaneOutcome:
    """One lane of `run_lane_training`: its trial's outcome, or the error its checkpoint
    callback raised (that lane left the batch; the others went on)."""

    outcome: TrialOutcome | None
    error: Exception | None = None


@dataclass
class LaneTraining:
    lanes: list[LaneOutcome]
    adapters: object  # training.lanes.LaneAdapters: load(i) puts lane i's LoRA into the model
    seconds: float  # wall time of the whole batched training, evaluations included


def lanes_compatible(plans: list[TrialPlan]) -> bool:
    """Trials that may share one batched training: the same settings but train.lr and the
    output folder, the same steps and checkpoints; all start from step 0 or all resume (from one
    step: the checkpoints after it are the same)."""
    def shared(plan: TrialPlan):
        settings = {k: v for k, v in flatten(dataclasses.asdict(plan.settings)).items() if k not in ("train.lr", "output_dir")}
        return repr((settings, plan.steps, plan.callback_steps, plan.checkpoints, plan.save_state))

    return len({shared(p) for p in plans}) == 1 and len({p.resume_from is None for p in plans}) == 1


def run_lane_training(
    plans: list[TrialPlan],
    prepared: PreparedModel,
    trackers: list,
    evaluates: list[Callable | None],
    progress: bool = True,
    lora_artifact_path: str = "lora",
) -> LaneTraining:
    """`run_training` for trials that differ only in learning rate, trained as lanes of one
    batched forward (training/lanes.py). Each trial keeps its own tracker, evaluation, LoRA files
    and saved state, as if it had run alone."""
    from klein_sweep.training.lanes import LaneAdapters
    from klein_sweep.training.loop import LaneSpec, train_lanes
    from klein_sweep.training.resume import STATE_FILE, load_train_state

    if not lanes_compatible(plans):
        raise ValueError("lanes: the trials differ in more than train.lr")
    s = plans[0].settings
    transformer = prepared.pipe.transformer
    params = inject_trial_lora(transformer, s)
    adapters = LaneAdapters(transformer, len(plans))
    logs: list[list[dict]] = [[] for _ in plans]
    callbacks = []
    for plan, tracker, evaluate, log in zip(plans, trackers, evaluates, logs):
        tracker.log_params(trial_params(plan))
        callbacks.append(checkpoint_callback(plan, tracker, evaluate, log))
    errors: list[Exception | None] = [None] * len(plans)

    def on_checkpoint(lane: int, event, model) -> bool:
        try:
            return callbacks[lane](event, model)
        except Exception as exc:  # this trial fails with its reason; its neighbours need not
            errors[lane] = exc
            return True

    start = time.perf_counter()
    with training_stage(prepared):
        results = train_lanes(
            transformer, adapters,
            [LaneSpec(lr=p.settings.train.lr, tracker=t, save_state_to=Path(p.settings.output_dir) / STATE_FILE if p.save_state else None,
                      resume_from=load_train_state(p.resume_from) if p.resume_from else None)
             for p, t in zip(plans, trackers)],
            prepared.data, s.train, steps=plans[0].steps, device=prepared.runtime.device, checkpoints=plans[0].callback_steps,
            on_checkpoint=on_checkpoint, caption_dropout=s.data.caption_dropout, progress=progress,
        )
    seconds = time.perf_counter() - start
    lanes = []
    for i, (plan, tracker, result) in enumerate(zip(plans, trackers, results)):
        if errors[i] is not None:
            lanes.append(LaneOutcome(None, errors[i]))
            continue
        adapters.load(i)
        lanes.append(LaneOutcome(trial_outcome(plan, result, transformer, tracker, lora_artifact_path, logs[i])))
    return LaneTraining(lanes=lanes, adapters=adapters, seconds=seconds)


def training_stage(prepared: PreparedModel):
    """The placement's "train" stage around a training (evaluations inside it are stages of their own)."""
    import contextlib

    return prepared.placement.stage("train") if prepared.placement is not None else contextlib.nullcontext()


def inject_trial_lora(transformer, settings: Settings) -> list:
    """The trial's LoRA, as train.* describes it (seeded: every lane of a group starts the same)."""
    from klein_sweep.lora.adapters import inject_lora

    t = settings.train
    return inject_lora(transformer, rank=t.rank, alpha=t.alpha, preset=t.targets, init=t.lora_init, seed=t.seed)


def checkpoint_callback(plan: TrialPlan, tracker, evaluate: Callable | None, checkpoint_log: list[dict]) -> Callable:
    """The training loop's `on_checkpoint(event, model) -> stop?` for one trial: the LoRA's
    norm, `evaluate` at the callback steps, everything logged to `tracker` and `checkpoint_log`."""
    import torch

    from klein_sweep.lora.adapters import lora_weight_norm

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

    return on_checkpoint


def trial_outcome(plan: TrialPlan, result, transformer, tracker, lora_artifact_path: str, checkpoint_log: list[dict]) -> TrialOutcome:
    """Save the LoRA the transformer holds (unless the training diverged) and sum the trial up."""
    lora_path = None
    if result.status != "diverged":
        lora_path = save_lora_files(transformer, Path(plan.settings.output_dir) / "lora", tracker, lora_artifact_path)
    return TrialOutcome(
        status=result.status,
        steps_done=result.steps_done,
        reason=result.reason,
        final_loss=result.losses[-1] if result.losses else None,
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


# A single trial's MLflow params besides those derived (trial_params): what a user compares
# across the runs of different commands.
TRIAL_PARAMS = ("model.name", "data.trigger", "train.lr", "train.rank", "train.alpha", "train.grad_accum",
                "train.batch_size", "train.seed")


def trial_params(plan: TrialPlan) -> dict:
    """The run's MLflow params under their dotted keys. A sweep's trial: its swept keys and its
    step count, what tells its trials apart (the settings they share are params of the sweep's
    parent run). A single trial: TRIAL_PARAMS, the step count, the number of images, repeats per
    image and, with evaluation, the recipe. Not every resolved value: MLflow's image cards print
    all of a run's params above each sample grid - ~80 pushed the grid out of its card, and even
    a dozen (five lines) hide half of it. The full resolved config is the run's config.yaml."""
    from klein_sweep.config.recipes import recipe_name

    s = plan.settings
    flat = flatten(dataclasses.asdict(s))
    if plan.swept:
        return {**{k: flat[k] for k in plan.swept if k in flat}, "train.steps": plan.steps}
    params = {k: flat[k] for k in TRIAL_PARAMS}
    params["train.steps"] = plan.steps
    params["data.n_images"] = len(plan.examples)
    params["train.repeats_per_image"] = round(plan.repeats_per_image, 3)
    if s.eval.enabled:
        params["eval.recipe"] = recipe_name(s.eval, s.model)
    return params


def default_run_name(plan: TrialPlan) -> str:
    t = plan.settings.train
    return f"{plan.settings.model.name} lr={t.lr:g} r={t.rank} ga={t.grad_accum} steps={plan.steps}"
