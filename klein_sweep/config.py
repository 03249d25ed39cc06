"""Typed settings: the Hydra config becomes these dataclasses at the entry point, and nothing below
the entry point sees an OmegaConf object.

Every field has a docstring; every check names the dotted key and what would be valid. The dotted
keys (``train.lr``, ``data.trigger`` ...) are a contract: sweeps, MLflow params and other tools use
them, so rename nothing.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from klein_sweep.errors import ConfigError

# conf/ sits beside the package at the repository root (DESIGN.md fixes the top level).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")
# Schedules whose value at step s does not depend on the total number of steps: with these the
# model at step s of a long run *is* the s-step model, so steps can be checkpoints of one training.
TOTAL_INDEPENDENT_SCHEDULES = ("constant", "constant_with_warmup")
TARGET_PRESETS = ("attn", "all_linear")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
MODEL_KINDS = ("tiny", "mini", "pretrained")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE_MODES = ("none", "int8", "fp8")
DEVICES = ("auto", "cpu", "cuda", "mps")
OPTIMIZERS = ("adamw", "adamw8bit")
TRACKING_BACKENDS = ("mlflow", "none")
FEATURE_NETWORKS = ("auto", "mini", "random_conv", "inception", "dinov2", "clip")
IDENTITY_NETWORKS = ("auto", "same", "mini", "random_conv", "dinov2", "clip", "arcface")
METRIC_NETWORK_PATHS = ("inception", "dinov2", "clip", "arcface")


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Short name of the model, used in run names and cache keys (the `model=` group option)."""
    kind: str = "tiny"
    """`tiny`: a random tiny Flux2KleinPipeline built in code (offline, for tests and smoke runs);
    `mini`: the pre-trained miniature Klein shipped in the package (klein_sweep/mini);
    `pretrained`: load with `from_pretrained` from `path` (a hub id or a local folder)."""
    path: Optional[str] = None
    """Hub id (e.g. black-forest-labs/FLUX.2-klein-base-9B) or local folder; `pretrained` only."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of `path`; part of the encoding-cache key."""
    is_distilled: bool = False
    """True for the step-distilled Klein models (4 steps, no CFG). They are for evaluation only."""
    dtype: str = "auto"
    """Weights dtype of the frozen base: `auto` = bfloat16 on CUDA, float32 elsewhere."""
    text_encoder_layers: list = field(default_factory=lambda: [9, 18, 27])
    """Qwen3 hidden layers stacked into the prompt embedding. Klein uses (9, 18, 27); passed
    explicitly everywhere because diffusers' example script defaults to (10, 20, 30)."""
    max_sequence_length: int = 512
    """Text tokens per prompt (512 for the real models)."""
    sample_steps: int = 50
    """Denoising steps for preview/evaluation samples (base ~50, distilled 4)."""
    guidance_scale: float = 4.0
    """Real CFG scale for samples (base ~4; ignored by distilled models)."""
    seed: int = 0
    """Seed of the random weights of the `tiny` model (ignored for `pretrained`)."""
    quantize: str = "none"
    """Frozen transformer weights through torchao (`pip install 'klein_sweep[quant]'`): `int8`
    weight-only (about half of bf16's memory; any device), `fp8` weight-only (CUDA, Ada/Hopper
    or newer). The LoRA itself trains in float32 on top, as QLoRA-style trainers do."""

    def __post_init__(self):
        _choice("model.kind", self.kind, MODEL_KINDS)
        _choice("model.dtype", self.dtype, DTYPES)
        _choice("model.quantize", self.quantize, QUANTIZE_MODES)
        if not self.text_encoder_layers or any(
            not isinstance(i, int) or i < 0 for i in self.text_encoder_layers
        ):
            raise ConfigError(
                "model.text_encoder_layers", self.text_encoder_layers, "a non-empty list of layer indices >= 0"
            )
        _int_range("model.max_sequence_length", self.max_sequence_length, 1, 4096)
        _int_range("model.sample_steps", self.sample_steps, 1, 1000)
        _float_range("model.guidance_scale", self.guidance_scale, 0.0, 30.0)


@dataclass
class DataConfig:
    path: str = ""
    """Folder of training images (.png/.jpg/.jpeg/.webp/.bmp), each with an optional same-name .txt
    caption, the layout ai-toolkit and kohya users already have."""
    trigger: str = "sks"
    """Trigger word; replaces `[trigger]` in captions."""
    default_caption: str = "photo of [trigger]"
    """Caption for images without a .txt file."""
    caption_dropout: float = 0.05
    """Probability of training a sample on the empty prompt instead of its caption."""
    resolution: int = 32
    """Square training resolution in pixels: images are resized (short side) and center-cropped.
    Must be a multiple of 2 x the VAE's downscale factor (16 for the real models)."""
    cache_dir: str = ".klein_cache"
    """Where encoded latents and text embeddings are stored, keyed by content hash."""
    use_cache: bool = True
    """Read and write the on-disk encoding cache. Off: encode everything again in memory."""

    def __post_init__(self):
        if not self.path:
            raise ConfigError("data.path", self.path, "a folder of training images")
        if not self.trigger or any(c.isspace() for c in self.trigger):
            raise ConfigError("data.trigger", self.trigger, "a non-empty word without spaces")
        _float_range("data.caption_dropout", self.caption_dropout, 0.0, 1.0)
        _int_range("data.resolution", self.resolution, 8, 4096)


@dataclass
class TrainConfig:
    lr: float = 1e-4
    """AdamW learning rate of the LoRA parameters. Sweeps cover 5e-5 - 4e-4."""
    steps: Optional[int] = 1000
    """Optimizer steps (each = batch_size x grad_accum images). Overridden by `repeats` when set."""
    repeats: Optional[float] = None
    """Repeats per image, the trainers' unit: when set, steps = ceil(N x repeats / (batch_size x
    grad_accum)) for N training images, so changing grad_accum changes steps."""
    rank: int = 16
    """LoRA rank r."""
    alpha: Optional[float] = None
    """LoRA alpha; the update is scaled by alpha / rank. Default: equal to rank (scale 1)."""
    grad_accum: int = 1
    """Micro-batches accumulated into one optimizer step."""
    batch_size: int = 1
    """Images per micro-batch."""
    seed: int = 0
    """Seed of LoRA init, data order, noise, timesteps and caption dropout."""
    checkpoint_every: int = 250
    """Call the checkpoint callback (evaluation, LoRA snapshot) every this many steps; 0 = only at
    the end. The last step is always a checkpoint."""
    lr_schedule: str = "constant"
    """constant | constant_with_warmup | cosine | linear. Only the first two let one training
    stand for every shorter step count (see DESIGN.md)."""
    warmup_steps: int = 0
    """Linear warmup steps for the schedules that use it."""
    targets: str = "attn"
    """LoRA target preset: `attn` (attention q/k/v/out of double blocks, fused qkv+mlp and out of
    single blocks, as diffusers' Klein script) or `all_linear` (every Linear of the double and
    single blocks except modulation and norm, as musubi-tuner and ai-toolkit)."""
    lora_init: str = "gaussian"
    """PEFT LoRA init: `gaussian` (diffusers' choice) or `default` (kaiming A, zero B)."""
    optimizer: str = "adamw"
    """adamw | adamw8bit (bitsandbytes, CUDA only)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    timestep_sampling: str = "logit_normal"
    """uniform | logit_normal: how training noise levels sigma in (0, 1) are drawn."""
    logit_mean: float = 0.0
    """Mean of the logit-normal timestep density."""
    logit_std: float = 1.0
    """Std of the logit-normal timestep density."""
    timestep_shift: float = 1.0
    """Shift s applied to sampled sigma: s*t / (1 + (s-1)*t). >1 favours noisier timesteps."""
    gradient_checkpointing: bool = False
    """Recompute block activations in backward: less memory, ~30% slower."""
    mixed_precision: str = "auto"
    """auto (bf16 on CUDA, off elsewhere) | no | bf16."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu) | cpu | cuda | mps."""

    def __post_init__(self):
        _float_range("train.lr", self.lr, 0.0, 1.0, low_open=True)
        if self.steps is not None:
            _int_range("train.steps", self.steps, 1, 1_000_000)
        if self.repeats is not None:
            _float_range("train.repeats", self.repeats, 0.0, 100_000.0, low_open=True)
        if self.steps is None and self.repeats is None:
            raise ConfigError("train.steps", None, "an integer >= 1, or set train.repeats instead")
        _int_range("train.rank", self.rank, 1, 1024)
        if self.alpha is None:
            self.alpha = float(self.rank)
        _float_range("train.alpha", self.alpha, 0.0, 1e6, low_open=True)
        _int_range("train.grad_accum", self.grad_accum, 1, 1024)
        _int_range("train.batch_size", self.batch_size, 1, 1024)
        _int_range("train.checkpoint_every", self.checkpoint_every, 0, 1_000_000)
        _choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _int_range("train.warmup_steps", self.warmup_steps, 0, 1_000_000)
        if self.warmup_steps and self.lr_schedule == "constant":
            raise ConfigError("train.warmup_steps", self.warmup_steps, "0 with lr_schedule=constant; use constant_with_warmup")
        _choice("train.targets", self.targets, TARGET_PRESETS)
        _choice("train.lora_init", self.lora_init, ("gaussian", "default"))
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _float_range("train.weight_decay", self.weight_decay, 0.0, 1.0)
        _float_range("train.max_grad_norm", self.max_grad_norm, 0.0, 1e6)
        _choice("train.timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        _float_range("train.logit_std", self.logit_std, 0.0, 10.0, low_open=True)
        _float_range("train.timestep_shift", self.timestep_shift, 0.0, 100.0, low_open=True)
        _choice("train.mixed_precision", self.mixed_precision, ("auto", "no", "bf16"))
        _choice("train.device", self.device, DEVICES)

    @property
    def lora_scale(self) -> float:
        """alpha / rank: the factor PEFT applies to B @ A."""
        return self.alpha / self.rank

    @property
    def steps_are_checkpoints(self) -> bool:
        """True when the schedule at step s does not depend on the total step count."""
        return self.lr_schedule in TOTAL_INDEPENDENT_SCHEDULES


@dataclass
class EvalConfig:
    enabled: bool = False
    """Evaluate at checkpoints (samples and metrics). Off: only the training loss is tracked."""
    trigger_prompts: list = field(default_factory=lambda: ["photo of [trigger]"])
    """Prompts with the trigger: identity similarity and KID against the training images."""
    prior_prompts: list = field(default_factory=lambda: ["photo of a creature"])
    """Prompts without the trigger: prior preservation (LoRA vs base samples) and concept leak."""
    seeds: list = field(default_factory=lambda: [0, 1])
    """Fixed seeds; every prompt is sampled once per seed, identically in every trial."""
    screening_seeds: Optional[list] = None
    """Screening: evaluate every checkpoint with these seeds only (fewer samples; with
    screening_sample_steps, fewer denoising steps too) and give the full evaluation (`seeds`,
    `sample_steps`) only to the checkpoints that decide the result: the two best screened ones
    and the two around the first collapse; the best checkpoint is chosen on the full values. null = every checkpoint gets the full evaluation."""
    screening_sample_steps: Optional[int] = None
    """Denoising steps of the screening samples; null = sample_steps."""
    lora_scales: list = field(default_factory=lambda: [1.0])
    """LoRA strengths each checkpoint is evaluated at. 1.0 (as trained) decides collapse and the
    objective; the others are logged as eval_strength_S/* and the report shows whether a collapsed
    checkpoint is still usable at a lower strength. Each extra scale costs one more evaluation."""
    sample_steps: Optional[int] = None
    """Denoising steps; null = the model's recipe (model.sample_steps)."""
    guidance_scale: Optional[float] = None
    """CFG scale; null = the model's recipe (model.guidance_scale)."""
    resolution: Optional[int] = None
    """Sample resolution; null = data.resolution."""
    batch_size: int = 64
    """Images generated per pipeline call."""
    feature_network: str = "auto"
    """Feature network for KID/FID/IS: `mini` (trained on the mini world: attribute heads +
    identity embedding), `random_conv` (a fixed random conv net: generic low-level features, for
    the random tiny model), `inception` (FID's InceptionV3), `dinov2`, `clip`; `auto`: mini for
    model=mini, random_conv for tiny, inception for the real models."""
    identity_network: str = "auto"
    """Network whose embedding cosine is identity similarity: `same` (the feature network),
    `dinov2`, `clip`, `arcface` (faces; non-commercial weights), `mini`, `random_conv`; `auto`:
    the feature network for mini/tiny, dinov2 for the real models."""
    also_distilled: bool = False
    """Also evaluate every checkpoint's LoRA on the step-distilled model (4 steps, no CFG), logged
    as eval_distilled/*: does a LoRA trained on base transfer?"""
    distilled_model: Optional[str] = None
    """The `model=` option to evaluate on; null = the base model's counterpart
    (flux2_klein_base_9b -> flux2_klein_9b)."""
    distilled_path: Optional[str] = None
    """Hub id or local folder of the distilled weights (its model.path)."""
    prompt_fidelity: bool = False
    """Also log CLIP-T (eval/clip_t): CLIP cosine between prior samples and their prompts, i.e.
    does the model still follow prompts. Needs eval.network_paths.clip."""
    network_paths: dict = field(default_factory=lambda: {k: None for k in METRIC_NETWORK_PATHS})
    """Local folders of the real metric networks (nothing is downloaded at run time); a missing
    one is reported with what to download."""
    kid_subset_size: Optional[int] = None
    """KID subset size; null = fit to the sample count (min of the two set sizes)."""
    id_drop: float = 0.10
    """Collapsed when identity similarity falls this far (cosine) below the trial's running best."""
    kid_factor: float = 3.0
    """Collapsed when KID to the reference images rises past this factor of the trial's best."""
    prior_kid_factor: float = 3.0
    """Collapsed when prior-preservation KID rises past this factor of max(best, floor)."""
    prior_kid_floor: float = 0.02
    """Least floor under the best prior KID (early checkpoints sit at ~0, and a factor of ~0 is
    noise). The floor used is the larger of this and the KID noise measured on the base model
    (its prior samples against the same prompts with other seeds, |mean| + 3 std)."""
    leak_margin: float = 0.15
    """Collapsed when no-trigger samples are this much (cosine) more similar to the identity than
    the base model's no-trigger samples are: the character bleeds into every prompt."""
    degenerate_frac: float = 0.5
    """Collapsed when at least this fraction of samples is flat, pure noise or non-finite."""
    flat_std: float = 0.02
    """An image whose pixel std (in [0, 1] units) is below this is flat."""
    noise_level: float = 0.35
    """An image whose high-frequency energy share (Laplacian / std) is above this is noise."""
    underfit_margin: float = 0.05
    """Underfit while identity similarity is within this margin of the base model's."""
    overfit_sample_sim: float = 0.97
    """Overfit when trigger samples are this similar to each other (diversity gone)."""

    def __post_init__(self):
        for key in ("trigger_prompts", "prior_prompts", "seeds"):
            if self.enabled and not getattr(self, key):
                raise ConfigError(f"eval.{key}", getattr(self, key), "a non-empty list")
        if any(not isinstance(p, str) or "[trigger]" not in p for p in self.trigger_prompts):
            raise ConfigError("eval.trigger_prompts", self.trigger_prompts, "prompts that contain [trigger]")
        if any(not isinstance(p, str) or "[trigger]" in p for p in self.prior_prompts):
            raise ConfigError("eval.prior_prompts", self.prior_prompts, "prompts without [trigger]")
        if self.enabled:
            for key in ("trigger_prompts", "prior_prompts"):
                n = len(getattr(self, key)) * len(self.seeds)
                if n < 2:
                    raise ConfigError(f"eval.{key}", getattr(self, key), f"prompts x seeds >= 2 samples (KID compares sets; got {n})")
        if not self.lora_scales or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 2 for v in self.lora_scales):
            raise ConfigError("eval.lora_scales", self.lora_scales, "a non-empty list of strengths in (0, 2], e.g. [0.5, 0.75, 1.0]")
        self.lora_scales = sorted({float(v) for v in self.lora_scales} | {1.0})
        _choice("eval.feature_network", self.feature_network, FEATURE_NETWORKS)
        _choice("eval.identity_network", self.identity_network, IDENTITY_NETWORKS)
        unknown = set(self.network_paths or {}) - set(METRIC_NETWORK_PATHS)
        if unknown:
            raise ConfigError(f"eval.network_paths.{sorted(unknown)[0]}", "...", f"one of {', '.join(METRIC_NETWORK_PATHS)}")
        _int_range("eval.batch_size", self.batch_size, 1, 4096)
        if self.sample_steps is not None:
            _int_range("eval.sample_steps", self.sample_steps, 1, 1000)
        if self.screening_sample_steps is not None:
            _int_range("eval.screening_sample_steps", self.screening_sample_steps, 1, 1000)
        if self.screening_seeds is not None and self.enabled:
            n = min(len(self.trigger_prompts), len(self.prior_prompts)) * len(self.screening_seeds)
            if n < 2:
                raise ConfigError("eval.screening_seeds", self.screening_seeds, f"seeds giving prompts x seeds >= 2 samples (got {n})")
        for key in ("id_drop", "leak_margin", "degenerate_frac", "underfit_margin", "overfit_sample_sim"):
            _float_range(f"eval.{key}", getattr(self, key), 0.0, 1.0)
        for key in ("kid_factor", "prior_kid_factor"):
            _float_range(f"eval.{key}", getattr(self, key), 1.0, 1e6)


@dataclass
class TrackingConfig:
    backend: str = "mlflow"
    """mlflow | none."""
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI. The default is MLflow 3's own, so a bare `mlflow ui` in the same
    folder finds the runs. Several machines: an `mlflow server` URL."""
    experiment: str = "klein_sweep"
    """MLflow experiment for single trials (a sweep uses its own name)."""
    run_name: Optional[str] = None
    """MLflow run name; default: built from the model and the swept values."""

    def __post_init__(self):
        _choice("tracking.backend", self.backend, TRACKING_BACKENDS)
        if self.backend == "mlflow" and not self.uri:
            raise ConfigError("tracking.uri", self.uri, "an MLflow tracking URI such as sqlite:///mlflow.db")


SAMPLERS = ("grid", "tpe", "random")
SWEEP_ROLES = ("run", "prepare", "work")
PARAM_TYPES = ("categorical", "float", "int")
STEP_AXES = ("steps", "repeats")
OBJECTIVES = ("eval/id_sim", "eval/kid", "eval/prior_kid", "eval/fid", "eval/is", "eval/leak")
# Settings a sweep may vary: the training hyperparameters and the sampling of training data.
SWEEPABLE_PREFIXES = ("train.", "data.caption_dropout", "data.resolution")


@dataclass
class ParamSpec:
    """One axis of a sweep's search space."""

    type: str = "categorical"
    """categorical (a list of `values`; the grid sampler needs these) | float | int (low..high)."""
    values: Optional[list] = None
    """The choices of a categorical parameter."""
    low: Optional[float] = None
    """Lower bound of a float/int parameter."""
    high: Optional[float] = None
    """Upper bound of a float/int parameter."""
    log: bool = False
    """Sample on a log scale (learning rates)."""
    step: Optional[float] = None
    """Quantisation step of an int/float parameter."""


@dataclass
class SweepConfig:
    name: str = ""
    """Sweep name: the MLflow experiment, the Optuna study, the folder sweeps/<name>/."""
    objective: str = "eval/id_sim"
    """Metric optimised over non-collapsed checkpoints: one of OBJECTIVES."""
    direction: str = "maximize"
    """maximize | minimize."""
    sampler: str = "grid"
    """grid (every cell once) | tpe (Optuna TPE, constant liar for parallel workers) | random."""
    n_trials: Optional[int] = None
    """Trials to run (tpe/random; required there). Grid: every cell, this is ignored."""
    seed: int = 0
    """Sampler seed."""
    storage: Optional[str] = None
    """Optuna storage URL (sqlite:///..., postgresql://...); null = sqlite file sweeps/<name>/study.db."""
    output_dir: Optional[str] = None
    """Where the study, reports and trial files go; null = sweeps/<name>."""
    params: dict = field(default_factory=dict)
    """Search space: config key -> ParamSpec, nested as in the config (train: {lr: {type:
    categorical, values: [...]}}); flattened to dotted keys (train.lr) on load."""
    step_axis: str = "steps"
    """The report's column axis: `steps`, or `repeats` (repeats per image, for comparisons at
    equal repeats across grad_accum or batch sizes)."""
    repeats_values: Optional[list] = None
    """With step_axis=repeats: the repeats-per-image values to checkpoint at."""
    heartbeat_seconds: int = 30
    """A running trial records a heartbeat this often; one silent for 4x this is taken as dead
    and re-run."""
    role: str = "run"
    """run: prepare, work, write the report (one process, or several on one machine) |
    prepare: create the study, queue the grid, create the MLflow experiment and parent run, exit |
    work: take trials from a prepared study (the many-workers recipe: prepare once, then N work)."""
    worker: Optional[int] = None
    """A label only: lets a launcher array start N identical workers (hydra -m sweep.worker=0,1,2)."""

    def __post_init__(self):
        if not self.name:
            raise ConfigError("sweep.name", self.name, "a non-empty name")
        _choice("sweep.objective", self.objective, OBJECTIVES)
        _choice("sweep.direction", self.direction, ("maximize", "minimize"))
        _choice("sweep.sampler", self.sampler, SAMPLERS)
        _choice("sweep.step_axis", self.step_axis, STEP_AXES)
        if not self.params:
            raise ConfigError("sweep.params", self.params, "at least one parameter to sweep")
        specs = {}
        for key, raw in _flatten_specs(self.params).items():
            if not isinstance(raw, dict):
                raise ConfigError(f"sweep.params.{key}", raw, "a mapping with type and values or low/high")
            if not key.startswith(SWEEPABLE_PREFIXES):
                raise ConfigError(f"sweep.params.{key}", raw, f"a key under {', '.join(SWEEPABLE_PREFIXES)}")
            specs[key] = spec = build_dataclass(ParamSpec, raw, prefix=f"sweep.params.{key}")
            _check_param(key, spec, self.sampler)
        self.params = specs
        if self.sampler != "grid" and not self.n_trials:
            raise ConfigError("sweep.n_trials", self.n_trials, f"an integer >= 1 for sampler={self.sampler}")
        if self.n_trials is not None:
            _int_range("sweep.n_trials", self.n_trials, 1, 100_000)
        if self.step_axis == "repeats":
            if not self.repeats_values or any(not isinstance(r, (int, float)) or r <= 0 for r in self.repeats_values):
                raise ConfigError("sweep.repeats_values", self.repeats_values, "a list of positive numbers with step_axis=repeats")
            if "train.steps" in self.params:
                raise ConfigError("sweep.params.train.steps", "...", "not swept with step_axis=repeats (repeats set the steps)")
        _int_range("sweep.heartbeat_seconds", self.heartbeat_seconds, 1, 3600)
        _choice("sweep.role", self.role, SWEEP_ROLES)


def _flatten_specs(params: dict, prefix: str = "") -> dict:
    """{'train': {'lr': {type: ...}}} -> {'train.lr': {type: ...}}. Nested in YAML so that a
    command line can override `sweep.params.train.lr.values=[...]`."""
    out = {}
    for key, value in params.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value and not ({"type", "values", "low", "high"} & set(value)):
            out.update(_flatten_specs(value, dotted))
        else:
            out[dotted] = value
    return out


def _check_param(key: str, spec: ParamSpec, sampler: str) -> None:
    where = f"sweep.params.{key}"
    _choice(f"{where}.type", spec.type, PARAM_TYPES)
    if spec.type == "categorical":
        if not spec.values:
            raise ConfigError(f"{where}.values", spec.values, "a non-empty list of choices")
        if len(set(map(repr, spec.values))) != len(spec.values):
            raise ConfigError(f"{where}.values", spec.values, "choices without duplicates")
        return
    if sampler == "grid":
        raise ConfigError(f"{where}.type", spec.type, "categorical with sampler=grid (a grid needs explicit values)")
    if spec.low is None or spec.high is None:
        raise ConfigError(where, {"low": spec.low, "high": spec.high}, "both low and high")
    if spec.low > spec.high:
        raise ConfigError(f"{where}.low", spec.low, f"<= high ({spec.high})")
    if spec.log and spec.low <= 0:
        raise ConfigError(f"{where}.low", spec.low, "> 0 with log: true")


@dataclass
class Settings:
    """Everything one trial needs, validated."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: Optional[SweepConfig] = None
    output_dir: str = "outputs"
    """Where this run writes its local files (the LoRA, the resolved config)."""


GROUPS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "tracking": TrackingConfig}


def build_settings(cfg: dict[str, Any], output_dir: str = "outputs") -> Settings:
    """Validate a resolved config dict (``OmegaConf.to_container(cfg, resolve=True)``)."""
    parts = {}
    for group, cls in GROUPS.items():
        values = cfg.get(group) or {}
        if not isinstance(values, dict):
            raise ConfigError(group, values, f"a mapping of {cls.__name__} fields")
        parts[group] = build_dataclass(cls, values, prefix=group)
    sweep = cfg.get("sweep")
    if sweep is not None:
        if not isinstance(sweep, dict):
            raise ConfigError("sweep", sweep, "a sweep config (use +sweep=NAME)")
        parts["sweep"] = build_dataclass(SweepConfig, sweep, prefix="sweep")
    return Settings(**parts, output_dir=output_dir)


def build_dataclass(cls, values: dict[str, Any], prefix: str):
    """Build `cls` from a dict, rejecting unknown keys and values of the wrong type by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"{prefix}.{key}", values[key], f"unknown key; valid keys: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(f"{prefix}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint) -> Any:
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(key, value, "a value is required")
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "true or false")
    if base is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(key, value, "an integer")
        return int(value)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "a number")
        if not math.isfinite(value):
            raise ConfigError(key, value, "a finite number")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "a string")
        return value
    if base is list or typing.get_origin(base) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "a list")
        return list(value)
    return value


def _choice(key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(key, value, f"one of {', '.join(valid)}")


def _int_range(key: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(key, value, f"an integer in [{low}, {high}]")


def _float_range(key: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(key, value, f"a number in {bracket}{low:g}, {high:g}]")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}: MLflow params under their dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def register_resolvers() -> None:
    """`${asset:NAME}` in a config resolves to a folder shipped inside the package."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS_DIR / name))
