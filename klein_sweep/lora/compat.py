"""Does a LoRA fit a model? Checked before any LoRA is loaded into any model, so a LoRA from
another model (4B into 9B, a FLUX.1 LoRA, a truncated file) is one message listing the keys and
shapes that do not match, not a size-mismatch error deep inside peft.

    python -m klein_sweep.lora.check path/to/lora.safetensors model=flux2_klein_9b

Any layout diffusers reads is accepted (diffusers/peft, ComfyUI / ai-toolkit `diffusion_model.*`,
kohya), converted by diffusers' own loader first.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from klein_sweep.errors import KleinSweepError

MAX_LISTED = 12


class LoraMismatchError(KleinSweepError):
    """The LoRA's modules or shapes are not those of the model."""


def read_any_lora(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The LoRA as diffusers state-dict keys (`transformer.<module>.lora_A.weight`), whatever its layout."""
    return read_lora_with_metadata(path)[0]


def read_lora_with_metadata(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict as read_any_lora gives it, the adapter metadata stored in the file: rank, alpha,
    targets; None for files without it)."""
    from klein_sweep.heap import import_model_libraries

    import_model_libraries()  # reading a LoRA can be a command's first import
    from diffusers import Flux2KleinPipeline

    path = Path(path)
    if not path.is_file():
        raise KleinSweepError(f"LoRA file {path} does not exist")
    try:
        return Flux2KleinPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    except Exception as exc:  # not safetensors, truncated, or a layout diffusers cannot convert
        raise LoraMismatchError(
            f"LoRA {path} cannot be read as a FLUX.2 LoRA ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc


def mismatches(state: dict[str, torch.Tensor], transformer: torch.nn.Module) -> list[str]:
    """One line per LoRA module that does not fit `transformer` (empty: it fits).
    Shapes: A is [rank, in_features], B is [out_features, rank]."""
    from klein_sweep.lora.export import lora_pairs

    modules = dict(transformer.named_modules())
    problems = []
    for name, (a, b) in sorted(lora_pairs(state).items()):
        module = modules.get(name)
        base = getattr(module, "base_layer", module)  # a module that already carries an adapter
        if module is None:
            problems.append(f"{name}: the model has no such module")
        elif not isinstance(base, torch.nn.Linear):
            problems.append(f"{name}: is a {type(base).__name__} in the model, not a Linear layer")
        elif a is None or b is None:
            problems.append(f"{name}: has only lora_{'B' if a is None else 'A'}")
        else:
            if a.shape[1] != base.in_features:
                problems.append(f"{name}.lora_A {tuple(a.shape)}: in_features {a.shape[1]}, the model's layer takes {base.in_features}")
            if b.shape[0] != base.out_features:
                problems.append(f"{name}.lora_B {tuple(b.shape)}: out_features {b.shape[0]}, the model's layer gives {base.out_features}")
            if a.shape[0] != b.shape[1]:
                problems.append(f"{name}: lora_A rank {a.shape[0]} != lora_B rank {b.shape[1]}")
    return problems


def check_lora_fits(path: str | os.PathLike, transformer: torch.nn.Module, model_name: str) -> dict[str, torch.Tensor]:
    """The LoRA's state dict when it fits; otherwise LoraMismatchError listing what does not."""
    return _checked(path, transformer, model_name)[0]


def _checked(path, transformer: torch.nn.Module, model_name: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    state, metadata = read_lora_with_metadata(path)
    if not state:
        raise LoraMismatchError(f"LoRA {path} holds no LoRA weights")
    problems = mismatches(state, transformer)
    if problems:
        n_modules = len({k.rsplit('.lora_', 1)[0] for k in state})
        listed = "\n  ".join(problems[:MAX_LISTED]) + (f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else "")
        raise LoraMismatchError(
            f"LoRA {path} does not fit model {model_name}: {len(problems)} problems in {n_modules} adapted modules "
            f"(a LoRA loads only into the model it was trained on, or one with the same transformer shapes):\n  {listed}"
        )
    return state, metadata


def load_checked_lora(pipe, path: str | os.PathLike, model_name: str, adapter_name: str = "default") -> None:
    """Check, then load with diffusers' own loader. The file's adapter metadata goes with the
    weights: a state dict alone loads with alpha = rank, so an alpha != rank LoRA would act at the
    wrong strength."""
    state, metadata = _checked(path, pipe.transformer, model_name)
    pipe.load_lora_into_transformer(state, transformer=pipe.transformer, adapter_name=adapter_name, metadata=metadata, _pipeline=pipe)
