"""Every check that needs only the model's config files or the environment, run on every cell's
settings before a study, an MLflow run or any file exists. Without it, a resolution the VAE
cannot take or a missing optional package would fail each trial in turn, after the study and
its MLflow parent were created.

    check_settings(settings)   ConfigError / ModelError naming the key, the value and what is valid

The model is never loaded: sizes come from the config.json files of a local model folder, the
shipped mini model, the tiny model's code, or the registry for the known hub models.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from klein_sweep.config import ModelConfig, Settings
from klein_sweep.errors import ConfigError, ModelError
from klein_sweep.models.registry import KLEIN_TEXT_ENCODER_CONFIGS, MINI_DISTILLED_DIR, MINI_PIPELINE_DIR, download_command, model_size


@dataclass(frozen=True)
class ModelShape:
    """What the settings must fit: text-encoder depth and the VAE's downscale factor."""

    text_layers: int
    vae_scale_factor: int

    @property
    def resolution_multiple(self) -> int:
        return 2 * self.vae_scale_factor  # latents are packed in 2x2 patches


def model_shape(model: ModelConfig) -> ModelShape | None:
    """The shape from config files alone; None when nothing local describes the model (a hub id
    klein_sweep does not know, not yet downloaded)."""
    if model.kind == "tiny":
        return ModelShape(text_layers=3, vae_scale_factor=2)  # klein_sweep.models.tiny's architecture
    if model.kind == "mini":
        return _shape_from_folder(MINI_PIPELINE_DIR)
    if model.path and Path(model.path).is_dir():
        return _shape_from_folder(Path(model.path))
    size = model_size(model.name)
    if size and not model.path:
        return ModelShape(text_layers=KLEIN_TEXT_ENCODER_CONFIGS[size]["num_hidden_layers"], vae_scale_factor=8)
    return None


def _shape_from_folder(folder: Path) -> ModelShape:
    def config(part: str) -> dict:
        path = folder / part / "config.json"
        if not path.exists():
            raise ModelError(f"model.path: {folder} is not a Flux2KleinPipeline folder: {path} is missing "
                             "(a folder written by save_pretrained or downloaded with hf download ORG/NAME --local-dir DIR)")
        return json.loads(path.read_text())

    text, vae = config("text_encoder"), config("vae")
    return ModelShape(text_layers=int(text["num_hidden_layers"]), vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1))


def check_model(model: ModelConfig, resolution: int, key: str = "data.resolution") -> None:
    """Resolution and text layers against the model's shape; a local model folder must exist."""
    if model.kind == "pretrained" and model.path and not _is_hub_id(model.path) and not Path(model.path).expanduser().is_dir():
        raise ModelError(f"model.path: folder {model.path} does not exist; download the weights once "
                         f"({download_command(model.name)}) and set model.path=DIR")
    if model.kind == "mini" and model.is_distilled:
        if not (MINI_DISTILLED_DIR / "config.json").exists():
            raise ModelError(f"{key}: the distilled mini is missing from {MINI_DISTILLED_DIR}; build it with "
                             "python -m klein_sweep.mini.build --only distilled")
    shape = model_shape(model)
    if shape is None:
        return
    if resolution % shape.resolution_multiple:
        lower = resolution - resolution % shape.resolution_multiple
        raise ConfigError(key, resolution, f"a multiple of {shape.resolution_multiple} for model {model.name} "
                                           f"(its VAE downscales by {shape.vae_scale_factor}, latents pack 2x2), e.g. {lower or shape.resolution_multiple}")
    deepest = max(model.text_encoder_layers)
    if deepest > shape.text_layers:
        raise ConfigError("model.text_encoder_layers", model.text_encoder_layers,
                          f"layer indices <= {shape.text_layers}: the text encoder of {model.name} has {shape.text_layers} layers")


def _is_hub_id(path: str) -> bool:
    """org/name, as the hub spells model ids (a path that does not exist locally and looks like one)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) is not None and not Path(path).expanduser().exists()


def check_environment(settings: Settings) -> None:
    """Device and optional packages the settings ask for."""
    t, m = settings.train, settings.model
    wants_cuda = t.device == "cuda" or m.quantize == "fp8" or t.optimizer == "adamw8bit"
    if wants_cuda or t.device == "mps":
        import torch

        if t.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device", "cuda", "auto or cpu: no CUDA device is visible on this machine")
        if t.device == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("train.device", "mps", "auto or cpu: no Apple GPU (MPS) is available on this machine")
        if t.optimizer == "adamw8bit" and not torch.cuda.is_available():
            raise ConfigError("train.optimizer", "adamw8bit", "adamw on a machine without CUDA (8-bit AdamW runs on CUDA only)")
        if m.quantize == "fp8" and not torch.cuda.is_available():
            raise ConfigError("model.quantize", "fp8", "int8 or none on a machine without CUDA (fp8 needs an Ada/Hopper GPU)")
    if t.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("train.optimizer", "adamw8bit", "adamw, or install bitsandbytes: pip install 'klein_sweep[bnb]'")
    if m.quantize != "none" and importlib.util.find_spec("torchao") is None:
        raise ConfigError("model.quantize", m.quantize, "none, or install torchao: pip install 'klein_sweep[quant]'")


def check_network_packages(settings: Settings) -> None:
    """The packages of the metric networks the evaluation will use (eval.feature_network,
    eval.identity_network, `auto` decided for the model; CLIP for eval.prompt_fidelity) import.
    They are imported only when the evaluator is built, after the model has loaded."""
    from klein_sweep.evaluation.network_choice import PACKAGES, resolve_networks

    e = settings.eval
    feature, identity = resolve_networks(e, settings.model.kind)
    chosen = [("eval.feature_network", e.feature_network, feature), ("eval.identity_network", e.identity_network, identity)]
    if e.prompt_fidelity:
        chosen.append(("eval.prompt_fidelity", e.prompt_fidelity, "clip"))
    for key, value, network in chosen:
        if network not in PACKAGES:
            continue
        problem = _package_problem(network)
        if problem is None:
            continue
        install = PACKAGES[network][1]
        if key == "eval.prompt_fidelity":
            raise ConfigError(key, value, f"false, or the packages CLIP-T needs: {problem}; {install}")
        picked = f"; {key}=auto picks {network} for model {settings.model.name}" if value == "auto" else ""
        raise ConfigError(key, network, f"another network, or the packages {network} needs: {problem}; {install}{picked}")


def _package_problem(network: str) -> str | None:
    """Why `network`'s packages would not import, or None. Found with find_spec (nothing is
    imported); the ones in IMPORT_CHECKED are imported, since an installed build for another torch
    fails only then."""
    from klein_sweep.evaluation.network_choice import IMPORT_CHECKED, PACKAGES

    for module, pip in PACKAGES[network][0]:
        if importlib.util.find_spec(module) is None:
            return f"{pip} is not installed"
    for module, pip in PACKAGES[network][0]:
        if module in IMPORT_CHECKED:
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - any failure of a broken build
                import torch

                first = (str(exc).splitlines() or [""])[0]
                return (f"{pip} is installed but does not import ({exc.__class__.__name__}: {first}); "
                        f"install the {pip} build made for torch {torch.__version__}")
    return None


def check_settings(settings: Settings, planning_only: bool = False) -> None:
    """Everything about one cell's settings that can be known without loading a model.
    planning_only (a cost preview): the settings and the model's shape, not this machine's
    devices, packages or metric-network weights, since nothing will run here."""
    if settings.model.is_distilled:
        raise ConfigError("model", settings.model.name, "a base model to train on; distilled models are for evaluation only")
    check_model(settings.model, settings.data.resolution)
    if settings.eval.enabled and settings.eval.resolution:
        check_model(settings.model, settings.eval.resolution, key="eval.resolution")
    if planning_only:
        return
    check_environment(settings)
    if settings.eval.enabled:
        from klein_sweep.evaluation.network_choice import check_networks_available

        check_networks_available(settings.eval, settings.model.kind)
        check_network_packages(settings)
        if settings.eval.also_distilled:
            from klein_sweep.evaluation.distilled import distilled_model_config

            distilled = distilled_model_config(settings)  # a name with no counterpart fails here
            check_model(distilled, settings.eval.resolution or settings.data.resolution, key="eval.distilled_model")
