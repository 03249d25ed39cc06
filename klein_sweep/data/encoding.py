"""Encode once: VAE latents and text embeddings computed once and kept on disk, keyed by a hash of
everything they depend on, shared by every trial of a sweep and by later runs.

Latents follow diffusers' Klein training: VAE encode (distribution mode) -> 2x2 patchify ->
batch-norm normalise with the VAE's running stats. Shape per image: (4*C, H/(2f), W/(2f)) for a
VAE with C latent channels and downscale factor f, e.g. (128, 64, 64) for Klein at 1024 px.
Text: Qwen3 hidden layers stacked, (max_sequence_length, layers x hidden), e.g. (512, 12288) for 9B.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from klein_sweep.data.folder import Example, load_image
from klein_sweep.fileio import replaced_atomically

CACHE_FORMAT = 2  # bump when what is stored changes (2: images composited on a background)


@dataclass
class EncodingKey:
    """What an encoding depends on besides the image bytes or the caption."""

    model_id: str
    resolution: int
    text_layers: tuple[int, ...]
    max_sequence_length: int
    background: str = "white"  # transparent pixels' colour: part of what an image encodes to

    def latent_key(self, image_bytes: bytes) -> str:
        return _digest({"f": CACHE_FORMAT, "m": self.model_id, "r": self.resolution, "bg": self.background}, image_bytes)

    def text_key(self, prompt: str) -> str:
        meta = {"f": CACHE_FORMAT, "m": self.model_id, "l": list(self.text_layers), "n": self.max_sequence_length}
        return _digest(meta, prompt.encode("utf-8"))


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


@dataclass
class EncodedData:
    """Everything training needs, on CPU."""

    latents: torch.Tensor  # (N, 4C, h, w) normalised, patchified
    prompt_embeds: torch.Tensor  # (N, L, D)
    empty_prompt_embeds: torch.Tensor  # (L, D): the caption-dropout prompt ""
    extra_prompt_embeds: dict[str, torch.Tensor] = field(default_factory=dict)  # prompt -> (L, D)
    stats: CacheStats = field(default_factory=CacheStats)


class EncodingCache:
    """safetensors files under `root/{latents,text}/<sha256>.safetensors`. `root=None`: no disk."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root is not None else None
        self.stats = CacheStats()

    def get(self, kind: str, key: str) -> torch.Tensor | None:
        if self.root is None:
            return None
        path = self.root / kind / f"{key}.safetensors"
        if not path.exists():
            return None
        from safetensors.torch import load_file

        try:
            tensor = load_file(path)["value"]
        except Exception:  # a corrupt entry is re-encoded, never trusted
            return None
        self.stats.hits += 1
        return tensor

    def put(self, kind: str, key: str, value: torch.Tensor) -> None:
        self.stats.misses += 1
        if self.root is None:
            return
        from safetensors.torch import save_file

        folder = self.root / kind
        folder.mkdir(parents=True, exist_ok=True)
        # Several workers may encode the same entry: write aside, then rename atomically.
        with replaced_atomically(folder / f"{key}.safetensors") as tmp:
            save_file({"value": value.contiguous()}, str(tmp))


def encode_data(
    pipe, examples: list[Example], key: EncodingKey, cache: EncodingCache, extra_prompts: list[str] = (), batch_size: int = 8,
    placement=None,
) -> EncodedData:
    """Latents of every image and embeddings of every caption, "" and `extra_prompts`, from the
    cache where present, else encoded with `pipe` and stored. `placement` (models/placement.py)
    puts the VAE and the text encoder on the accelerator only when something needs encoding."""
    latents = _encode_images(pipe, examples, key, cache, batch_size, placement)
    if placement is not None:
        placement.to_host("vae", pipe.vae)  # the text encoder encodes alone
    prompts = [ex.caption for ex in examples]
    unique = list(dict.fromkeys([*prompts, "", *extra_prompts]))
    embeds = _encode_prompts(pipe, unique, key, cache, batch_size, placement)
    return EncodedData(
        latents=torch.stack(latents),
        prompt_embeds=torch.stack([embeds[p] for p in prompts]),
        empty_prompt_embeds=embeds[""],
        extra_prompt_embeds={p: embeds[p] for p in extra_prompts},
        stats=cache.stats,
    )


def release_text_encoder(pipe, placement=None) -> None:
    """Drop the text encoder (8B parameters for Klein 9B) once all prompts are encoded."""
    if getattr(pipe, "text_encoder", None) is None:
        return
    if placement is not None:
        placement.to_host("text_encoder", pipe.text_encoder)
    pipe.text_encoder.to("cpu")
    pipe.text_encoder = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def drop_output_head(text_encoder) -> None:
    """Klein reads the text encoder's hidden states, never its next-token logits: the output head
    (0.6B parameters of Qwen3-8B's own, 1.2 GB in bf16) need not reach the accelerator, and its
    151,936-wide projection of every token need not run."""
    if isinstance(getattr(text_encoder, "lm_head", None), torch.nn.Linear):
        text_encoder.lm_head = torch.nn.Identity()


def release_vae_encoder(pipe) -> None:
    """Drop the VAE encoder once the images are cached: training reads cached latents and
    evaluation only decodes."""
    vae = pipe.vae
    if getattr(vae, "encoder", None) is None:
        return
    vae.encoder = None
    if getattr(vae, "quant_conv", None) is not None:
        vae.quant_conv = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _encode_images(pipe, examples, key, cache, batch_size, placement=None) -> list[torch.Tensor]:
    out: list[torch.Tensor | None] = []
    todo: list[tuple[int, str, Example]] = []
    for i, ex in enumerate(examples):
        k = key.latent_key(ex.image_path.read_bytes())
        cached = cache.get("latents", k)
        out.append(cached)
        if cached is None:
            todo.append((i, k, ex))
    if todo and getattr(pipe.vae, "encoder", None) is None:
        raise RuntimeError("images need encoding but the VAE encoder was already released")
    if todo and placement is not None:
        placement.to_device("vae", pipe.vae)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        pixels = torch.stack([load_image(ex.image_path, key.resolution, key.background) for _, _, ex in chunk])
        encoded = vae_encode(pipe, pixels)
        for (i, k, _), lat in zip(chunk, encoded):
            cache.put("latents", k, lat)
            out[i] = lat
    return out


def _encode_prompts(pipe, prompts, key, cache, batch_size, placement=None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    todo = []
    for p in prompts:
        k = key.text_key(p)
        cached = cache.get("text", k)
        if cached is None:
            todo.append((p, k))
        else:
            out[p] = cached
    if todo and getattr(pipe, "text_encoder", None) is None:
        raise RuntimeError("prompts need encoding but the text encoder was already released")
    if todo:
        drop_output_head(pipe.text_encoder)
        if placement is not None:
            placement.to_device("text_encoder", pipe.text_encoder)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        embeds = text_encode(pipe, [p for p, _ in chunk], key)
        for (p, k), e in zip(chunk, embeds):
            cache.put("text", k, e)
            out[p] = e
    return out


@torch.no_grad()
def vae_encode(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 4C, H/2f, W/2f) normalised latents, on CPU."""
    vae = pipe.vae
    x = pixels.to(device=vae.device, dtype=vae.dtype)
    return normalise_latents(pipe, vae.encode(x).latent_dist.mode()).cpu()


def normalise_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, C, H/f, W/f) -> the transformer's space (B, 4C, H/2f, W/2f): 2x2
    patchify, then the VAE's batch-norm statistics (what the pipeline undoes before decoding)."""
    vae = pipe.vae
    latents = pipe._patchify_latents(latents)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
    return (latents - mean) / std


@torch.no_grad()
def text_encode(pipe, prompts: list[str], key: EncodingKey) -> torch.Tensor:
    """(B, L, D) prompt embeddings on CPU, with the layers named in `key` (never a default)."""
    embeds, _ = pipe.encode_prompt(
        prompt=prompts,
        device=pipe.text_encoder.device,
        max_sequence_length=key.max_sequence_length,
        text_encoder_out_layers=tuple(key.text_layers),
    )
    return embeds.cpu()


def _digest(meta: dict, payload: bytes) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    h.update(b"\0")
    h.update(payload)
    return h.hexdigest()
