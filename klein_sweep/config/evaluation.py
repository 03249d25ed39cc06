"""The evaluation's settings: the collapse rules' thresholds and everything `eval.*` (what is
sampled, measured and how often). Part of the typed settings of schema.py, kept in its own module
for size; the dotted keys are the same contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from klein_sweep.config.checks import check_choice, check_float, check_int
from klein_sweep.errors import ConfigError

FEATURE_NETWORKS = ("auto", "mini", "random_conv", "inception", "dinov2", "clip")
IDENTITY_NETWORKS = ("auto", "same", "mini", "random_conv", "dinov2", "clip", "arcface")
METRIC_NETWORK_PATHS = ("inception", "dinov2", "clip", "arcface")


@dataclass
class CollapseThresholds:
    """The collapse rules' thresholds (klein_sweep.evaluation.collapse), declared once: they are
    `eval.*` keys because EvalConfig inherits them. Each is a ratio on a scale the sweep measures
    at its start - the base model at one end, the training images at the other - so one default
    means the same on every metric network (the mini net, Inception, DINOv2, CLIP, ArcFace).
    Their reasons and calibration are in docs/design.md."""

    leak_frac: float = 0.175
    """Collapsed when the no-trigger samples have come this fraction of the way from the base
    model's similarity to the training images towards the training images' own similarity to
    each other: the character bleeds into every prompt. (0.175 reproduces the mini world's
    boundaries, where the absolute rule was 0.15 cosine above the base.)"""
    id_drop_frac: float = 0.2
    """Collapsed when identity falls this fraction of the base-to-training-images scale below the
    trial's running best: identity peaks, then the LoRA overcooks."""
    kid_factor: float = 3.0
    """Collapsed when KID to the training images rises past this factor of the trial's best (a
    ratio: the same on every feature network)."""
    kid_floor_frac: float = 0.01
    """Floor under the best reference KID, as a fraction of the base model's own KID to the
    training images: a factor of a KID near 0 is noise."""
    prior_kid_factor: float = 3.0
    """Collapsed when prior-preservation KID rises past this factor of max(best, floor)."""
    prior_kid_floor_frac: float = 0.05
    """Least floor under the best prior KID, as a fraction of the distance between the base
    model's prior samples and the training images (their KID): early checkpoints sit near 0,
    where a factor is noise. The floor used is the larger of this and the base model's own seed
    noise (its prior samples against the same prompts with other seeds, |mean| + 3 std)."""
    degenerate_frac: float = 0.5
    """Collapsed when at least this fraction of samples is flat, pure noise or non-finite."""
    flat_std: float = 0.02
    """An image whose pixel std (in [0, 1] units) is below this is flat."""
    noise_level: float = 0.35
    """An image whose high-frequency energy share (Laplacian / std) is above this is noise."""
    underfit_frac: float = 0.1
    """Underfit while identity has come less than this fraction of the way from the base model's
    to the training images' own similarity: nothing learned yet."""
    overfit_frac: float = 0.9
    """Overfit when the trigger samples are this fraction of the way from the training images'
    own variety (their mean pairwise similarity) to identical copies: diversity gone."""

    def __post_init__(self):
        for key in ("leak_frac", "id_drop_frac", "degenerate_frac", "underfit_frac", "overfit_frac", "flat_std", "noise_level",
                    "kid_floor_frac", "prior_kid_floor_frac"):
            check_float(f"eval.{key}", getattr(self, key), 0.0, 1.0)
        for key in ("kid_factor", "prior_kid_factor"):
            check_float(f"eval.{key}", getattr(self, key), 1.0, 1e6)


@dataclass
class EvalConfig(CollapseThresholds):
    enabled: bool = False
    """Evaluate at checkpoints (samples and metrics). Off: only the training loss is tracked."""
    trigger_prompts: Optional[list] = None
    """Prompts with the trigger: identity similarity and KID against the training images.
    null = the model's world's (klein_sweep/evaluation/prompts.py): the mini world's own prompts
    for mini and tiny; for a real model, prompts built from data.trigger and the class word
    (data.class_word, or inferred from the captions), or style prompts when there is none."""
    prior_prompts: Optional[list] = None
    """Prompts without the trigger: prior preservation (LoRA vs base samples) and concept leak.
    null = the model's world's (see trigger_prompts): for a real character, the class word
    without the trigger (the leak probe) and unrelated scenes."""
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
    every seed at the model's recipe (model.sample_steps) and data.resolution. `economy`
    (config/recipes.py ECONOMY_RECIPE, relative to the model's own recipe): at most 512 px at the
    model's own steps (fewer moved the mini world's boundary); every checkpoint screened with the
    first seed, the full evaluation where it decides (docs/evaluation_cost.md, which also measures
    its agreement with the full recipe on three mini-world sweeps). `auto`: economy for the real
    models and the mini world, full for the random tiny model (tests, smoke runs)."""
    validation_every: Optional[int] = None
    """Steps between validation-loss checkpoints (val/fit_loss, val/prior_loss: forward passes
    on fixed inputs, no sampling), on top of the sampled checkpoints, which always get them too;
    null = the recipe's (full: 250, economy: 500); 0 = only at the sampled checkpoints."""
    validation_images: Optional[int] = None
    """Images in each validation loss: the first training images (file order) for val/fit_loss,
    the first base samples of the prior prompts (one per prompt before a second seed) for
    val/prior_loss; null = the recipe's (full: 8, economy: 2)."""
    validation_sigmas: list = field(default_factory=lambda: [0.25, 0.5, 0.75])
    """The fixed noise levels of both validation losses; each image is noised once at each."""
    validation_seed: int = 0
    """Seed of the validation noise: the same inputs in every trial."""
    validation_trigger: Optional[float] = 0.05
    """Screening by the cheap signal: a validation checkpoint where val/prior_loss rose at least
    this much since the last sampled evaluation gets a sampled evaluation too (the prior moved:
    look now rather than at the next planned checkpoint). In flow-matching loss units; on the
    mini world it reaches 0.07 after 2500 steps at lr 5e-5 and 0.25-0.28 by the lr 4e-4
    collapse at step 1750-1800 (docs/evaluation_cost.md).
    null = sample only at the planned checkpoints."""
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
        for key in ("trigger_prompts", "prior_prompts"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, list) or not value):
                raise ConfigError(f"eval.{key}", value, "a non-empty list of prompts, or null for the model's own")
        if self.enabled and not self.seeds:
            raise ConfigError("eval.seeds", self.seeds, "a non-empty list")
        if any(not isinstance(p, str) or "[trigger]" not in p for p in self.trigger_prompts or []):
            raise ConfigError("eval.trigger_prompts", self.trigger_prompts, "prompts that contain [trigger]")
        if any(not isinstance(p, str) or "[trigger]" in p for p in self.prior_prompts or []):
            raise ConfigError("eval.prior_prompts", self.prior_prompts, "prompts without [trigger]")
        if self.enabled and self.trigger_prompts is not None and self.prior_prompts is not None:
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
        if self.validation_every is not None:
            check_int("eval.validation_every", self.validation_every, 0, 10**7)
        if self.validation_images is not None:
            check_int("eval.validation_images", self.validation_images, 1, 4096)
        check_int("eval.validation_seed", self.validation_seed, 0, 2**63 - 1)
        if self.validation_trigger is not None:
            check_float("eval.validation_trigger", self.validation_trigger, 0.0, 1e6, low_open=True)
        if (not isinstance(self.validation_sigmas, (list, tuple)) or not self.validation_sigmas
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1 for v in self.validation_sigmas)):
            raise ConfigError("eval.validation_sigmas", self.validation_sigmas, "a non-empty list of noise levels in (0, 1), e.g. [0.25, 0.5, 0.75]")
        self.validation_sigmas = [float(v) for v in self.validation_sigmas]
        if self.screening_sample_steps is not None:
            check_int("eval.screening_sample_steps", self.screening_sample_steps, 1, 1000)
        if self.screening_seeds is not None and self.enabled and self.trigger_prompts and self.prior_prompts:
            n = min(len(self.trigger_prompts), len(self.prior_prompts)) * len(self.screening_seeds)
            if n < 2:
                raise ConfigError("eval.screening_seeds", self.screening_seeds, f"seeds giving prompts x seeds >= 2 samples (got {n})")
        super().__post_init__()
