"""Load a Flux2KleinPipeline: the real Klein models from a hub id or a local folder, the shipped
mini model, or the tiny random one built in code. Model ids come from registry.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from klein_sweep.config import ModelConfig
from klein_sweep.errors import ModelError
from klein_sweep.models.registry import (KNOWN_MODELS, MINI_DISTILLED_DIR, MINI_PIPELINE_DIR, download_command, klein_transformer_config,
                                         model_size)


@dataclass
class Runtime:
    """Where and in which precision the model runs."""

    device: str
    dtype: "torch.dtype"  # noqa: F821 - torch imported lazily


def pick_runtime(model: ModelConfig, device: str = "auto") -> Runtime:
    """cuda -> mps -> cpu unless told; bf16 weights on CUDA, fp32 elsewhere unless told."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ModelError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    dtype_name = model.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device == "cuda" else "float32"
    return Runtime(device=device, dtype=getattr(torch, dtype_name))


def model_source(model: ModelConfig) -> str:
    """The hub id or folder a pretrained model loads from."""
    if model.path:
        return model.path
    if model.name in KNOWN_MODELS:
        return KNOWN_MODELS[model.name]
    raise ModelError(
        f"model.path is not set and model.name '{model.name}' is not a known model "
        f"({', '.join(KNOWN_MODELS)}); set model.path to a hub id or a local folder"
    )


def model_cache_id(model: ModelConfig) -> str:
    """What identifies the weights, for the encoding-cache key."""
    if model.kind == "tiny":
        from klein_sweep.models.tiny import TINY_VERSION

        return f"tiny-v{TINY_VERSION}-seed{model.seed}"
    if model.kind == "mini":
        # The shipped weights can be rebuilt: key on the content of what encodes (the
        # transformer does not), not on a name.
        digest = hashlib.sha256()
        for part, pattern in (("vae", "*.safetensors"), ("text_encoder", "*.safetensors"), ("tokenizer", "*")):
            for f in sorted((MINI_PIPELINE_DIR / part).glob(pattern)):
                digest.update(f.read_bytes())
        return f"mini-{digest.hexdigest()[:16]}"
    quantized = f"+{model.quantize}" if model.quantize != "none" else ""  # the text encoder is quantised with the base
    return f"{model_source(model)}@{model.revision or 'main'}{quantized}"


def transformer_id(model: ModelConfig) -> str:
    """What identifies the transformer's weights and the model's settings, for caches of what the
    base model draws (the encoding cache's key leaves the transformer out: it does not encode)."""
    digest = hashlib.sha256(repr(model).encode())  # dtype, quantisation, recipe, path, revision, ...
    if model.kind == "mini":
        folder = MINI_DISTILLED_DIR if model.is_distilled else MINI_PIPELINE_DIR / "transformer"
        for f in sorted(folder.glob("*.safetensors")):
            digest.update(f.read_bytes())
    elif model.kind != "tiny":  # the tiny model is built in code: its version and seed are in the repr's key below
        local = Path(model_source(model)) / "transformer"
        if local.is_dir():  # a local folder: a replaced weights file changes its size or time
            for f in sorted(local.iterdir()):
                stat = f.stat()
                digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{model_cache_id(model)}/{digest.hexdigest()[:16]}"


@contextlib.contextmanager
def quiet_loading(model: ModelConfig):
    """Loading without progress bars for the embedded models, which load in a fraction of a
    second (a sweep's workers would each draw theirs); the real models keep theirs."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = [m for m in (diffusers_logging, transformers_logging) if model.kind in ("mini", "tiny") and m.is_progress_bar_enabled()]
    try:
        for m in bars:
            m.disable_progress_bar()
        yield
    finally:
        for m in bars:
            m.enable_progress_bar()


def load_pipeline(model: ModelConfig, runtime: Runtime):
    """The full pipeline (transformer, VAE, text encoder, tokenizer, scheduler) in `runtime`'s
    dtype, on the host: models/placement.py moves each part to the accelerator for the stage
    that needs it (a 9B's text encoder and transformer never sit there together). Quantisation
    happens here, before anything moves."""
    with quiet_loading(model):
        pipe = _load_parts(model, runtime)
    pipe.register_to_config(is_distilled=model.is_distilled)
    if pipe.transformer.dtype != runtime.dtype:  # from_pretrained already loaded in runtime.dtype
        pipe.to(dtype=runtime.dtype)
    if model.quantize != "none":
        quantize_weights(pipe.transformer, model.quantize, runtime.device)
        # The text encoder too, for the few seconds it encodes: a 9B's Qwen3-8B is 16 GB in bf16,
        # too much for the 16 GB cards a quantised base is for. Its embeddings are cached under a
        # key that names the quantisation.
        quantize_weights(pipe.text_encoder, model.quantize, runtime.device)
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
        part.eval()
    return pipe


def _load_parts(model: ModelConfig, runtime: Runtime):
    if model.kind == "tiny":
        from klein_sweep.models.tiny import build_tiny_pipeline

        return build_tiny_pipeline(model.seed)
    if model.kind == "mini":
        return _load_mini(runtime, distilled=model.is_distilled)
    return _load_pretrained(model, runtime)


def load_transformer(model: ModelConfig, runtime: Runtime):
    """The model's transformer alone, on the host in `runtime`'s dtype (quantised when asked):
    the distilled evaluation needs no second text encoder or VAE (the prompts are cached, the
    base's VAE decodes)."""
    with quiet_loading(model):
        transformer = _load_transformer_alone(model, runtime)
    transformer.to(dtype=runtime.dtype)
    if model.quantize != "none":
        quantize_weights(transformer, model.quantize, runtime.device)
    transformer.requires_grad_(False).eval()
    return transformer


def _load_transformer_alone(model: ModelConfig, runtime: Runtime):
    from diffusers import Flux2Transformer2DModel

    if model.kind == "tiny":
        from klein_sweep.models.tiny import build_tiny_pipeline

        return build_tiny_pipeline(model.seed).transformer
    if model.kind == "mini":
        folder = MINI_DISTILLED_DIR if model.is_distilled else MINI_PIPELINE_DIR / "transformer"
        if not (folder / "config.json").exists():
            raise ModelError(f"the mini transformer is missing from {folder}; build it with python -m klein_sweep.mini.build"
                             + (" --only distilled" if model.is_distilled else ""))
        return Flux2Transformer2DModel.from_pretrained(folder, torch_dtype=runtime.dtype, local_files_only=True)
    source = model_source(model)
    try:
        return Flux2Transformer2DModel.from_pretrained(source, subfolder="transformer", revision=model.revision,
                                                       torch_dtype=runtime.dtype, token=os.environ.get("HF_TOKEN") or None)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load the transformer of model '{model.name}' from {source}: {exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0]}. Download it once ({download_command(model.name, source)}) "
                         "and set its path") from exc


def _load_mini(runtime: Runtime, distilled: bool = False):
    """The mini Klein shipped inside the package, through the same from_pretrained path. The
    distilled mini is the base's pipeline with the student transformer (they share VAE and text
    encoder, as the real distilled Klein models share their base's)."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    if not (MINI_PIPELINE_DIR / "model_index.json").exists():
        raise ModelError(f"the mini model is missing from {MINI_PIPELINE_DIR}; rebuild it with python -m klein_sweep.mini.build")
    if not distilled:
        return Flux2KleinPipeline.from_pretrained(MINI_PIPELINE_DIR, dtype=runtime.dtype, local_files_only=True)
    if not (MINI_DISTILLED_DIR / "config.json").exists():
        raise ModelError(f"the distilled mini is missing from {MINI_DISTILLED_DIR}; build it with "
                         "python -m klein_sweep.mini.build --only distilled")
    student = Flux2Transformer2DModel.from_pretrained(MINI_DISTILLED_DIR, torch_dtype=runtime.dtype, local_files_only=True)
    return Flux2KleinPipeline.from_pretrained(MINI_PIPELINE_DIR, transformer=student, dtype=runtime.dtype, local_files_only=True)


def _load_pretrained(model: ModelConfig, runtime: Runtime):
    from diffusers import Flux2KleinPipeline

    source = model_source(model)
    # A token comes from the environment only and is never logged.
    token = os.environ.get("HF_TOKEN") or None
    try:
        return Flux2KleinPipeline.from_pretrained(
            source, revision=model.revision, dtype=runtime.dtype, token=token
        )
    except (OSError, ValueError) as exc:
        local = os.path.isdir(source)
        where = f"the folder {source}" if local else f"the hub id {source}"
        raise ModelError(
            f"could not load model '{model.name}' from {where}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}. "
            f"Download it once ({download_command(model.name, source)}) "
            f"and set model.path=DIR"
        ) from exc


def transformer_config(model: ModelConfig) -> dict:
    """The transformer's config without its weights: the tiny model's code, the shipped mini
    folder, a local model folder, or the registry for the known hub models."""
    from diffusers import Flux2Transformer2DModel

    if model.kind == "tiny":
        from klein_sweep.models.tiny import build_tiny_pipeline

        return dict(build_tiny_pipeline(model.seed).transformer.config)
    if model.kind == "mini":
        return dict(Flux2Transformer2DModel.load_config(MINI_DISTILLED_DIR if model.is_distilled else MINI_PIPELINE_DIR / "transformer"))
    if model.path and (Path(model.path) / "transformer" / "config.json").exists():
        return dict(Flux2Transformer2DModel.load_config(Path(model.path) / "transformer"))
    if model_size(model.name):
        return klein_transformer_config(model_size(model.name))
    raise ModelError(f"no transformer config for model '{model.name}': set model.path to a folder with transformer/config.json")


def transformer_skeleton(model: ModelConfig):
    """The model's transformer architecture without loading its weights (meta tensors for the
    real models): what a LoRA's shapes are checked against."""
    from klein_sweep.heap import import_model_libraries

    import_model_libraries()  # the LoRA check's first import
    from diffusers import Flux2Transformer2DModel

    if model.kind == "tiny":
        from klein_sweep.models.tiny import build_tiny_pipeline

        return build_tiny_pipeline(model.seed).transformer
    if model.kind == "mini":
        return Flux2Transformer2DModel.from_config(transformer_config(model))
    from accelerate import init_empty_weights

    with init_empty_weights():
        return Flux2Transformer2DModel.from_config(transformer_config(model))


def quantize_weights(module, mode: str, device: str) -> None:
    """Weight-only quantization of a frozen module's Linear layers in place (torchao), where it is
    (the host, before it moves: only the quantised weights ever reach the accelerator). `device`
    is where it will run. A quantised transformer keeps working with peft: the LoRA trains in
    float32 on top of the quantized base."""
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ModelError(f"model.quantize={mode} needs torchao: pip install 'klein_sweep[quant]' ({exc})") from exc
    if mode == "fp8" and device != "cuda":
        raise ModelError("model.quantize=fp8 needs a CUDA GPU with fp8 support (Ada/Hopper or newer); use int8 elsewhere")
    quantize_(module, Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig())
