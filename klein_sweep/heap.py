"""The libraries' import-time objects, frozen once per process before the first model exists.

Importing torch, diffusers, transformers, peft, accelerate, MLflow, Optuna and torchmetrics leaves
~645k Python objects that live as long as the process. A full garbage collection passes over all
of them: 0.26 s each (2 cores AVX-512), and a trial runs several to hand memory back (the text
encoder and the VAE encoder released, the trial's optimizer state and activations released).
Frozen (gc.freeze: moved to the permanent generation, which collections skip), they cost nothing.
A model is built after the freeze, so the collections still see it and free it.
"""

from __future__ import annotations

import contextlib
import gc
import logging

_frozen = False

# What importing the libraries prints about a library no trial asked for: torchao (the `quant`
# extra), which transformers' and diffusers' quantizer modules import whenever it is installed,
# logs that its CUDA-only kernels do not load on this machine and that it imports no tensor
# subclasses, and torch that torchao registers its enums the deprecated way. With
# model.quantize, torchao's own errors at quantisation time say what matters.
IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


@contextlib.contextmanager
def quiet_import_warnings():
    """Imports without the warnings of IMPORT_NOISE_LOGGERS; their levels as they were after."""
    loggers = [logging.getLogger(name) for name in IMPORT_NOISE_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def import_model_libraries() -> None:
    """Import the model libraries (diffusers, transformers, peft; torchao through them where it
    is installed) without their import-time noise. Every path whose first import of them can come
    before a trial's calls this first: the cost count (a dry run, and a one-worker sweep's parent
    run), the LoRA check, and freeze_libraries. Later calls cost a dictionary lookup each."""
    with quiet_import_warnings():
        import peft  # noqa: F401
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel  # noqa: F401
        from transformers import Qwen2TokenizerFast, Qwen3ForCausalLM  # noqa: F401


def freeze_libraries() -> None:
    """Import the libraries a trial uses and freeze every object alive now; later calls (and a
    process forked from one that called it) do nothing. Runs no operation: a process forked
    after it inherits no thread pool."""
    global _frozen
    if _frozen:
        return
    with quiet_import_warnings():
        import accelerate  # noqa: F401
        import mlflow.tracking  # noqa: F401
        import optuna  # noqa: F401
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
        import torchmetrics.image.fid  # noqa: F401
        import torchmetrics.image.inception  # noqa: F401
        import torchmetrics.image.kid  # noqa: F401
    import_model_libraries()

    gc.freeze()
    _frozen = True
