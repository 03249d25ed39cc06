"""A procedural world of 32x32 creatures with captions, deterministic from a seed.

32x32 because it is the smallest size at which six body shapes, three patterns and the eyes stay
distinguishable after the VAE (8x8 latent patches = 64 image tokens), and it costs 4x less than
64x64 at every step of training and sampling.

A creature's *identity* is its (shape, colour, pattern): what a character LoRA must learn. The
other attributes (eyes, accessory, background, position, scale) vary freely, as pose and setting
do in a real character dataset. Identities listed in HELD_OUT never appear in pre-training: they
are the characters the LoRAs learn.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

SIZE = 32
SUPERSAMPLE = 4  # draw at 128 px, downsample: smooth edges at 32 px

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star")
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (50, 170, 60),
    "teal": (20, 170, 170), "blue": (40, 80, 220), "purple": (140, 60, 200), "pink": (245, 120, 190),
}
PATTERNS = ("plain", "striped", "dotted")
EYES = ("one", "two", "three")
ACCESSORIES = ("none", "hat", "bow", "antenna")
BACKGROUNDS = {
    "white": (245, 245, 245), "grey": (150, 150, 150), "sky": (170, 210, 250),
    "sand": (235, 215, 160), "mint": (190, 240, 200), "night": (30, 30, 60),
}

# The characters: never seen in pre-training as a combination (each attribute alone is).
HELD_OUT = (("star", "teal", "dotted"), ("hexagon", "pink", "striped"))

ATTRIBUTES = {
    "shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS, "eyes": EYES,
    "accessory": ACCESSORIES, "background": tuple(BACKGROUNDS),
}


@dataclass(frozen=True)
class Creature:
    shape: str
    colour: str
    pattern: str
    eyes: str
    accessory: str
    background: str
    dx: int = 0  # offset of the body centre, pixels at 32 px
    dy: int = 0
    scale: float = 1.0

    @property
    def identity(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.pattern)

    def labels(self) -> dict[str, int]:
        """Class index of every attribute (for the feature network's heads)."""
        return {k: ATTRIBUTES[k].index(getattr(self, k)) for k in ATTRIBUTES}


def sample_creature(rng: random.Random, identity: tuple[str, str, str] | None = None, allow_held_out: bool = False) -> Creature:
    while True:
        shape, colour, pattern = identity or (rng.choice(SHAPES), rng.choice(tuple(COLOURS)), rng.choice(PATTERNS))
        if identity or allow_held_out or (shape, colour, pattern) not in HELD_OUT:
            break
    return Creature(
        shape, colour, pattern,
        eyes=rng.choice(EYES), accessory=rng.choice(ACCESSORIES), background=rng.choice(tuple(BACKGROUNDS)),
        dx=rng.randint(-3, 3), dy=rng.randint(-2, 3), scale=rng.uniform(0.85, 1.1),
    )


def caption(c: Creature, rng: random.Random | None = None, identity_words: str | None = None) -> str:
    """'a teal dotted star creature with two eyes and a hat on a sky background'. With
    `identity_words` (e.g. the trigger) in place of colour/pattern/shape. With `rng`, the
    non-identity details are sometimes left out, so the model also follows short prompts."""
    who = identity_words or f"{c.colour} {'' if c.pattern == 'plain' else c.pattern + ' '}{c.shape}"
    parts = [f"a {who} creature"]
    keep = (lambda: True) if rng is None else (lambda: rng.random() < 0.7)
    if keep():
        parts.append(f"with {c.eyes} {'eye' if c.eyes == 'one' else 'eyes'}")
    if c.accessory != "none" and keep():
        parts.append(f"and a {c.accessory}" if len(parts) > 1 else f"with a {c.accessory}")
    if keep():
        parts.append(f"on a {c.background} background")
    return " ".join(parts)


def vocabulary() -> list[str]:
    """Every word a caption can use: the tokenizer gives each one token."""
    words = {"a", "creature", "with", "and", "on", "background", "eye", "eyes", "photo", "of", "sks", "ohwx"}
    for values in ATTRIBUTES.values():
        words.update(values)
    return sorted(words)


def render(c: Creature) -> "PIL.Image.Image":  # noqa: F821
    from PIL import Image, ImageDraw

    s = SUPERSAMPLE
    big = SIZE * s
    img = Image.new("RGB", (big, big), BACKGROUNDS[c.background])
    draw = ImageDraw.Draw(img)
    cx, cy = (SIZE / 2 + c.dx) * s, (SIZE / 2 + 1 + c.dy) * s
    r = 9.5 * c.scale * s
    colour = COLOURS[c.colour]
    body = _shape_polygon(c.shape, cx, cy, r)
    if body is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon(body, fill=colour)
    _pattern(img, c, cx, cy, r, body)
    _eyes(draw, c, cx, cy, r)
    _accessory(draw, c, cx, cy, r)
    return img.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def _shape_polygon(shape: str, cx: float, cy: float, r: float):
    import math

    def regular(n, rot, radius=r):
        return [(cx + radius * math.cos(rot + 2 * math.pi * k / n), cy + radius * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)]

    if shape == "circle":
        return None
    if shape == "square":
        q = r * 0.88
        return [(cx - q, cy - q), (cx + q, cy - q), (cx + q, cy + q), (cx - q, cy + q)]
    if shape == "triangle":
        return regular(3, -math.pi / 2, r * 1.15)
    if shape == "diamond":
        return regular(4, -math.pi / 2, r * 1.1)
    if shape == "hexagon":
        return regular(6, 0)
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r * 1.15 if k % 2 == 0 else r * 0.5
            a = -math.pi / 2 + math.pi * k / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(shape)


def _pattern(img, c: Creature, cx, cy, r, body) -> None:
    """Stripes or dots in a darker shade, clipped to the body."""
    if c.pattern == "plain":
        return
    from PIL import Image, ImageDraw

    mask = Image.new("L", img.size, 0)
    md = ImageDraw.Draw(mask)
    if body is None:
        md.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        md.polygon(body, fill=255)
    layer = Image.new("L", img.size, 0)
    ld = ImageDraw.Draw(layer)
    step = r * 0.55
    if c.pattern == "striped":
        y = cy - 2 * r
        while y < cy + 2 * r:
            ld.rectangle((cx - 2 * r, y, cx + 2 * r, y + step * 0.45), fill=255)
            y += step
    else:
        dot = r * 0.16
        for i in range(-3, 4):
            for j in range(-3, 4):
                x, y = cx + i * step, cy + j * step + (step / 2 if i % 2 else 0)
                ld.ellipse((x - dot, y - dot, x + dot, y + dot), fill=255)
    from PIL import ImageChops

    shade = tuple(int(v * 0.45) for v in COLOURS[c.colour])
    img.paste(Image.new("RGB", img.size, shade), mask=ImageChops.multiply(mask, layer))


def _eyes(draw, c: Creature, cx, cy, r) -> None:
    n = EYES.index(c.eyes) + 1
    er = r * 0.2
    y = cy - r * 0.15
    xs = [cx] if n == 1 else [cx - r * 0.35, cx + r * 0.35] if n == 2 else [cx - r * 0.45, cx, cx + r * 0.45]
    for x in xs:
        draw.ellipse((x - er, y - er, x + er, y + er), fill=(255, 255, 255))
        draw.ellipse((x - er * 0.5, y - er * 0.5, x + er * 0.5, y + er * 0.5), fill=(0, 0, 0))


def _accessory(draw, c: Creature, cx, cy, r) -> None:
    top = cy - r
    black = (20, 20, 20)
    if c.accessory == "hat":
        draw.rectangle((cx - r * 0.6, top - r * 0.15, cx + r * 0.6, top + r * 0.05), fill=black)
        draw.rectangle((cx - r * 0.35, top - r * 0.75, cx + r * 0.35, top - r * 0.1), fill=black)
    elif c.accessory == "bow":
        y = cy + r * 0.55
        draw.polygon([(cx, y), (cx - r * 0.45, y - r * 0.25), (cx - r * 0.45, y + r * 0.25)], fill=(200, 0, 60))
        draw.polygon([(cx, y), (cx + r * 0.45, y - r * 0.25), (cx + r * 0.45, y + r * 0.25)], fill=(200, 0, 60))
    elif c.accessory == "antenna":
        draw.line((cx, top + r * 0.1, cx, top - r * 0.6), fill=black, width=max(1, int(r * 0.12)))
        draw.ellipse((cx - r * 0.18, top - r * 0.78, cx + r * 0.18, top - r * 0.42), fill=(250, 230, 0))


def world_samples(n: int, seed: int, allow_held_out: bool = False) -> list[tuple[Creature, str]]:
    """`n` pre-training (creature, caption) pairs, deterministic from `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c = sample_creature(rng, allow_held_out=allow_held_out)
        out.append((c, caption(c, rng)))
    return out


def write_character(folder: str | Path, identity: tuple[str, str, str], n: int = 20, seed: int = 0, trigger: str = "[trigger]") -> None:
    """A character dataset: `n` images of one identity in varied settings, each with a .txt
    caption in which the trigger stands for the identity ('a [trigger] creature with ...')."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        c = sample_creature(rng, identity=identity)
        render(c).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text("photo of " + caption(c, rng, identity_words=trigger) + "\n")


def creature_dict(c: Creature) -> dict:
    return asdict(c)
