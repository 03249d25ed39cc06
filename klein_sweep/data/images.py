"""Reading a training image the way a person expects it to look, whatever its file mode:

  RGBA, LA, palette or colour-key transparency  composited on data.background (default white),
                                                not dropped (which turns transparent areas black)
  16-bit and 32-bit grayscale (I;16, I, F)      scaled from their full range, not clipped at 255
                                                (which turns a 16-bit PNG almost white)
  CMYK, or any embedded ICC profile             converted to sRGB through the profile
  EXIF orientation                              applied
  more than data.max_megapixels                 refused with a message, before decoding

Everything ends as 8-bit sRGB RGB.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from klein_sweep.errors import DataError


def open_rgb(path: Path, background: str = "white", max_megapixels: float = 64.0) -> "PIL.Image.Image":  # noqa: F821
    """The image at `path` as 8-bit sRGB RGB (see the module docstring). DataError when it is
    too large or cannot be decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                megapixels = img.width * img.height / 1e6
                if megapixels > max_megapixels:
                    raise DataError(
                        f"data.path: image {path} is {img.width}x{img.height} ({megapixels:.0f} megapixels), more than "
                        f"data.max_megapixels={max_megapixels:g}; downscale it (training crops to data.resolution anyway) "
                        "or raise data.max_megapixels"
                    )
                img.load()
                return to_srgb(ImageOps.exif_transpose(img), background)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"data.path: image {path} is too large to decode safely ({exc}); downscale it") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"data.path: image {path} cannot be read ({exc.__class__.__name__}: {exc}); re-export or remove it") from exc


def to_srgb(img, background: str = "white"):
    """Any PIL mode -> RGB, with the colour management and alpha handling described above."""
    from PIL import Image

    img = _from_wide_grayscale(img)
    icc = img.info.get("icc_profile")
    if icc or img.mode == "CMYK":
        img = _apply_icc(img, icc)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("L", "RGB") and "transparency" in img.info:  # a colour-key transparent pixel value
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background)
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def _from_wide_grayscale(img):
    """16-bit / 32-bit integer and float grayscale, scaled from the range its type can hold."""
    import numpy as np
    from PIL import Image

    if img.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
        return img
    array = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        top = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0 if array.max(initial=0.0) <= 255.0 else 65535.0
    elif img.mode.startswith("I;16"):
        top = 65535.0
    else:  # 32-bit "I": PNG's 16-bit grayscale often decodes to it; larger values mean a wider type
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
    out = Image.fromarray((np.clip(array / top, 0, 1) * 255).round().astype(np.uint8), "L")
    out.info = dict(img.info)
    return out


def _apply_icc(img, icc: bytes | None):
    """Through the embedded ICC profile to sRGB; CMYK without one through a generic CMYK
    (Pillow's naive formula is all that is left then)."""
    from PIL import ImageCms

    srgb = ImageCms.createProfile("sRGB")
    try:
        if icc:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            mode = "RGBA" if "A" in img.mode and img.mode != "CMYK" else "RGB"
            converted = ImageCms.profileToProfile(img, source, srgb, outputMode=mode)
            converted.info = {k: v for k, v in img.info.items() if k != "icc_profile"}
            return converted
    except (ImageCms.PyCMSError, OSError, ValueError):
        pass  # a broken profile: fall back to the plain conversion below
    return img.convert("RGB") if img.mode == "CMYK" else img
