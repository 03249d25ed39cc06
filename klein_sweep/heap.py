"""The libraries' import-time objects, frozen once per process before the first model exists.

Importing torch, diffusers, transformers, peft, accelerate, MLflow, Optuna and torchmetrics leaves
~645k Python objects that live as long as the process. A full garbage collection passes over all
of them: 0.26 s each (2 cores AVX-512), and a trial runs several to hand memory back (the text
encoder and the VAE encoder released, the trial's optimizer state and activations released).
Frozen (gc.freeze: moved to the permanent generation, which collections skip), they cost nothing.
A model is built after the freeze, so the collections still see it and free it.
"""

from __future__ import annotations

import gc

_frozen = False


def freeze_libraries() -> None:
    """Import the libraries a trial uses and freeze every object alive now; later calls (and a
    process forked from one that called it) do nothing. Runs no operation: a process forked
    after it inherits no thread pool."""
    global _frozen
    if _frozen:
        return
    import accelerate  # noqa: F401
    import mlflow.tracking  # noqa: F401
    import optuna  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import torchmetrics.image.fid  # noqa: F401
    import torchmetrics.image.inception  # noqa: F401
    import torchmetrics.image.kid  # noqa: F401
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel  # noqa: F401
    from transformers import Qwen2TokenizerFast, Qwen3ForCausalLM  # noqa: F401

    gc.freeze()
    _frozen = True
