"""Typed settings: the Hydra config becomes these dataclasses at the entry point, and nothing below
the entry point sees an OmegaConf object.

Every field has a docstring; every check names the dotted key and what would be valid. The dotted
keys (``train.lr``, ``data.trigger`` ...) are a contract: sweeps, MLflow params and other tools use
them, so rename nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from klein_sweep.config.checks import check_choice, check_float, check_int
from klein_sweep.config.sweep import SweepConfig
from klein_sweep.errors import ConfigError

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
        check_choice("model.kind", self.kind, MODEL_KINDS)
        check_choice("model.dtype", self.dtype, DTYPES)
        check_choice("model.quantize", self.quantize, QUANTIZE_MODES)
        if not self.text_encoder_layers or any(
            not isinstance(i, int) or i < 0 for i in self.text_encoder_layers
        ):
            raise ConfigError(
                "model.text_encoder_layers", self.text_encoder_layers, "a non-empty list of layer indices >= 0"
            )
        check_int("model.max_sequence_length", self.max_sequence_length, 1, 4096)
        check_int("model.sample_steps", self.sample_steps, 1, 1000)
        check_float("model.guidance_scale", self.guidance_scale, 0.0, 30.0)


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
    background: str = "white"
    """Colour transparent areas (RGBA, LA, palette transparency) are composited on: a colour name
    or #rrggbb. Most trainers drop the alpha channel, which turns transparent areas black."""
    max_megapixels: float = 64.0
    """Larger images are refused with a message (a decompression bomb, or a scan to downscale
    first); decoding one would take gigabytes of memory."""
    cache_dir: str = ".klein_cache"
    """Where encoded latents and text embeddings are stored, keyed by content hash."""
    use_cache: bool = True
    """Read and write the on-disk encoding cache. Off: encode everything again in memory."""

    def __post_init__(self):
        if not self.path:
            raise ConfigError("data.path", self.path, "a folder of training images")
        if not self.trigger or any(c.isspace() for c in self.trigger):
            raise ConfigError("data.trigger", self.trigger, "a non-empty word without spaces")
        check_float("data.caption_dropout", self.caption_dropout, 0.0, 1.0)
        check_int("data.resolution", self.resolution, 8, 4096)
        check_float("data.max_megapixels", self.max_megapixels, 0.0, 1000.0, low_open=True)
        try:
            from PIL import ImageColor

            ImageColor.getrgb(self.background)
        except ValueError:
            raise ConfigError("data.background", self.background, "a colour name (white, black, gray) or #rrggbb") from None


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
    stand for every shorter step count (see docs/design.md)."""
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
        check_float("train.lr", self.lr, 0.0, 1.0, low_open=True)
        if self.steps is not None:
            check_int("train.steps", self.steps, 1, 1_000_000)
        if self.repeats is not None:
            check_float("train.repeats", self.repeats, 0.0, 100_000.0, low_open=True)
        if self.steps is None and self.repeats is None:
            raise ConfigError("train.steps", None, "an integer >= 1, or set train.repeats instead")
        check_int("train.rank", self.rank, 1, 1024)
        if self.alpha is None:
            self.alpha = float(self.rank)
        check_float("train.alpha", self.alpha, 0.0, 1e6, low_open=True)
        check_int("train.grad_accum", self.grad_accum, 1, 1024)
        check_int("train.batch_size", self.batch_size, 1, 1024)
        check_int("train.checkpoint_every", self.checkpoint_every, 0, 1_000_000)
        check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_int("train.warmup_steps", self.warmup_steps, 0, 1_000_000)
        if self.warmup_steps and self.lr_schedule == "constant":
            raise ConfigError("train.warmup_steps", self.warmup_steps, "0 with lr_schedule=constant; use constant_with_warmup")
        check_choice("train.targets", self.targets, TARGET_PRESETS)
        check_choice("train.lora_init", self.lora_init, ("gaussian", "default"))
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        check_float("train.weight_decay", self.weight_decay, 0.0, 1.0)
        check_float("train.max_grad_norm", self.max_grad_norm, 0.0, 1e6)
        check_choice("train.timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        check_float("train.logit_std", self.logit_std, 0.0, 10.0, low_open=True)
        check_float("train.timestep_shift", self.timestep_shift, 0.0, 100.0, low_open=True)
        check_choice("train.mixed_precision", self.mixed_precision, ("auto", "no", "bf16"))
        check_choice("train.device", self.device, DEVICES)

    @property
    def lora_scale(self) -> float:
        """alpha / rank: the factor PEFT applies to B @ A."""
        return self.alpha / self.rank

    @property
    def steps_are_checkpoints(self) -> bool:
        """True when the schedule at step s does not depend on the total step count."""
        return self.lr_schedule in TOTAL_INDEPENDENT_SCHEDULES


@dataclass
class CollapseThresholds:
    """The collapse rules' thresholds (klein_sweep.evaluation.collapse), declared once: they are
    `eval.*` keys because EvalConfig inherits them. Their reasons are in docs/design.md."""

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
    kid_floor: float = 1e-3
    """Least floor under the best reference KID: a factor of a KID near 0 is noise."""
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
        for key in ("id_drop", "leak_margin", "degenerate_frac", "underfit_margin", "overfit_sample_sim", "flat_std", "noise_level"):
            check_float(f"eval.{key}", getattr(self, key), 0.0, 1.0)
        for key in ("kid_factor", "prior_kid_factor"):
            check_float(f"eval.{key}", getattr(self, key), 1.0, 1e6)
        for key in ("prior_kid_floor", "kid_floor"):
            check_float(f"eval.{key}", getattr(self, key), 0.0, 1e6)


@dataclass
class EvalConfig(CollapseThresholds):
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
    recipe: str = "auto"
    """Which defaults fill the recipe keys left null (resolution, sample_steps, screening_seeds,
    screening_sample_steps); a value you set always wins. `full`: every checkpoint sampled with
    every seed at the model's recipe (model.sample_steps) and data.resolution. `economy`: the
    real-model recipe of ECONOMY_RECIPE (512 px, 20 steps; screening every checkpoint with the
    first seed at 10 steps, full evaluation of the deciding checkpoints): evaluation at about a
    quarter of a 9B / 4B sweep's FLOPs instead of ~80% (docs/evaluation_cost.md). `auto`:
    economy for real (pretrained) models, full for the mini and tiny worlds, where sampling is
    cheap."""
    sample_steps: Optional[int] = None
    """Denoising steps; null = the recipe's (model.sample_steps with recipe full)."""
    guidance_scale: Optional[float] = None
    """CFG scale; null = the model's recipe (model.guidance_scale)."""
    resolution: Optional[int] = None
    """Sample resolution; null = the recipe's (data.resolution with recipe full)."""
    batch_size: int = 64
    """Images generated per pipeline call."""
    feature_network: str = "auto"
    """Feature network for KID/FID/IS: `mini` (trained on the mini world: attribute heads +
    identity embedding), `random_conv` (a fixed random conv net: generic low-level features, for
    the random tiny model), `inception` (FID's InceptionV3), `dinov2`, `clip` (embeddings without a
    class head: the Inception Score is then not computed, eval/is is absent); `auto`: mini for
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
        check_choice("eval.feature_network", self.feature_network, FEATURE_NETWORKS)
        check_choice("eval.identity_network", self.identity_network, IDENTITY_NETWORKS)
        unknown = set(self.network_paths or {}) - set(METRIC_NETWORK_PATHS)
        if unknown:
            raise ConfigError(f"eval.network_paths.{sorted(unknown)[0]}", "...", f"one of {', '.join(METRIC_NETWORK_PATHS)}")
        check_int("eval.batch_size", self.batch_size, 1, 4096)
        check_choice("eval.recipe", self.recipe, ("auto", "full", "economy"))
        if self.sample_steps is not None:
            check_int("eval.sample_steps", self.sample_steps, 1, 1000)
        if self.screening_sample_steps is not None:
            check_int("eval.screening_sample_steps", self.screening_sample_steps, 1, 1000)
        if self.screening_seeds is not None and self.enabled:
            n = min(len(self.trigger_prompts), len(self.prior_prompts)) * len(self.screening_seeds)
            if n < 2:
                raise ConfigError("eval.screening_seeds", self.screening_seeds, f"seeds giving prompts x seeds >= 2 samples (got {n})")
        super().__post_init__()


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
        check_choice("tracking.backend", self.backend, TRACKING_BACKENDS)
        if self.backend == "mlflow" and not self.uri:
            raise ConfigError("tracking.uri", self.uri, "an MLflow tracking URI such as sqlite:///mlflow.db")



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

