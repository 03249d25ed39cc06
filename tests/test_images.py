"""Training images read as a person sees them, whatever their mode: transparency on a chosen
background, 16-bit grayscale at its real brightness, colour profiles applied, oversized files
refused by name, and a caption's byte-order mark dropped."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image, ImageCms

from conftest import TINY_DATA, run_cli
from klein_sweep.config import DataConfig
from klein_sweep.data.folder import load_examples
from klein_sweep.data.images import open_rgb


def half_transparent(mode: str) -> Image.Image:
    """Left half opaque red (or gray in LA), right half fully transparent (its colour: green / dark)."""
    if mode == "LA":
        img = Image.new("LA", (8, 8), (20, 0))
        img.paste((100, 255), (0, 0, 4, 8))
        return img
    img = Image.new("RGBA", (8, 8), (0, 255, 0, 0))
    img.paste((255, 0, 0, 255), (0, 0, 4, 8))
    return img


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_areas_take_the_background(tmp_path, mode):
    img = half_transparent("LA" if mode == "LA" else "RGBA")
    if mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        alpha_index = img.getpixel((7, 7))
        img.info["transparency"] = alpha_index  # palette transparency, as GIFs and 8-bit PNGs store it
    path = tmp_path / "x.png"
    img.save(path, **({"transparency": img.info["transparency"]} if mode == "P" else {}))
    white = np.asarray(open_rgb(path))
    black = np.asarray(open_rgb(path, background="black"))
    assert white[4, 6].tolist() == [255, 255, 255] and black[4, 6].tolist() == [0, 0, 0]  # not the hidden green
    assert white[4, 1].tolist() == black[4, 1].tolist()  # the opaque half does not depend on the background
    assert white[4, 1].tolist() != [255, 255, 255]


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_grayscale_keeps_its_brightness(tmp_path, mode):
    array = np.full((8, 8), 32768, dtype=np.uint16 if mode == "I;16" else np.int32)
    array[:, :4] = 8192
    path = tmp_path / ("g.png" if mode == "I;16" else "g.tif")  # PNG stores 16-bit gray; 32-bit "I" needs TIFF
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == mode
    out = np.asarray(open_rgb(path))
    assert abs(int(out[0, 6, 0]) - 128) <= 1 and abs(int(out[0, 1, 0]) - 32) <= 1  # not clipped to white


def test_an_embedded_profile_is_applied_and_cmyk_converts(tmp_path):
    rgb = Image.new("RGB", (4, 4), (200, 100, 50))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgb.save(tmp_path / "p.png", icc_profile=srgb)
    assert np.asarray(open_rgb(tmp_path / "p.png"))[0, 0].tolist() == [200, 100, 50]  # sRGB -> sRGB is the identity
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    red = np.asarray(open_rgb(tmp_path / "c.jpg"))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_caption_byte_order_mark_is_dropped(tmp_path):
    shutil.copytree(TINY_DATA, tmp_path / "d")
    (tmp_path / "d" / "000.txt").write_bytes("\ufeffphoto of [trigger] smiling".encode("utf-8"))
    captions = [e.caption for e in load_examples(DataConfig(path=str(tmp_path / "d"), trigger="ohwx"))]
    assert captions[0] == "photo of ohwx smiling"


def test_oversized_image_is_refused_before_anything_is_written(tmp_path):
    proc = run_cli("debug=smoke", "data.max_megapixels=0.001", cwd=tmp_path)  # the tiny images are 40x40
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is 40x40 (0 megapixels), more than data.max_megapixels=0.001" in proc.stderr, proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


def test_background_must_be_a_colour(tmp_path):
    proc = run_cli("debug=smoke", "data.background=transparentish", cwd=tmp_path)
    assert proc.returncode == 2 and "config key 'data.background' = 'transparentish' is invalid" in proc.stderr
