"""The libraries a sweep worker process imports before its first trial, in one module: the
command's fork server imports it once (sweep/parallel.py) and forks every worker from there, so
N workers pay the imports once (~6 s of CPU on 2 cores AVX-512), while the command is still
preparing the study and its MLflow parent run.

Nothing here runs an operation: a process forked from one that has used torch's thread pool
would inherit it in a broken state, one that has only imported torch does not.
"""

from __future__ import annotations

import gc

import accelerate  # noqa: F401 - imported for the workers
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

import klein_sweep.sweep.worker  # noqa: F401 - the worker's own code, and what it imports at the top
import klein_sweep.training.trial  # noqa: F401

# What the imports built lives as long as the process: frozen (moved to the permanent
# generation), the workers forked from here never pass over it in a collection, and neither does
# this server's own exit (~1.5 s of CPU, klein_sweep/quick_exit.py).
gc.freeze()
