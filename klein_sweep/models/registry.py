"""Every model klein_sweep knows, in one place: hub ids, the transformers' published shapes, the
sampling recipes, and which distilled model belongs to which base. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

# Hub ids of the real models. Base models are trained on; the distilled ones (4 steps, no CFG)
# are for evaluation of base-trained LoRAs.
KNOWN_MODELS = {
    "flux2_klein_base_9b": "black-forest-labs/FLUX.2-klein-base-9B",
    "flux2_klein_base_4b": "black-forest-labs/FLUX.2-klein-base-4B",
    "flux2_klein_9b": "black-forest-labs/FLUX.2-klein-9B",
    "flux2_klein_4b": "black-forest-labs/FLUX.2-klein-4B",
}

# The distilled counterpart of each trainable model (`eval.also_distilled`).
DISTILLED_COUNTERPART = {"flux2_klein_base_9b": "flux2_klein_9b", "flux2_klein_base_4b": "flux2_klein_4b",
                         "mini": "mini_distilled"}

# Sampling recipes. Base: ~50 steps with real CFG ~4 (ModelConfig's defaults); distilled: 4
# steps without CFG (guidance 1 switches CFG off in the pipeline).
DISTILLED_STEPS = 4
DISTILLED_GUIDANCE = 1.0

# The transformers' published shapes (Flux2Transformer2DModel config; base and distilled share
# them). Enough to build the architecture with random or no weights: the speed benchmark, the
# cost preview and the LoRA compatibility check need no download.
KLEIN_TRANSFORMER_CONFIGS = {
    "9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, attention_head_dim=128, joint_attention_dim=12288),
    "4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, attention_head_dim=128, joint_attention_dim=7680),
}
_KLEIN_COMMON = dict(patch_size=1, in_channels=128, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000,
                     timestep_guidance_channels=256, guidance_embeds=False)

# The Qwen3 text encoders' published shapes (Klein 9B: Qwen3-8B, 4B: Qwen3-4B), with the real
# vocabulary (its embedding table is 0.6B of the 8B); three hidden layers stacked give the
# transformer's joint_attention_dim (3 x 4096 = 12288, 3 x 2560 = 7680). Qwen3-8B has its own
# output head, Qwen3-4B ties it to the embedding.
QWEN3_VOCAB_SIZE = 151936
KLEIN_TEXT_ENCODER_CONFIGS = {
    "9b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=QWEN3_VOCAB_SIZE, tie_word_embeddings=False),
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=QWEN3_VOCAB_SIZE, tie_word_embeddings=True),
}

# The mini Klein shipped inside the package (klein_sweep/mini), loaded with from_pretrained.
MINI_PIPELINE_DIR = Path(__file__).resolve().parent.parent / "mini" / "weights" / "pipeline"
# Its 4-step, no-CFG student (klein_sweep/mini/distill.py): a transformer only, on the base's VAE and text encoder.
MINI_DISTILLED_DIR = MINI_PIPELINE_DIR.parent / "distilled_transformer"


def klein_transformer_config(size: str) -> dict:
    """Flux2Transformer2DModel config of the real 9B or 4B transformer (`size` "9b" / "4b")."""
    return {**_KLEIN_COMMON, **KLEIN_TRANSFORMER_CONFIGS[size]}


def model_size(name: str) -> str | None:
    """"9b" / "4b" for the known real models, None otherwise."""
    return name[-2:] if name in KNOWN_MODELS and name.endswith(("_9b", "_4b")) else None


def download_command(name: str, source: str | None = None) -> str:
    """The command that fetches model `name`'s weights into a local folder."""
    return f"hf download {KNOWN_MODELS.get(name, source or 'ORG/NAME')} --local-dir DIR"
