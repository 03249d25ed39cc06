"""The real FLUX.2 [klein] architectures built from their published configs with random weights:
nothing is downloaded, and speed, memory, shapes and dtypes do not depend on the weights' values.

    build_random_klein("9b")                                 full depth (8 double, 24 single, 36 text layers)
    build_random_klein("9b", double=1, single=1, text_layers=2)   real widths, reduced depth (CPU smoke)

The text encoder has the real vocabulary size (its embedding table is 0.6B of the 9B's 8B text
encoder: memory figures need it); the tokenizer is the tiny word-level one (the real Qwen
tokenizer is a download), whose ids all fall inside that table. `save_random_klein` writes the pipeline as
a local model folder, so it loads through the same `from_pretrained` path as downloaded weights.
"""

from __future__ import annotations

from pathlib import Path

from klein_sweep.models.registry import KLEIN_TEXT_ENCODER_CONFIGS, klein_transformer_config


def build_random_klein(size: str, double: int | None = None, single: int | None = None, text_layers: int | None = None,
                       seed: int = 0, dtype=None, device=None):
    """Flux2KleinPipeline of the real `size` ("9b" / "4b") widths; depth as published unless given.
    `device` (with `dtype`): the weights are created there in that dtype, e.g. a 9B model straight
    into bf16 on the GPU (seconds) instead of fp32 on the CPU and then cast (minutes, 36 GB)."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from klein_sweep.models.tiny import TINY_WORDS, build_klein_scheduler, build_tokenizer

    torch.manual_seed(seed)
    config = klein_transformer_config(size)
    if double is not None:
        config["num_layers"] = double
    if single is not None:
        config["num_single_layers"] = single
    text = dict(KLEIN_TEXT_ENCODER_CONFIGS[size])
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
    tokenizer = build_tokenizer(TINY_WORDS)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    previous = torch.get_default_dtype()
    if device is not None and dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            text_encoder = Qwen3ForCausalLM(Qwen3Config(max_position_embeddings=4096, **text)).to(**kwargs).eval()
            vae = AutoencoderKLFlux2().to(**kwargs).eval()  # the class defaults are the real VAE's config
            transformer = Flux2Transformer2DModel(**config).to(**kwargs).eval()
    finally:
        torch.set_default_dtype(previous)
    return Flux2KleinPipeline(scheduler=build_klein_scheduler(), vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer)


def save_random_klein(folder: str | Path, size: str, **kwargs) -> Path:
    """The pipeline above as a model folder (model.path) that from_pretrained loads offline."""
    folder = Path(folder)
    build_random_klein(size, **kwargs).save_pretrained(folder)
    return folder
