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

GRID = ["+sweep=lr_vs_steps", "sweep.refine=false", *COMMON, "sweep.params.train.lr.values=[1e-4,2e-4]", "sweep.params.train.steps.values=[2,4]"]


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
    assert reason.startswith("out of memory (OutOfMemoryError: CUDA out of memory") and "train.gradient_checkpointing=true" in reason
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


def test_disk_full_during_a_lora_write_interrupts_the_trial_and_a_rerun_after_the_fix_runs_it(tmp_path, monkeypatch):
    import safetensors.torch
    from optuna.trial import TrialState
    from safetensors import safe_open

    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import MachineFault, run_sweep

    real_save_file, saves = safetensors.torch.save_file, {"n": 0}

    def flaky(tensors, filename, metadata=None):
        saves["n"] += "pytorch_lora_weights" in Path(filename).name  # the LoRA, written aside then renamed
        if saves["n"] == 2:  # the first trial's second LoRA write (its last checkpoint)
            return half_then_disk_full(safetensors.torch.save)(tensors, filename, metadata)
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    plan = tiny_plan(tmp_path, "sweep.params.train.lr.values=[1e-3,2e-3]")
    with pytest.raises(MachineFault, match="No space left on device.*trial 0 is marked interrupted.*run the same command again"):
        run_sweep(plan, progress=False)
    first = open_study(plan, create=False).trials[0]
    assert first.state == TrialState.FAIL and first.user_attrs["interrupted"] is True
    assert "failure_reason" not in first.user_attrs  # not the cell's fault: it is not a result
    others = open_study(plan, create=False).trials[1:]
    assert [t.state for t in others] == [TrialState.WAITING]  # the worker stopped instead of failing every cell
    assert not [p for p in (tmp_path / "sweep").rglob("*") if ".tmp" in p.name]

    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)  # the disk is freed
    summary = run_sweep(plan, progress=False)
    assert sorted(summary.ran) == [1, 2] and summary.failed == []
    done = [t for t in open_study(plan, create=False).trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["cell"]["train.lr"] for t in done) == [1e-3, 2e-3]
    written = list((tmp_path / "sweep").rglob("*.safetensors"))
    assert written
    for path in written:  # every LoRA under its final name opens and reads whole
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)


def test_a_failed_cell_stays_failed_until_retry_failed_queues_it_again(tmp_path, monkeypatch):
    import klein_sweep.training.loop as train
    from optuna.trial import TrialState

    from klein_sweep.report.results import load_results
    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import run_sweep

    def bug(_loss):
        raise ValueError("a settings fault")

    fault_in_first_trial(monkeypatch, bug)
    plan = tiny_plan(tmp_path)
    assert run_sweep(plan, progress=False).failed == [0]
    monkeypatch.undo()
    assert run_sweep(plan, progress=False).ran == []  # a settings fault is a result: not re-run
    assert [n for n, _, _ in load_results(open_study(plan, create=False)).failed] == [0]

    retry = tiny_plan(tmp_path, "sweep.retry_failed=true")  # not part of the plan: same study
    assert run_sweep(retry, progress=False).ran == [2]
    study = open_study(plan, create=False)
    assert study.trials[2].user_attrs["retry_of"] == 0 and study.trials[2].state == TrialState.COMPLETE
    assert study.trials[2].user_attrs["cell"] == study.trials[0].user_attrs["cell"]
    results = load_results(study)
    assert results.failed == [] and sorted(t.number for t in results.trials) == [1, 2]
    assert "failed" not in (tmp_path / "sweep" / "report.md").read_text().lower().split("## ")[1]
    assert run_sweep(retry, progress=False).ran == []  # nothing failed is left to retry


def test_disk_full_during_a_report_write_keeps_the_previous_report(tmp_path, monkeypatch):
    from klein_sweep.report import write_report
    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import run_sweep

    plan = tiny_plan(tmp_path)
    run_sweep(plan, progress=False)
    folder = tmp_path / "sweep"
    before = {name: (folder / name).read_bytes() for name in ("report.md", "report.json", "heatmaps.png")}

    real_write_text, writes = Path.write_text, []

    def write_text(self, data, *args, **kwargs):
        writes.append(self.name)
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OSError):
        write_report(folder, study=open_study(plan, create=False))
    assert writes and all(".tmp" in name for name in writes)  # the fault hit a write, aside from the report
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]
