"""Data folder checks, captions, repeats math, image preprocessing."""

from __future__ import annotations

import pytest
from PIL import Image

from klein_sweep.config import DataConfig
from klein_sweep.data.folder import load_examples, load_image, repeats_per_image, steps_for_repeats
from klein_sweep.errors import DataError


def cfg(path, **kw):
    return DataConfig(path=str(path), trigger="ohwx", resolution=32, **kw)


def test_captions_trigger_and_default(tiny_data):
    ex = load_examples(cfg(tiny_data))
    assert len(ex) == 8
    assert ex[0].caption == "photo of ohwx creature on grass"  # from 000.txt
    assert ex[1].caption == "photo of ohwx"  # no .txt: default caption


def test_repeats_rule():
    # The trainers' rule of thumb, as guides state it: N=55, 100 repeats -> 5500 steps at GA 1, 1375 at GA 4
    assert steps_for_repeats(100, 55, 1, 1) == 5500
    assert steps_for_repeats(100, 55, 1, 4) == 1375
    assert steps_for_repeats(10, 3, 2, 2) == 8  # ceil(7.5)
    assert repeats_per_image(1375, 1, 4, 55) == 100


def test_image_resized_and_center_cropped(tmp_path):
    Image.new("RGB", (64, 40), "red").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", 32)
    assert x.shape == (3, 32, 32)
    assert x[0].min() > 0.99 and x[1].max() < -0.99  # red in [-1, 1]


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="has no images"):
        load_examples(cfg(tmp_path))


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(cfg(tmp_path / "nope"))


def test_corrupt_image(tiny_data):
    (tiny_data / "003.png").write_bytes((tiny_data / "003.png").read_bytes()[:100])  # truncated
    with pytest.raises(DataError, match="003.png cannot be read"):
        load_examples(cfg(tiny_data))


def test_non_image_file(tiny_data):
    (tiny_data / "notes.pdf").write_text("x")
    with pytest.raises(DataError, match="notes.pdf is not an image or a caption"):
        load_examples(cfg(tiny_data))


def test_text_named_like_image(tiny_data):
    (tiny_data / "fake.png").write_text("not a png")
    with pytest.raises(DataError, match="fake.png cannot be read"):
        load_examples(cfg(tiny_data))


def test_caption_without_image(tiny_data):
    (tiny_data / "999.txt").write_text("photo of [trigger]")
    with pytest.raises(DataError, match="999.txt has no image"):
        load_examples(cfg(tiny_data))


def test_image_smaller_than_resolution(tiny_data):
    Image.new("RGB", (20, 20)).save(tiny_data / "small.png")
    with pytest.raises(DataError, match="small.png is 20x20, smaller than data.resolution=32"):
        load_examples(cfg(tiny_data))


def test_hidden_files_ignored(tiny_data):
    (tiny_data / ".DS_Store").write_bytes(b"\0")
    assert len(load_examples(cfg(tiny_data))) == 8


def test_each_image_is_decoded_once_until_it_changes(tiny_data, monkeypatch):
    """The up-front check of every cell, the cost preview and each trial list the same folder:
    an unchanged image is decoded once; a changed or too-small one is checked (and refused) again."""
    import os

    import klein_sweep.data.images as images

    decoded, real = [], images.open_rgb
    monkeypatch.setattr(images, "open_rgb", lambda path, *a, **k: decoded.append(path.name) or real(path, *a, **k))
    n = len(load_examples(cfg(tiny_data)))
    assert len(decoded) == n
    assert len(load_examples(cfg(tiny_data))) == n and len(decoded) == n  # nothing decoded again
    first = sorted(tiny_data.glob("*.png"))[0]
    Image.new("RGB", (20, 20)).save(first)
    os.utime(first, ns=(1, 1))  # a different mtime even on a coarse clock
    for _ in range(2):  # refused every time, never remembered as fine
        with pytest.raises(DataError, match=f"{first.name} is 20x20"):
            load_examples(cfg(tiny_data))
    assert decoded[n:] == [first.name, first.name]


def test_max_images_takes_nested_subsets_of_one_fixed_shuffle(tmp_path):
    """data.max_images: 5 of 20 are a subset of 10 of 20 (the boundary of a smaller dataset is
    measured on images the larger one also has), the same in every run, spread over the folder
    (not its first file names), and the folder's count trains exactly what no limit trains."""

    for i in range(20):
        Image.new("RGB", (40, 40), (i * 10, 0, 0)).save(tmp_path / f"{i:03d}.png")
    names = {n: [e.image_path.name for e in load_examples(cfg(tmp_path, max_images=n))] for n in (5, 10, 20)}
    assert len(names[5]) == 5 and set(names[5]) < set(names[10]) < set(names[20])
    assert names[5] == sorted(names[5]) and names[5] != [f"{i:03d}.png" for i in range(5)]
    assert names[20] == [e.image_path.name for e in load_examples(cfg(tmp_path))]
    assert names[5] == [e.image_path.name for e in load_examples(cfg(tmp_path, max_images=5))]  # the same again
    with pytest.raises(DataError, match=r"data.max_images: 21 is more than the 20 images in .*; use at most 20"):
        load_examples(cfg(tmp_path, max_images=21))
