"""What a long sweep meets, each injected at the real seam where it happens: a CUDA OOM in the
forward pass, a NaN/inf loss, a disk that fills up mid-write. The study records each and goes on;
no file under a final name is ever half-written."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from sweep_helpers import COMMON, compose_plan

GRID = ["+sweep=lr_vs_steps", *COMMON, "sweep.params.train.lr.values=[1e-4,2e-4]", "sweep.params.train.steps.values=[2,4]"]


def tiny_plan(tmp_path: Path, *extra: str):
    return compose_plan([*GRID, f"data.cache_dir={tmp_path / 'cache'}", f"sweep.output_dir={tmp_path / 'sweep'}",
                         "tracking=none", *extra])


def fault_in_first_trial(monkeypatch, fault):
    """Wrap the training loss so that its 3rd call (step 3 of the first trial) meets `fault`."""
    import klein_sweep.training.loop as train

    real, calls = train.flow_matching_loss, {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        return fault(real(*args, **kwargs)) if calls["n"] == 3 else real(*args, **kwargs)

    monkeypatch.setattr(train, "flow_matching_loss", loss)


def test_cuda_oom_fails_the_trial_with_its_reason_frees_it_and_the_study_goes_on(tmp_path, monkeypatch):
    import klein_sweep.training.loop as train
    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import run_sweep

    def oom(_loss):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    fault_in_first_trial(monkeypatch, oom)
    optimizers = []
    real_build = train._build_optimizer
    monkeypatch.setattr(train, "_build_optimizer", lambda *a: optimizers.append(weakref.ref(opt := real_build(*a))) or opt)

    plan = tiny_plan(tmp_path)
    summary = run_sweep(plan, progress=False)
    assert summary.failed == [0] and summary.ran == [1]
    study = open_study(plan, create=False)
    reason = study.trials[0].user_attrs["failure_reason"]
    assert reason.startswith("out of memory (OutOfMemoryError: CUDA out of memory") and "train.rank" in reason
    assert study.trials[1].user_attrs["state"] in ("good", "underfit", "collapsed")
    gc.collect()
    assert optimizers[0]() is None  # the failed trial's optimizer state (and its LoRA) was released
    # A failed trial is a result, not an interruption: a rerun does not retry it.
    assert run_sweep(plan, progress=False).ran == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_is_a_collapsed_data_point_not_a_crash(tmp_path, monkeypatch, bad):
    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import run_sweep

    fault_in_first_trial(monkeypatch, lambda loss: loss * bad)
    plan = tiny_plan(tmp_path)
    summary = run_sweep(plan, progress=False)
    assert summary.failed == [] and summary.ran == [0, 1]
    first = open_study(plan, create=False).trials[0]
    assert first.user_attrs["state"] == "collapsed" and first.user_attrs["collapse_step"] == 3
    rows = first.user_attrs["checkpoints"]
    assert rows[0]["step"] == 2 and rows[-1]["loss"] in ("nan", "inf") and rows[-1]["reason"].startswith("non-finite")
    assert first.value is not None  # its best checkpoint before the collapse (step 2) is its value
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "collapsed" in report


def half_then_disk_full(real_bytes):
    def save_file(tensors, filename, metadata=None):
        data = real_bytes(tensors, metadata=metadata)
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device", str(filename))

    return save_file


def test_disk_full_during_a_lora_write_leaves_no_corrupt_file(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import safe_open

    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import run_sweep

    real_save_file, saves = safetensors.torch.save_file, {"n": 0}

    def flaky(tensors, filename, metadata=None):
        saves["n"] += "pytorch_lora_weights" in Path(filename).name  # the LoRA, written aside then renamed
        if saves["n"] == 2:  # the first trial's second LoRA write (its last checkpoint)
            return half_then_disk_full(safetensors.torch.save)(tensors, filename, metadata)
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    plan = tiny_plan(tmp_path, "sweep.params.train.lr.values=[1e-3,2e-3]")
    summary = run_sweep(plan, progress=False)
    assert 0 in summary.failed and 1 in summary.ran
    reason = open_study(plan, create=False).trials[0].user_attrs["failure_reason"]
    assert "No space left on device" in reason
    written = list((tmp_path / "sweep").rglob("*.safetensors"))
    assert written, "the second trial's LoRA should exist"
    for path in written:  # every LoRA under its final name opens and reads whole
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    assert not [p for p in (tmp_path / "sweep").rglob("*") if ".tmp" in p.name]


def test_disk_full_during_a_report_write_keeps_the_previous_report(tmp_path, monkeypatch):
    from klein_sweep.report import write_report
    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import run_sweep

    plan = tiny_plan(tmp_path)
    run_sweep(plan, progress=False)
    folder = tmp_path / "sweep"
    before = {name: (folder / name).read_bytes() for name in ("report.md", "report.json", "heatmaps.png")}

    real_write_text = Path.write_text

    def write_text(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OSError):
        write_report(folder, study=open_study(plan, create=False))
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]
