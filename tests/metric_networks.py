"""Tiny random DINOv2 and CLIP folders, built with transformers and saved locally: the real
metric-network classes, loaded offline through eval.network_paths, at a few kB."""

from __future__ import annotations

from pathlib import Path

import torch

CLIP_WORDS = ["red", "blue", "circle", "square", "creature", "sky", "background", "a", "on"]


def save_tiny_dinov2(folder: Path, seed: int = 0) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(folder)
    BitImageProcessor(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from klein_sweep.models.tiny import TINY_WORDS, build_tokenizer

    tokenizer = build_tokenizer(TINY_WORDS + CLIP_WORDS)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
