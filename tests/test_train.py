"""The training loop on the tiny model: it learns, it is reproducible, it survives a NaN."""

from __future__ import annotations

import dataclasses
import signal
import sys

import pytest
import torch

from klein_sweep import interrupts
from klein_sweep.config import DataConfig, TrainConfig
from klein_sweep.data.folder import load_examples
from klein_sweep.data.encoding import EncodingCache, EncodingKey, encode_data
from klein_sweep.lora.adapters import inject_lora
from klein_sweep.models.tiny import TINY_MAX_SEQUENCE_LENGTH, TINY_TEXT_LAYERS, build_tiny_pipeline
from klein_sweep.tracking import NullTracker
from klein_sweep.training.loop import Batch, checkpoint_schedule, flow_matching_loss, train_lora


def setup(tiny_data, lr=1e-3, **train_kw):
    pipe = build_tiny_pipeline(0)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    examples = load_examples(DataConfig(path=str(tiny_data), resolution=32))
    key = EncodingKey("tiny", 32, tuple(TINY_TEXT_LAYERS), TINY_MAX_SEQUENCE_LENGTH)
    data = encode_data(pipe, examples, key, EncodingCache(None))
    cfg = TrainConfig(lr=lr, steps=1, rank=8, batch_size=4, **train_kw)
    params = inject_lora(pipe.transformer, rank=cfg.rank, alpha=cfg.alpha, preset="all_linear", seed=0)
    return pipe, data, cfg, params


def fixed_batch(data, n=8, seed=123):
    g = torch.Generator().manual_seed(seed)
    return Batch(
        latents=data.latents[:n],
        prompt_embeds=data.prompt_embeds[:n],
        noise=torch.randn(data.latents[:n].shape, generator=g),
        sigmas=torch.rand(n, generator=g) * 0.8 + 0.1,
    )


def test_short_training_lowers_loss_on_a_fixed_batch(tiny_data):
    pipe, data, cfg, params = setup(tiny_data, lr=1e-2)
    batch = fixed_batch(data)
    with torch.no_grad():
        before = flow_matching_loss(pipe.transformer, batch, "cpu").item()
    result = train_lora(pipe.transformer, params, data, cfg, steps=60, device="cpu", progress=False)
    with torch.no_grad():
        after = flow_matching_loss(pipe.transformer, batch, "cpu").item()
    assert result.status == "finished" and result.steps_done == 60
    assert after < 0.8 * before, (before, after)  # measured: 1.41 -> 1.01


def test_same_seed_same_run(tiny_data):
    runs = []
    for _ in range(2):
        pipe, data, cfg, params = setup(tiny_data, grad_accum=2)
        runs.append(train_lora(pipe.transformer, params, data, cfg, steps=5, device="cpu", caption_dropout=0.5, progress=False).losses)
    assert runs[0] == runs[1]


@pytest.mark.slow  # ~40 s of compiling on 2 cores
def test_compiled_blocks_train_as_the_eager_model_does(tiny_data, monkeypatch):
    """train.compile: the same losses and LoRA weights as eager, up to float rounding; the blocks
    are compiled once per model."""
    from diffusers import ModelMixin

    from klein_sweep.training.loop import compile_blocks

    compiles, real = [], ModelMixin.compile_repeated_blocks
    monkeypatch.setattr(ModelMixin, "compile_repeated_blocks", lambda self, *a, **k: (compiles.append(self), real(self, *a, **k)))
    runs = []
    for compiled in (False, True):
        pipe, data, cfg, params = setup(tiny_data, compile=compiled)
        losses = train_lora(pipe.transformer, params, data, cfg, steps=4, device="cpu", progress=False).losses
        runs.append((losses, [p.detach().clone() for p in params]))
    compile_blocks(pipe.transformer)  # a later training on the same model reuses the compiled blocks
    assert compiles == [pipe.transformer]
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-4, atol=1e-6)
    for compiled_p, eager_p in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(compiled_p, eager_p, rtol=1e-3, atol=1e-5)


def test_checkpoints_and_stop_callback(tiny_data):
    pipe, data, cfg, params = setup(tiny_data)
    seen = []

    def on_checkpoint(event, model):
        seen.append(event.step)
        return event.step >= 4

    tracker = NullTracker()
    result = train_lora(
        pipe.transformer, params, data, cfg, steps=10, device="cpu", checkpoints=[2, 4, 6, 10],
        on_checkpoint=on_checkpoint, tracker=tracker, progress=False,
    )
    assert seen == [2, 4] and result.status == "stopped" and result.steps_done == 4
    assert [s for s, k, _ in tracker.metrics if k == "train/loss"] == [1, 2, 3, 4]
    assert checkpoint_schedule(10, 4, extra=[5, 50]) == [4, 5, 8, 10]
    assert checkpoint_schedule(10, 0) == [10]


def test_a_ctrl_c_swallowed_in_a_finalizer_stops_the_training_after_that_step(tiny_data):
    """Python prints and drops a KeyboardInterrupt raised inside a __del__ or weakref callback; a
    sweep worker then has seconds to mark its trials before it is killed, not the rest of the
    training."""

    class Finalized:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # the handler raises here, inside the finalizer

    def on_checkpoint(event, model):
        Finalized()  # collected at once
        return False

    pipe, data, cfg, params = setup(tiny_data)
    tracker = NullTracker()
    handler, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            train_lora(pipe.transformer, params, data, cfg, steps=10, device="cpu", checkpoints=[2],
                       on_checkpoint=on_checkpoint, tracker=tracker, progress=False)
    finally:
        signal.signal(signal.SIGINT, handler)
        sys.unraisablehook = hook
        interrupts.forget()
    assert [s for s, k, _ in tracker.metrics if k == "train/loss"] == [1, 2]


def test_a_second_training_in_one_process_may_use_another_precision(tiny_data):
    """A notebook trains in fp32, then in bf16: accelerate's per-process state must not ask for
    a restart."""
    pipe, data, cfg, params = setup(tiny_data)
    first = train_lora(pipe.transformer, params, data, cfg, steps=2, device="cpu", progress=False)
    bf16 = train_lora(pipe.transformer, params, data, dataclasses.replace(cfg, mixed_precision="bf16"), steps=2, device="cpu",
                      progress=False)
    again = train_lora(pipe.transformer, params, data, cfg, steps=2, device="cpu", progress=False)
    assert [r.status for r in (first, bf16, again)] == ["finished"] * 3
    from accelerate.state import AcceleratorState

    assert AcceleratorState().mixed_precision == "no"  # the last training's


def test_nonfinite_loss_ends_the_trial_with_a_reason(tiny_data):
    pipe, data, cfg, params = setup(tiny_data)
    data.latents[3] = float("nan")
    cfg.batch_size = 8  # every batch holds the poisoned image
    result = train_lora(pipe.transformer, params, data, cfg, steps=5, device="cpu", progress=False)
    assert result.status == "diverged" and result.steps_done == 1
    assert "non-finite training loss" in result.reason


def test_lr_schedule_with_warmup(tiny_data):
    pipe, data, cfg, params = setup(tiny_data, lr_schedule="constant_with_warmup", warmup_steps=4)
    tracker = NullTracker()
    train_lora(pipe.transformer, params, data, cfg, steps=6, device="cpu", tracker=tracker, progress=False)
    lrs = [v for _, k, v in tracker.metrics if k == "train/lr"]
    assert lrs[0] < lrs[2] < lrs[4] == lrs[5] == cfg.lr


def test_continuing_a_saved_training_equals_one_uninterrupted_run(tiny_data, tmp_path):
    """Refinement continues grid trainings from their saved state: the continued LoRA must be the
    LoRA of one longer run, bit for bit (weights, Adam moments, warmup position, data order)."""
    from klein_sweep.training.resume import load_train_state

    kw = dict(lr_schedule="constant_with_warmup", warmup_steps=4, grad_accum=2)
    pipe, data, cfg, params = setup(tiny_data, **kw)
    straight = train_lora(pipe.transformer, params, data, cfg, steps=9, device="cpu", caption_dropout=0.5, progress=False)
    expected = [p.detach().clone() for p in params]

    pipe, data, cfg, params = setup(tiny_data, **kw)
    first = train_lora(pipe.transformer, params, data, cfg, steps=5, device="cpu", caption_dropout=0.5, progress=False,
                       save_state_to=tmp_path / "state.pt")
    pipe, data, cfg, params = setup(tiny_data, **kw)  # a fresh model and LoRA, as another worker would have
    state = load_train_state(tmp_path / "state.pt")
    assert state.step == 5
    rest = train_lora(pipe.transformer, params, data, cfg, steps=9, device="cpu", caption_dropout=0.5, progress=False,
                      resume_from=state)
    assert rest.steps_done == 9 and len(rest.losses) == 4
    assert first.losses + rest.losses == straight.losses
    assert all(torch.equal(a, b) for a, b in zip(params, expected))
