"""The base model's samples, kept on disk between runs. Before any LoRA exists every sweep samples
the same prompts x seeds with the same recipe: the evaluation's yardstick (trigger, prior and
the prior at other seeds) and the validation losses' prior samples. On the mini world a worker's
evaluation setup takes 19.1 s when it draws them and 1.5 s when it reads them (one core,
AVX-512); for a 9B on a GPU drawing them takes minutes. Stored are the denoised latents, one
safetensors file per call under `<data.cache_dir>/base_samples/`; decoding them again is cheap
and gives the same images.

The key holds everything the samples depend on: the transformer's identity and the model's
settings, the prompt and negative embeddings (their bytes), the seeds, the recipe, the device
kind, dtype and the torch and diffusers versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from klein_sweep.fileio import replaced_atomically

FORMAT = 1  # bump when what is stored, or how samples are drawn, changes


class BaseSampleCache:
    def __init__(self, root: str | Path, model_id: str):
        self.root = Path(root) / "base_samples"
        self.model_id = model_id

    @classmethod
    def for_settings(cls, settings) -> "BaseSampleCache | None":
        """The cache of the settings' model in their encoding-cache folder; None when
        data.use_cache is off (nothing is keyed or kept)."""
        from klein_sweep.models.loading import transformer_id

        return cls(settings.data.cache_dir, transformer_id(settings.model)) if settings.data.use_cache else None

    def key(self, pipe, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, seeds: list[int], recipe) -> str:
        import diffusers

        meta = {"f": FORMAT, "model": self.model_id, "seeds": [int(s) for s in seeds],
                "recipe": [recipe.steps, recipe.guidance_scale, recipe.resolution, recipe.batch_size],
                "device": pipe.transformer.device.type, "dtype": str(pipe.transformer.dtype),
                "torch": torch.__version__, "diffusers": diffusers.__version__}
        h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
        for t in (prompt_embeds, negative_embeds):
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        """The stored latents (N, C, h, w), or None (absent or unreadable)."""
        if not (path := self.root / f"{key}.safetensors").exists():
            return None
        from safetensors.torch import load_file

        try:
            latents = load_file(path)["latents"]
        except Exception:  # a corrupt entry is sampled again, never trusted
            return None
        return latents

    def put(self, key: str, latents: torch.Tensor) -> None:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        # Several workers may sample the same entry: write aside, then rename atomically.
        with replaced_atomically(self.root / f"{key}.safetensors") as tmp:
            save_file({"latents": latents.detach().cpu().contiguous()}, str(tmp))

    @contextlib.contextmanager
    def drawing(self, key: str, wait: bool) -> Iterator[bool]:
        """An exclusive lock on one entry while it is read or drawn, so workers that start
        together on an empty cache draw different entries. Yields True when held; False when
        `wait` is off and another process holds it (it is drawing that entry: come back later).
        Without fcntl (Windows): always True, and workers may draw the same entry."""
        try:
            import fcntl
        except ImportError:
            yield True
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
