"""Typed settings: the Hydra config becomes these dataclasses at the entry point, and nothing below
the entry point sees an OmegaConf object.

Every field has a docstring; every check names the dotted key and what would be valid. The dotted
keys (``train.lr``, ``data.trigger`` ...) are a contract: sweeps, MLflow params and other tools use
them, so rename nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from klein_sweep.config.checks import check_choice, check_float, check_int
from klein_sweep.config.evaluation import FEATURE_NETWORKS, IDENTITY_NETWORKS, METRIC_NETWORK_PATHS, CollapseThresholds, EvalConfig
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
    class_word: Optional[str] = None
    """The subject's class ("woman", "dog", "car") for a real model's evaluation prompts ("photo
    of [trigger] woman in a cafe"; "photo of a woman" probes leak). null = the word that most
    often follows the trigger in the captions; none there = a style LoRA (style prompts)."""
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
    max_images: Optional[int] = None
    """Train on the first N images of the folder in a fixed shuffled order (the same for every
    run, so 5 images are a subset of 10): how the boundary moves with the dataset's size
    (+sweep=lr_vs_steps_images). null = every image; more than the folder holds is refused."""
    cache_dir: str = ".klein_cache"
    """Where encoded latents and text embeddings are stored, keyed by content hash."""
    use_cache: bool = True
    """Read and write the on-disk encoding cache. Off: encode everything again in memory."""

    def __post_init__(self):
        if not self.path:
            raise ConfigError("data.path", self.path, "a folder of training images")
        if not self.trigger or any(c.isspace() for c in self.trigger):
            raise ConfigError("data.trigger", self.trigger, "a non-empty word without spaces")
        if self.class_word is not None and (not isinstance(self.class_word, str) or not self.class_word.strip()):
            raise ConfigError("data.class_word", self.class_word, "a word such as woman, man, dog, or null to infer it from the captions")
        check_float("data.caption_dropout", self.caption_dropout, 0.0, 1.0)
        check_int("data.resolution", self.resolution, 8, 4096)
        check_float("data.max_megapixels", self.max_megapixels, 0.0, 1000.0, low_open=True)
        if self.max_images is not None:
            check_int("data.max_images", self.max_images, 1, 1_000_000)
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
    timestep_shift: Optional[Any] = None
    """Shift s applied to sampled sigma: s*t / (1 + (s-1)*t); >1 favours noisier timesteps.
    A number; `auto`: the shift FLUX.2's pipeline samples with at the training resolution's
    token count and the model's sample_steps (diffusers' compute_empirical_mu: 7.6 for 1024 px
    at 50 steps); null = the model's default (training/trial.py DEFAULT_TIMESTEP_SHIFT: auto for
    the real models; the mini world's measured choice). docs/design.md compares the references."""
    gradient_checkpointing: bool = False
    """Recompute block activations in backward: less memory, ~30% slower."""
    compile: bool = False
    """torch.compile the transformer's repeated blocks (each block class compiled once) before
    training: fuses the elementwise work around the matmuls (LoRA scaling and sums, modulation,
    casts). The first steps pay the compile time, and each new batch shape (lanes leaving) its own."""
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
        if self.timestep_shift not in (None, "auto"):
            if isinstance(self.timestep_shift, str):
                raise ConfigError("train.timestep_shift", self.timestep_shift, "a number in (0, 100], auto, or null for the model's default")
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

