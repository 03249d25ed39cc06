"""The LoRA in the original FLUX.2 (BFL) key layout that ComfyUI and ai-toolkit load:
`diffusion_model.double_blocks.{i}.img_attn.qkv.lora_A.weight`, ...

diffusers keeps q, k and v as separate Linear layers; the original model has one fused qkv
projection. A fused LoRA shares one A across q/k/v, so the export stacks the three adapters:

    A_qkv = [A_q; A_k; A_v]                      (3r x in)
    B_qkv = blockdiag(B_q, B_k, B_v)             (3 out x 3r)
    B_qkv @ A_qkv = [B_q A_q; B_k A_k; B_v A_v]  exactly the three deltas

diffusers' own converter (`_convert_non_diffusers_flux2_lora_to_diffusers`) reads this back as
rank-3r adapters with the same products. The files carry no alpha (those tools read a missing
alpha as alpha = rank, scale 1), so the scale alpha/r is folded into B.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from klein_sweep.fileio import replaced_atomically

BFL_PREFIX = "diffusion_model."
EXPORT_WEIGHT_NAME = "klein_lora_comfyui.safetensors"

# diffusers module (inside a block) -> (original module, index in its fused group or None)
_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1), "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None), "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None), "ff_context.linear_out": ("txt_mlp.2", None),
}
_SINGLE = {"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)}


def original_name(module: str) -> tuple[str, int | None]:
    """diffusers module name -> (original module name, position in a fused q/k/v group)."""
    group, index, rest = (module.split(".", 2) + ["", ""])[:3]
    table, block = (_DOUBLE, "double_blocks") if group == "transformer_blocks" else (_SINGLE, "single_blocks")
    if group not in ("transformer_blocks", "single_transformer_blocks") or rest not in table:
        raise ValueError(f"LoRA on {module}: no counterpart in the original FLUX.2 layout (supported: {sorted(_DOUBLE)} "
                         f"in transformer_blocks, {sorted(_SINGLE)} in single_transformer_blocks)")
    name, pos = table[rest]
    return f"{block}.{index}.{name}", pos


def read_diffusers_lora(path: str | os.PathLike) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """module name -> (A [r, in], B [out, r]) from a klein_sweep/diffusers LoRA file, and its
    adapter metadata (rank, alpha)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        raw_meta = (f.metadata() or {}).get("lora_adapter_metadata")
    meta = json.loads(raw_meta) if raw_meta else {}
    meta = {k.removeprefix("transformer."): v for k, v in meta.items()}
    return lora_pairs(tensors), meta


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`[transformer.]<module>.lora_A/B.weight` keys -> module name -> (A, B). A module with only
    one of the two is kept with None in the missing place (the compatibility check names it)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key.removeprefix("transformer.")
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                pairs.setdefault(name.split(marker)[0], {})[part] = value
    return {m: (p.get("lora_A"), p.get("lora_B")) for m, p in pairs.items()}


def module_scale(meta: dict, module: str, rank: int) -> float:
    """alpha / r for one module, honouring PEFT's per-module rank/alpha patterns."""
    alpha = meta.get("lora_alpha", rank)
    for pattern, value in (meta.get("alpha_pattern") or {}).items():
        if module.endswith(pattern):
            alpha = value
    return float(alpha) / rank


def to_original_layout(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], meta: dict) -> dict[str, torch.Tensor]:
    """diffusers (A, B) pairs -> `diffusion_model.*` keys with fused q/k/v and the scale in B."""
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in sorted(pairs.items()):
        target, pos = original_name(module)
        b = b.float() * module_scale(meta, module, a.shape[0])
        if pos is None:
            out[f"{BFL_PREFIX}{target}.lora_A.weight"] = a.float().contiguous()
            out[f"{BFL_PREFIX}{target}.lora_B.weight"] = b.contiguous()
        else:
            fused.setdefault(target, {})[pos] = (a.float(), b)
    for target, parts in fused.items():
        (a0, b0) = next(iter(parts.values()))
        out_features, in_features = b0.shape[0], a0.shape[1]
        # A projection the LoRA does not touch is a zero block of B (its rows stay unchanged).
        a_blocks = [parts[i][0] for i in range(3) if i in parts]
        a_qkv = torch.cat(a_blocks, dim=0)
        b_qkv = torch.zeros(3 * out_features, a_qkv.shape[0])
        col = 0
        for i in range(3):
            if i in parts:
                a, b = parts[i]
                if a.shape[1] != in_features or b.shape[0] != out_features:
                    raise ValueError(f"{target}: q/k/v adapters disagree in shape ({tuple(a.shape)}, {tuple(b.shape)})")
                b_qkv[i * out_features : (i + 1) * out_features, col : col + a.shape[0]] = b
                col += a.shape[0]
        out[f"{BFL_PREFIX}{target}.lora_A.weight"] = a_qkv.contiguous()
        out[f"{BFL_PREFIX}{target}.lora_B.weight"] = b_qkv.contiguous()
    return out


def export_comfyui(lora_file: str | os.PathLike, out_file: str | os.PathLike | None = None) -> Path:
    """Write the ComfyUI / ai-toolkit file next to a diffusers LoRA file (write, then rename)."""
    from safetensors.torch import save_file

    lora_file = Path(lora_file)
    out_file = Path(out_file) if out_file else lora_file.with_name(EXPORT_WEIGHT_NAME)
    pairs, meta = read_diffusers_lora(lora_file)
    state = to_original_layout(pairs, meta)
    with replaced_atomically(out_file) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "source": "klein_sweep", "layout": "flux2-original (diffusion_model.*)"})
    return out_file
