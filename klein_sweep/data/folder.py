"""Training data: a folder of images with same-name .txt captions (the ai-toolkit / kohya layout),
checked up front so that a bad file stops the run before anything is trained or tracked.

    data/
      001.png   001.txt   "photo of [trigger] on a beach"   -> "photo of sks on a beach"
      002.jpg             (no caption)                        -> data.default_caption
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from klein_sweep.config import DataConfig
from klein_sweep.data.layout import CAPTION_EXTENSION, IMAGE_EXTENSIONS, TRIGGER_PLACEHOLDER
from klein_sweep.errors import DataError


@dataclass(frozen=True)
class Example:
    image_path: Path
    caption: str


def load_examples(cfg: DataConfig) -> list[Example]:
    """All (image, caption) pairs of `cfg.path`, sorted by file name, every image opened and
    checked. Raises DataError naming the first bad file."""
    folder = Path(cfg.path).expanduser()
    if not folder.exists():
        raise DataError(f"data.path: folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"data.path: {folder} is a file, not a folder of images")
    images, captions = {}, {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # .DS_Store, editor swap files, our own temp files
        suffix = entry.suffix.lower()
        if entry.is_file() and suffix in IMAGE_EXTENSIONS:
            if entry.stem in images:
                raise DataError(f"data.path: two images share the name '{entry.stem}': {images[entry.stem].name} and {entry.name}")
            images[entry.stem] = entry
        elif entry.is_file() and suffix == CAPTION_EXTENSION:
            captions[entry.stem] = entry
        else:
            raise DataError(
                f"data.path: {entry} is not an image or a caption; the folder may hold only images "
                f"({', '.join(IMAGE_EXTENSIONS)}) and same-name {CAPTION_EXTENSION} captions"
            )
    if not images:
        raise DataError(
            f"data.path: folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}); point data.path at your training images"
        )
    orphans = sorted(set(captions) - set(images))
    if orphans:
        raise DataError(f"data.path: caption {captions[orphans[0]]} has no image of the same name (e.g. {orphans[0]}.png)")
    for image_path in images.values():  # every image, also those max_images leaves out: a bad file stops the run
        check_image(image_path, cfg)
    return [Example(images[stem], read_caption(captions.get(stem), cfg)) for stem in chosen_stems(list(images), cfg, folder)]


# The shuffle that data.max_images takes its first N from: fixed, so that every run, seed and
# worker trains on the same images, and a smaller N is a subset of a larger one.
SUBSET_SEED = 0


def chosen_stems(stems: list[str], cfg: DataConfig, folder: Path) -> list[str]:
    """The images to train on, by name: all of them, or data.max_images of them taken from a fixed
    shuffle of the sorted names, returned sorted (max_images = the folder's count trains exactly
    what no limit trains)."""
    import random

    if cfg.max_images is None:
        return stems
    if cfg.max_images > len(stems):
        raise DataError(f"data.max_images: {cfg.max_images} is more than the {len(stems)} images in {folder}; "
                        f"use at most {len(stems)} or null for all of them")
    order = sorted(stems)
    random.Random(SUBSET_SEED).shuffle(order)
    return sorted(order[:cfg.max_images])


def read_caption(path: Path | None, cfg: DataConfig) -> str:
    """The caption with `[trigger]` replaced; the default caption when there is no file or it is empty."""
    text = ""
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8-sig").strip()  # -sig: a BOM some editors write is not text
        except UnicodeDecodeError as exc:
            raise DataError(f"data.path: caption {path} is not UTF-8 text ({exc.reason})") from exc
    text = text or cfg.default_caption
    return " ".join(text.replace(TRIGGER_PLACEHOLDER, cfg.trigger).split())


# Images already decoded and found usable, by (path, mtime, size, the settings they were checked
# against): the up-front check of every cell, the cost preview and each trial all list the same
# folder, and decoding every image again for each is most of their time. A changed file is checked again.
_CHECKED: set[tuple] = set()


def check_image(path: Path, cfg: DataConfig) -> None:
    """Open and fully decode the image: truncated, corrupt and oversized files fail here, not
    mid-training."""
    from klein_sweep.data.images import open_rgb

    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size, cfg.resolution, cfg.background, cfg.max_megapixels)
    if key in _CHECKED:
        return
    width, height = open_rgb(path, cfg.background, cfg.max_megapixels).size
    if min(width, height) < cfg.resolution:
        raise DataError(
            f"data.path: image {path} is {width}x{height}, smaller than data.resolution={cfg.resolution}; "
            f"use a larger image or a data.resolution <= {min(width, height)}"
        )
    _CHECKED.add(key)  # only an image that passed every check


def load_image(path: Path, resolution: int, background: str = "white", max_megapixels: float = 64.0) -> "torch.Tensor":  # noqa: F821
    """(3, resolution, resolution) float32 in [-1, 1]: short side resized, then center-cropped."""
    import numpy as np
    import torch
    from PIL import Image

    from klein_sweep.data.images import open_rgb

    img = open_rgb(path, background, max_megapixels)
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def repeats_per_image(steps: int, batch_size: int, grad_accum: int, n_images: int) -> float:
    """How many times each image is seen: steps x batch x grad_accum / N."""
    return steps * batch_size * grad_accum / n_images


def steps_for_repeats(repeats: float, n_images: int, batch_size: int, grad_accum: int) -> int:
    """ceil(N x repeats / (batch x grad_accum)): e.g. N=55, 100 repeats -> 5500 steps at GA 1,
    1375 at GA 4."""
    return max(1, math.ceil(n_images * repeats / (batch_size * grad_accum) - 1e-9))
