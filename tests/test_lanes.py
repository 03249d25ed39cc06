"""Lanes (several lrs in one batched forward) against the reference, one LoRA per training."""

from __future__ import annotations

import pytest
from test_train import setup

from klein_sweep.training.lanes import LaneAdapters
from klein_sweep.training.loop import LaneSpec, train_lanes
from klein_sweep.training.loop import train_lora
from klein_sweep.training.resume import load_train_state

LRS = [2e-3, 1e-2, 5e-2]


def single(tiny_data, lr, steps, **kw):
    pipe, data, cfg, params = setup(tiny_data, lr=lr, grad_accum=2)
    result = train_lora(pipe.transformer, params, data, cfg, steps=steps, device="cpu", caption_dropout=0.5, progress=False, **kw)
    return result, [p.detach().clone() for p in params]


def laned(tiny_data, lrs, steps, **kw):
    pipe, data, cfg, params = setup(tiny_data, lr=lrs[0], grad_accum=2)
    adapters = LaneAdapters(pipe.transformer, len(lrs))
    specs = [LaneSpec(lr=lr, save_state_to=kw.pop(f"save_{i}", None), resume_from=kw.pop(f"resume_{i}", None))
             for i, lr in enumerate(lrs)]
    results = train_lanes(pipe.transformer, adapters, specs, data, cfg, steps=steps, device="cpu", caption_dropout=0.5,
                          progress=False, **kw)
    return pipe, adapters, params, results


def close(a, b, tol=1e-4):
    """Every tensor within `tol` of its counterpart, relative to its norm: batched matmuls round
    differently from one LoRA's (measured worst 8e-6 over 12 steps at lr 5e-2)."""
    return all(float((x.detach() - y.detach()).norm()) <= tol * float(y.detach().norm()) for x, y in zip(a, b))


def test_each_lane_trains_as_its_own_lora_would(tiny_data):
    pipe, adapters, params, results = laned(tiny_data, LRS, steps=12)
    for lane, lr in enumerate(LRS):
        reference, weights = single(tiny_data, lr, steps=12)
        assert results[lane].status == "finished"
        assert results[lane].losses == pytest.approx(reference.losses, rel=1e-4)
        assert close(adapters.params[lane], weights), f"lane {lane} (lr {lr}) drifted from its single-LoRA training"
    # Different lrs really are different trainings, by more than the tolerance above.
    assert not close(adapters.params[0], adapters.params[2], tol=1e-2)
    adapters.load(1)  # the model's ordinary adapter now is lane 1's LoRA
    assert close(params, adapters.params[1], tol=0)


def test_a_stopped_lane_leaves_and_the_others_go_on(tiny_data):
    seen = []

    def on_checkpoint(lane, event, model):
        seen.append((lane, event.step, event.lr))
        return lane == 1 and event.step >= 4  # lane 1 "collapses" at step 4

    _, adapters, _, results = laned(tiny_data, LRS, steps=8, checkpoints=[4, 8], on_checkpoint=on_checkpoint)
    assert seen == [(0, 4, LRS[0]), (1, 4, LRS[1]), (2, 4, LRS[2]), (0, 8, LRS[0]), (2, 8, LRS[2])]
    assert [r.status for r in results] == ["finished", "stopped", "finished"] and results[1].steps_done == 4
    reference, weights = single(tiny_data, LRS[2], steps=8)
    assert close(adapters.params[2], weights)  # a lane leaving does not disturb the rest
    stopped, weights_at_4 = single(tiny_data, LRS[1], steps=4)
    assert close(adapters.params[1], weights_at_4)  # frozen where its callback stopped it


def test_a_diverging_lane_is_reported_and_the_others_finish(tiny_data):
    _, adapters, _, results = laned(tiny_data, [1e-3, 1e9], steps=6)
    assert results[0].status == "finished" and len(results[0].losses) == 6
    assert results[1].status == "diverged" and "non-finite training loss" in results[1].reason


def test_a_lanes_saved_state_continues_on_the_single_path(tiny_data, tmp_path):
    laned(tiny_data, LRS, steps=5, save_1=tmp_path / "lane1.pt")
    state = load_train_state(tmp_path / "lane1.pt")
    assert state.step == 5
    _, expected = single(tiny_data, LRS[1], steps=9)
    rest, continued = single(tiny_data, LRS[1], steps=9, resume_from=state)
    assert rest.steps_done == 9 and len(rest.losses) == 4
    assert close(continued, expected)


def test_saved_lanes_resume_together_as_each_training_would_alone(tiny_data, tmp_path):
    """Refinement continuations train as lanes: each lane resumes its own saved state (LoRA,
    optimizer moments, schedule) and ends where its uninterrupted single training ends."""
    laned(tiny_data, LRS, steps=5, **{f"save_{i}": tmp_path / f"lane{i}.pt" for i in range(len(LRS))})
    states = {f"resume_{i}": load_train_state(tmp_path / f"lane{i}.pt") for i in range(len(LRS))}
    _, adapters, _, results = laned(tiny_data, LRS, steps=9, **states)
    for lane, lr in enumerate(LRS):
        reference, expected = single(tiny_data, lr, steps=9)
        assert results[lane].steps_done == 9 and results[lane].losses == pytest.approx(reference.losses[5:], rel=1e-4)
        assert close(adapters.params[lane], expected), f"lane {lane} (lr {lr}) resumed off its own training"


def test_a_sweep_with_lanes_records_each_trial_as_if_it_ran_alone(tmp_path):
    from mlflow.tracking import MlflowClient
    from sweep_helpers import COMMON, compose_plan

    from klein_sweep.lora.compat import read_any_lora
    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import run_sweep

    def sweep(name, lanes):
        uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
        plan = compose_plan(["+sweep=lr_vs_steps", "sweep.refine=false", *COMMON, "sweep.params.train.lr.values=[1e-3,3e-3,1e-2]",
                             "sweep.params.train.steps.values=[3,6]", f"sweep.lanes={lanes}", f"data.cache_dir={tmp_path / 'cache'}",
                             f"sweep.output_dir={tmp_path / name / 'sweep'}", f"tracking.uri={uri}"])
        summary = run_sweep(plan, progress=False)
        return summary, open_study(plan, create=False), uri

    alone, alone_study, _ = sweep("alone", 1)
    laned, laned_study, uri = sweep("laned", 3)
    assert sorted(laned.ran) == sorted(alone.ran) == [0, 1, 2] and not laned.failed
    client = MlflowClient(uri)
    for a, b in zip(alone_study.trials, laned_study.trials):
        assert a.params == b.params and a.state == b.state
        rows_a, rows_b = a.user_attrs["checkpoints"], b.user_attrs["checkpoints"]
        assert [r["step"] for r in rows_b] == [3, 6] and [r["state"] for r in rows_b] == [r["state"] for r in rows_a]
        for ra, rb in zip(rows_a, rows_b):
            assert rb["id_sim"] == pytest.approx(ra["id_sim"], abs=1e-4)
        run = client.get_run(b.user_attrs["mlflow_run_id"])  # its own run, its own lr, its own loss curve
        assert float(run.data.params["train.lr"]) == b.params["train.lr"]
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 6
        lora = tmp_path / "laned" / "sweep" / "trials" / f"{b.number:04d}" / "lora" / "pytorch_lora_weights.safetensors"
        assert read_any_lora(lora)  # diffusers reads every lane's file


def test_auto_lanes_share_the_grids_lrs_among_the_workers_on_a_cpu(tmp_path):
    from sweep_helpers import compose_plan

    from klein_sweep.sweep.parallel import resolve_lanes

    def plan(*extra):
        return compose_plan(["+sweep=lr_vs_steps", "tracking=none", f"sweep.output_dir={tmp_path}", *extra])

    assert resolve_lanes(plan(), workers=2) == 3  # the shipped sweep: 5 lrs over 2 workers, 3 + 2
    assert resolve_lanes(plan(), workers=1) == 5
    assert resolve_lanes(plan("sweep.lanes=1"), workers=2) == 1
    assert resolve_lanes(plan("train.compile=true"), workers=2) == 3  # compiled blocks train lanes too
    assert resolve_lanes(plan("sweep.role=work"), workers=1) == 1  # it cannot know its fellow workers
    assert resolve_lanes(plan("model=flux2_klein_base_4b", "eval.enabled=false"), workers=1) == 1  # a real model: one LoRA per training


@pytest.mark.slow  # 15-50 s of compiling on 2 cores (a warm or cold inductor cache)
def test_compiled_lanes_train_as_eager_lanes_and_compile_once(tiny_data):
    """train.compile with lanes: the LoRAs of eager lanes up to float rounding, and each block
    class compiles once: a later training, on new lane weights, reuses the graphs."""
    import torch
    from torch._dynamo.utils import counters

    _, eager, _, _ = laned(tiny_data, LRS, steps=4)
    pipe, data, cfg, params = setup(tiny_data, lr=LRS[0], grad_accum=2, compile=True)

    def train(adapters):
        return train_lanes(pipe.transformer, adapters, [LaneSpec(lr=lr) for lr in LRS], data, cfg, steps=4, device="cpu",
                           caption_dropout=0.5, progress=False)

    torch._dynamo.reset()
    counters.clear()
    compiled = LaneAdapters(pipe.transformer, len(LRS))
    assert [r.status for r in train(compiled)] == ["finished"] * 3
    graphs = counters["stats"]["unique_graphs"]
    # One graph per block class (the tiny model has one double and one single block) for all
    # 4 steps; the bound forwards made 8 per class, up to dynamo's recompile limit, then ran eager.
    assert graphs == 2
    for lane in range(len(LRS)):
        assert close(compiled.params[lane], eager.params[lane], tol=1e-3), f"lane {lane} drifted from eager lanes"
    train(LaneAdapters(pipe.transformer, len(LRS)))
    assert counters["stats"]["unique_graphs"] == graphs, "a second lanes training recompiled the blocks"


def test_lanes_with_gradient_checkpointing_train_as_without(tiny_data):
    _, plain, _, _ = laned(tiny_data, LRS[:2], steps=4)
    pipe, data, cfg, params = setup(tiny_data, lr=LRS[0], grad_accum=2, gradient_checkpointing=True)
    adapters = LaneAdapters(pipe.transformer, 2)
    train_lanes(pipe.transformer, adapters, [LaneSpec(lr=lr) for lr in LRS[:2]], data, cfg, steps=4, device="cpu",
                caption_dropout=0.5, progress=False)
    for lane in range(2):  # the recomputed forward in backward is the lanes' forward too
        assert close(adapters.params[lane], plain.params[lane])
