"""Base -> distilled transfer: does a LoRA trained on the base model work on the step-distilled
one? With `eval.also_distilled`, every checkpoint's LoRA is also loaded into the distilled model
(after the compatibility check) and evaluated there with the distilled recipe (4 steps, no CFG),
logged as eval_distilled/*.

The distilled Klein models share the base's text encoder and VAE, so only the distilled
transformer is loaded: the cached prompt embeddings serve both, the base's VAE decodes both. Only
one transformer sits on the accelerator at a time: the distilled one waits on the host and
visits only to sample, while the base (being trained) waits on the host (a 9B pair would not fit
24 GB together; models/placement.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path

from klein_sweep.config import CONF_DIR, ModelConfig, Settings, build_dataclass
from klein_sweep.errors import ConfigError
from klein_sweep.models.registry import DISTILLED_COUNTERPART, DISTILLED_GUIDANCE, DISTILLED_STEPS


def distilled_model_config(settings: Settings) -> ModelConfig:
    """The model config of the distilled model to evaluate on: eval.distilled_model (a `model=`
    option name), or the base model's counterpart; eval.distilled_path sets where it loads from."""
    from omegaconf import OmegaConf

    e = settings.eval
    name = e.distilled_model or DISTILLED_COUNTERPART.get(settings.model.name)
    if name is None:
        raise ConfigError(
            "eval.distilled_model", None,
            f"a model option to evaluate on: {settings.model.name} has no distilled counterpart "
            f"(known: {', '.join(f'{b} -> {d}' for b, d in DISTILLED_COUNTERPART.items())}); "
            f"eval.distilled_model={settings.model.name} checks the distilled recipe (4 steps, no CFG) on the same weights",
        )
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        options = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise ConfigError("eval.distilled_model", name, f"one of {', '.join(options)}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if e.distilled_path:
        raw["path"] = e.distilled_path
    return build_dataclass(ModelConfig, raw, prefix="eval.distilled_model")


class DistilledEvaluator:
    """The distilled transformer on the base's VAE, its own no-LoRA reference, and per-checkpoint
    evaluation of the training transformer's current LoRA on it."""

    def __init__(self, settings: Settings, base_pipe, encoded, examples, runtime, placement=None):
        import copy

        from diffusers import Flux2KleinPipeline

        from klein_sweep.evaluation.evaluator import CheckpointEvaluator
        from klein_sweep.models.loading import load_transformer
        from klein_sweep.models.placement import Placement

        self.model = distilled_model_config(settings)
        self.runtime = runtime
        self.base_pipe = base_pipe
        self.placement = placement or Placement(runtime.device)
        transformer = load_transformer(self.model, runtime)  # on the host until it samples
        self.pipe = Flux2KleinPipeline(scheduler=copy.deepcopy(base_pipe.scheduler), vae=base_pipe.vae, text_encoder=None,
                                       tokenizer=None, transformer=transformer, is_distilled=self.model.is_distilled)
        recipe_settings = dataclasses.replace(  # the distilled model's own settings: its samples' cache key
            settings, model=self.model,
            eval=dataclasses.replace(settings.eval, sample_steps=DISTILLED_STEPS, guidance_scale=DISTILLED_GUIDANCE),
        )
        self.evaluator = CheckpointEvaluator(recipe_settings, self.pipe, encoded, examples, self.placement, stage_prefix="distilled ")
        with self._sampling():
            self.base = self.evaluator.compute_base()
        self.tmp = tempfile.TemporaryDirectory(prefix="klein-distilled-")

    @contextlib.contextmanager
    def _sampling(self):
        """The distilled transformer on the accelerator, the base (being trained) on the host."""
        self.placement.to_host("transformer", self.base_pipe.transformer)
        try:
            with self.placement.visiting("distilled_transformer", self.pipe.transformer):
                yield
        finally:
            self.placement.to_device("transformer", self.base_pipe.transformer)

    def evaluate(self, trained_transformer) -> dict[str, float]:
        """The current LoRA of `trained_transformer`, checked, loaded into the distilled model,
        evaluated, unloaded."""
        from klein_sweep.lora.io import save_lora
        from klein_sweep.lora.compat import load_checked_lora

        # Through the file, as a user would ship it: its metadata carries alpha.
        lora_file = save_lora(trained_transformer, Path(self.tmp.name))
        load_checked_lora(self.pipe, lora_file, self.model.name, adapter_name="checkpoint")
        try:
            with self._sampling():
                values, _ = self.evaluator.evaluate()
        finally:
            self.pipe.unload_lora_weights()
        return values
