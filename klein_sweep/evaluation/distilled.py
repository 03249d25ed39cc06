"""Base -> distilled transfer: does a LoRA trained on the base model work on the step-distilled
one? With `eval.also_distilled`, every checkpoint's LoRA is also loaded into the distilled model
(after the compatibility check) and evaluated there with the distilled recipe (4 steps, no CFG),
logged as eval_distilled/*.

The distilled Klein models share the base's text encoder and VAE, so the cached prompt
embeddings serve both. On CUDA only one transformer sits on the GPU at a time: the base goes to
the CPU while the distilled one samples (a 9B pair would not fit 24 GB together).
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
    """The distilled pipeline, its own no-LoRA reference, and per-checkpoint evaluation of the
    training transformer's current LoRA on it."""

    def __init__(self, settings: Settings, base_pipe, encoded, examples, runtime):
        from klein_sweep.data.encoding import release_text_encoder, release_vae_encoder
        from klein_sweep.evaluation.evaluator import CheckpointEvaluator
        from klein_sweep.models.loading import load_pipeline

        self.model = distilled_model_config(settings)
        self.runtime = runtime
        self.base_pipe = base_pipe
        self.offload = runtime.device == "cuda"
        self.pipe = load_pipeline(self.model, runtime)
        release_text_encoder(self.pipe)  # prompts come from the shared cache
        release_vae_encoder(self.pipe)
        recipe_settings = dataclasses.replace(  # the distilled model's own settings: its samples' cache key
            settings, model=self.model,
            eval=dataclasses.replace(settings.eval, sample_steps=DISTILLED_STEPS, guidance_scale=DISTILLED_GUIDANCE),
        )
        self.evaluator = CheckpointEvaluator(recipe_settings, self.pipe, encoded, examples)
        if self.offload:
            self.pipe.transformer.to("cpu")  # on the GPU only while it samples
        with self._sampling():
            self.base = self.evaluator.compute_base()
        self.tmp = tempfile.TemporaryDirectory(prefix="klein-distilled-")

    @contextlib.contextmanager
    def _sampling(self):
        """On CUDA: the distilled transformer on the GPU, the base (being trained) on the CPU."""
        if not self.offload:
            yield
            return
        self.base_pipe.transformer.to("cpu")
        self.pipe.transformer.to(self.runtime.device)
        try:
            yield
        finally:
            self.pipe.transformer.to("cpu")
            self.base_pipe.transformer.to(self.runtime.device)

    def evaluate(self, trained_transformer) -> dict[str, float]:
        """The current LoRA of `trained_transformer`, checked, loaded into the distilled model,
        evaluated, unloaded."""
        from klein_sweep.lora.io import save_lora
        from klein_sweep.lora.compat import load_checked_lora

        # Through the file, as a user would ship it: its metadata carries alpha, which a bare
        # state dict would lose (an alpha != rank LoRA would load at the wrong strength).
        lora_file = save_lora(trained_transformer, Path(self.tmp.name))
        load_checked_lora(self.pipe, lora_file, self.model.name, adapter_name="checkpoint")
        try:
            with self._sampling():
                values, _ = self.evaluator.evaluate()
        finally:
            self.pipe.unload_lora_weights()
        return values
