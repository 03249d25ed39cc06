"""The benchmarks keep running: the training-step benchmark on the tiny model (CPU), its FLOP
count on the real 9B/4B architecture (meta device, no weights), lanes against one LoRA per
training, merged sampling and the arithmetic floor (mini model)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


def bench(*args):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train_step.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_train_step_benchmark_runs_on_cpu():
    out = bench("--model", "tiny", "--steps", "2", "--warmup", "1", "--resolutions", "64")
    row = next(line for line in out.splitlines() if line.startswith("| 64 |"))
    seconds = float(row.split("|")[3])
    assert seconds > 0


def test_flop_count_of_the_real_architecture():
    out = bench("--model", "4b", "--flops-only", "--resolutions", "512")
    assert "model 4b: 3.8" in out  # 3.88 B params (+ the LoRA) built from the published config
    row = next(line for line in out.splitlines() if line.startswith("| 512 |"))
    tflops = float(row.split("|")[3])
    assert 15 < tflops < 30  # fwd + input-grad bwd at 1024 image + 512 text tokens


def run_benchmark(name, *args):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_lanes_benchmark_prints_the_ratio_and_each_lane_matches_its_reference():
    out = run_benchmark("bench_lanes.py", "--steps", "4", "--lanes", "5")
    row = next(line for line in out.splitlines() if line.startswith("| lanes of 5 |"))
    speed_up, worst = row.split("|")[3], row.split("|")[4]
    assert float(speed_up.strip().rstrip("x")) > 0
    assert float(worst) < 1e-4  # the five lanes are the five single-LoRA trainings


@pytest.mark.slow
def test_merged_sampling_benchmark_prints_the_ratio():
    out = run_benchmark("bench_merged_sampling.py")
    line = next(line for line in out.splitlines() if line.startswith("speed-up:"))
    assert float(line.split("largest pixel difference:")[1]) < 1e-3  # the same samples, up to rounding


def test_the_flop_count_leaves_out_the_checkpoint_recomputation():
    """Model FLOPs for MFU: the same at a resolution counted before and after gradient
    checkpointing was switched on by the first training (the H200 run counted the recomputed
    forward at its second and third resolutions and overstated their MFU)."""
    out = bench("--model", "tiny", "--steps", "1", "--warmup", "1", "--resolutions", "64", "64", "--gradient-checkpointing")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 64 |")]
    assert len(rows) == 2 and rows[0][5] == rows[1][5]


def test_sampling_benchmark_runs_on_cpu():
    out = run_benchmark("bench_sampling.py", "--model", "tiny", "--resolutions", "32")
    rows = {line.split("|")[1].strip(): float(line.split("|")[5]) for line in out.splitlines() if line.startswith(("| base", "| distilled"))}
    assert rows["base"] > rows["distilled"] > 0  # 50 steps with CFG against 4 without


def test_the_floor_counts_the_committed_sweeps_work_from_its_report():
    """The arithmetic floor multiplies per-unit times by the sweep's work: every lr's optimizer
    steps to where it collapsed (or stayed fine to the budget), its sampled checkpoints and its
    validation points between them. Counted here from the collapse steps the report states."""
    import json

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_arithmetic_floor import sweep_work

    path = REPO / "sweeps" / "lr_vs_steps" / "report.json"
    work = sweep_work(path)
    metrics = json.loads(path.read_text())["answer"]["metrics"]
    collapses = [v for k, v in metrics.items() if k.startswith("collapse_step/")]
    # 5e-5 never collapsed and trained to the refinement budget, 2 x the grid's 2500 steps
    ends = [*collapses, 5000]
    assert len(ends) == 6 and work["steps"] == sum(ends)
    assert work["evaluations"] == sum(e // 500 for e in ends)  # a sampled checkpoint every 500 steps
    assert work["validation"] == work["evaluations"]  # one validation point halfway between checkpoints
    assert work["worker_s"] == metrics["cost/measured_train_seconds"] + metrics["cost/measured_eval_seconds"]


@pytest.mark.slow
def test_floor_benchmark_prints_the_sweeps_floor_from_its_measured_units():
    import re

    out = run_benchmark("bench_arithmetic_floor.py", "--steps", "4")
    arithmetic = {}
    for line in out.splitlines():
        if line.startswith("| ") and " ms |" in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            arithmetic[cells[0]] = float(cells[2].removesuffix(" ms")) / 1000
    work = re.search(r"(\d+) optimizer steps, (\d+) sampled checkpoints, (\d+) validation points", out)
    steps, evaluations, validation = map(int, work.groups())
    expected = (steps * arithmetic["training step, lanes of 3 (per lane)"] + evaluations * arithmetic["checkpoint evaluation (48 samples)"]
                + validation * arithmetic["validation point"])
    floor = float(re.search(r"its arithmetic alone: (\d+) worker-seconds", out).group(1))
    assert abs(floor - expected) <= 0.01 * expected + 1, out
