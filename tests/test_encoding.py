"""The encoding cache: a second run over the same data encodes nothing; keys track what matters."""

from __future__ import annotations

import torch

from klein_sweep.config import DataConfig
from klein_sweep.data.folder import load_examples
from klein_sweep.data.encoding import EncodingCache, EncodingKey, encode_data, release_text_encoder, release_vae_encoder
from klein_sweep.models.tiny import TINY_MAX_SEQUENCE_LENGTH, TINY_TEXT_LAYERS


def key(**kw):
    base = dict(model_id="tiny-v1-seed0", resolution=32, text_layers=tuple(TINY_TEXT_LAYERS), max_sequence_length=TINY_MAX_SEQUENCE_LENGTH)
    return EncodingKey(**{**base, **kw})


def counting(pipe):
    """Wrap the VAE encoder and text encoder to count calls."""
    calls = {"vae": 0, "text": 0}
    vae_encode, text_forward = pipe.vae.encode, pipe.text_encoder.forward

    def vae(*a, **k):
        calls["vae"] += 1
        return vae_encode(*a, **k)

    def text(*a, **k):
        calls["text"] += 1
        return text_forward(*a, **k)

    pipe.vae.encode, pipe.text_encoder.forward = vae, text
    return calls


def test_second_run_encodes_nothing(tiny_pipe, tiny_data, tmp_path):
    examples = load_examples(DataConfig(path=str(tiny_data), resolution=32))
    calls = counting(tiny_pipe)
    first = encode_data(tiny_pipe, examples, key(), EncodingCache(tmp_path / "cache"), extra_prompts=["a creature"])
    assert first.stats.misses == 8 + 5 and first.stats.hits == 0  # 8 images; 3 captions + "" + 1 extra
    assert calls["vae"] > 0 and calls["text"] > 0
    assert first.latents.shape == (8, 16, 8, 8)  # 4 channels x 2x2 patch, 32 px / 2 / 2
    assert first.prompt_embeds.shape == (8, 32, 48)

    calls.update(vae=0, text=0)
    release_text_encoder(tiny_pipe)  # a cache hit needs no text encoder at all
    release_vae_encoder(tiny_pipe)  # nor a VAE encoder
    assert tiny_pipe.text_encoder is None and tiny_pipe.vae.encoder is None
    second = encode_data(tiny_pipe, examples, key(), EncodingCache(tmp_path / "cache"), extra_prompts=["a creature"])
    assert calls == {"vae": 0, "text": 0}
    assert second.stats.misses == 0 and second.stats.hits == 13
    assert torch.equal(first.latents, second.latents)
    assert torch.equal(first.prompt_embeds, second.prompt_embeds)
    assert torch.equal(first.extra_prompt_embeds["a creature"], second.extra_prompt_embeds["a creature"])


def test_key_changes_invalidate(tiny_pipe, tiny_data, tmp_path):
    examples = load_examples(DataConfig(path=str(tiny_data), resolution=32))
    cache_dir = tmp_path / "cache"
    encode_data(tiny_pipe, examples, key(), EncodingCache(cache_dir))
    again = encode_data(tiny_pipe, examples, key(text_layers=(1, 3)), EncodingCache(cache_dir))
    assert again.stats.hits == 8 and again.stats.misses == 4  # latents reused, text re-encoded
    other_model = encode_data(tiny_pipe, examples, key(model_id="tiny-v1-seed1"), EncodingCache(cache_dir))
    assert other_model.stats.hits == 0
    # an edited image is a new entry
    (tiny_data / "000.png").write_bytes((tiny_data / "001.png").read_bytes())
    edited = encode_data(tiny_pipe, load_examples(DataConfig(path=str(tiny_data), resolution=32)), key(), EncodingCache(cache_dir))
    assert edited.stats.misses == 0  # 000 now has 001's bytes: the same key, a hit
    assert torch.equal(edited.latents[0], edited.latents[1])


def test_no_disk_cache_writes_nothing(tiny_pipe, tiny_data, tmp_path):
    examples = load_examples(DataConfig(path=str(tiny_data), resolution=32))
    data = encode_data(tiny_pipe, examples, key(), EncodingCache(None))
    assert data.stats.misses == 12 and not any(tmp_path.glob("**/*.safetensors"))


def test_released_encoders_refuse_new_work_and_decoding_still_works(tiny_pipe, tiny_data, tmp_path):
    import pytest

    examples = load_examples(DataConfig(path=str(tiny_data), resolution=32))
    release_vae_encoder(tiny_pipe)
    with pytest.raises(RuntimeError, match="VAE encoder was already released"):
        encode_data(tiny_pipe, examples, key(), EncodingCache(None))
    image = tiny_pipe.vae.decode(torch.zeros(1, 4, 4, 4)).sample  # evaluation still decodes
    assert image.shape == (1, 3, 8, 8) and torch.isfinite(image).all()
