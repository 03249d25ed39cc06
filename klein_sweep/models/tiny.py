"""A random tiny Flux2KleinPipeline built in code: the real diffusers/transformers classes at a few
hundred kB, offline, for tests and smoke runs. Deterministic from a seed.

Shapes at the default 32 px: image (3, 32, 32) -> VAE latent (4, 16, 16) -> patchified and
packed: 64 tokens x 16 channels. Text: 32 tokens, 3 Qwen3 layers of width 16 stacked -> 48.
"""

from __future__ import annotations

import string

import torch

# A byte-level BPE vocabulary needs every byte as a base symbol; Qwen's tokenizer maps bytes to
# printable unicode the same way GPT-2 does.


def _bytes_to_unicode() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars)))


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's chat template, reduced to what Flux2KleinPipeline uses: user turns, the generation
# prompt, and `enable_thinking=False` (an empty think block, as the real template emits).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def build_tokenizer(words: list[str]):
    """A Qwen2 byte-level BPE tokenizer whose merges spell each of `words` as one token (with and
    without a leading space), so captions made of these words tokenize one word per token; any
    other text still tokenizes byte by byte."""
    from transformers import Qwen2TokenizerFast

    byte_chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + byte_chars:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    to_unicode = _bytes_to_unicode()

    def add_merge(left: str, right: str) -> None:
        if left + right not in vocab:
            merges.append((left, right))
            vocab[left + right] = len(vocab)

    # BPE applies merges by rank, so every word's own chain comes before any space+word merge.
    encoded_words = ["".join(to_unicode[b] for b in w.encode()) for w in sorted(set(words))]
    for encoded in encoded_words:
        for i in range(1, len(encoded)):
            add_merge(encoded[:i], encoded[i])
    for encoded in encoded_words:
        add_merge(to_unicode[ord(" ")], encoded)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 4096
    return tokenizer


TINY_WORDS = ["photo", "of", "a", "an", "the", "sks", "creature", "in", "on", "with"] + list(string.ascii_lowercase)

# Bump when the architecture below changes: it is part of the encoding-cache key.
TINY_VERSION = 1
TINY_TEXT_LAYERS = [1, 2, 3]
TINY_MAX_SEQUENCE_LENGTH = 32


def build_tiny_pipeline(seed: int = 0):
    """Flux2KleinPipeline with random weights: 1 double + 1 single block, width 32."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer(TINY_WORDS)
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
    ).eval()
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        mid_block_add_attention=False,
    ).eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16 * len(TINY_TEXT_LAYERS),
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    ).eval()
    scheduler = build_klein_scheduler()
    return Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def build_klein_scheduler():
    """The flow-matching Euler scheduler with Klein's dynamic (resolution-dependent) shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


def write_tiny_character(folder, n: int = 8, size: int = 40, seed: int = 0) -> None:
    """The shipped `tiny_character` dataset: one made-up character (an orange disc with two dark
    eyes) at varied positions on varied plain backgrounds, 40x40 so that training crops to 32.
    Captions alternate between a .txt with the trigger and none (the default caption)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    backgrounds = ["lightblue", "palegreen", "lavender", "beige"]
    places = ["on grass", "in the sky", "in a room", "on sand"]
    for i in range(n):
        img = Image.new("RGB", (size, size), backgrounds[i % 4])
        draw = ImageDraw.Draw(img)
        cx, cy = (int(v) for v in rng.integers(14, size - 14, 2))
        r = int(rng.integers(8, 12))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(240, 120, 20))
        for dx in (-r // 3, r // 3):
            draw.ellipse((cx + dx - 2, cy - 3, cx + dx + 2, cy + 1), fill=(20, 20, 40))
        img.save(folder / f"{i:03d}.png")
        if i % 2 == 0:
            (folder / f"{i:03d}.txt").write_text(f"photo of [trigger] creature {places[i % 4]}\n")
