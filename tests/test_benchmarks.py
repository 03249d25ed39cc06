"""The benchmarks keep running: the training-step benchmark on the tiny model (CPU), its FLOP
count on the real 9B/4B architecture (meta device, no weights), lanes against one LoRA per
training, merged sampling, the arithmetic floor and the workers' layout (mini model)."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO, run_python


def bench(*args):
    proc = run_python(REPO / "benchmarks" / "bench_train_step.py", *args, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    """The cells of the printed markdown table rows whose first cell is `first_cell`."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    return [r for r in rows if r[0] == first_cell]


def rounded(printed: str) -> tuple[float, float]:
    """(value, half a unit of its last printed digit): the interval a rounded figure stands for."""
    digits = printed.split(".")[1] if "." in printed else ""
    return float(printed), 0.5 * 10 ** -len(digits)


def ratio_bounds(num: str, den: str) -> tuple[float, float]:
    """The smallest and largest num/den that the two rounded printed figures allow."""
    (n, dn), (d, dd) = rounded(num), rounded(den)
    return (n - dn) / (d + dd), (n + dn) / max(d - dd, 1e-12)


def test_train_step_benchmark_prints_mfu_consistent_with_its_step_time_and_flops():
    """MFU = model FLOPs per second / the device's peak: the printed MFU agrees with the printed
    s/step and GFLOP/step at the given peak (tiny enough that the MFU has many digits), and a
    larger resolution costs more FLOPs per step."""
    peak = 1e-5  # TFLOP/s
    out = bench("--model", "tiny", "--steps", "2", "--warmup", "1", "--resolutions", "64", "128", "--peak-tflops", str(peak))
    assert "2 timed steps after 1" in out
    (r64,), (r128,) = table_rows(out, "64"), table_rows(out, "128")
    for res, tokens, seconds, peak_gib, gflop, mfu in (r64, r128):
        assert peak_gib == "nan"  # no GPU memory on a CPU
        low, high = ratio_bounds(gflop.replace(",", ""), seconds)  # GFLOP per second
        mfu_value, half = rounded(mfu.rstrip("%").replace(",", ""))
        assert low / (peak * 1e3) * 100 - half <= mfu_value <= high / (peak * 1e3) * 100 + half, (res, seconds, gflop, mfu)
    assert (r64[1], r128[1]) == ("16", "64")  # 64 px: VAE /8, then 2x2 patches -> 4 x 4 image tokens
    assert float(r128[4]) > float(r64[4])


def test_flop_count_of_the_real_architecture():
    """The 4B's step at 512 px: the same FLOPs the cost preview counts for that model, rank and
    targets, and the printed time floors are those FLOPs at 100% and 50% of an H100's 989 TFLOP/s."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from klein_sweep.config import CONF_DIR, build_settings, register_resolvers
    from klein_sweep.cost.flops import model_flops

    out = bench("--model", "4b", "--flops-only", "--resolutions", "512")
    assert "model 4b: 3.8" in out  # 3.88 B params (+ the LoRA) built from the published config
    (row,) = table_rows(out, "512")
    tokens, tflops, at_100, at_50 = row[1], row[2], row[3], row[4]
    assert tokens == "1024"  # 512 px / 8 (VAE) / 2 (patches) = 32 x 32
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=flux2_klein_base_4b", "train.rank=16", "train.targets=attn", "train.batch_size=1"])
    counted = model_flops(build_settings(OmegaConf.to_container(cfg, resolve=True)), 512, train_resolution=512).train_step
    assert abs(float(tflops) - counted / 1e12) <= rounded(tflops)[1] + 1e-9  # fwd + input-grad bwd, 1024 image + 512 text tokens
    low, high = ratio_bounds(tflops, "989")
    assert low - rounded(at_100)[1] <= float(at_100) <= high + rounded(at_100)[1]
    low, high = ratio_bounds(tflops, "494.5")
    assert low - rounded(at_50)[1] <= float(at_50) <= high + rounded(at_50)[1]


def run_benchmark(name, *args):
    proc = run_python(REPO / "benchmarks" / name, *args, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_lanes_benchmark_prints_the_ratio_and_each_lane_matches_its_reference():
    out = run_benchmark("bench_lanes.py", "--steps", "4", "--lanes", "5")
    assert "5 lrs x 4 steps" in out
    (reference,) = table_rows(out, "one LoRA per training (reference)")
    (row,) = table_rows(out, "lanes of 5")
    assert reference[2:] == ["1.00x", "-"]
    # the printed speed-up is the ratio of the two printed times, up to their rounding
    low, high = ratio_bounds(reference[1].removesuffix(" ms"), row[1].removesuffix(" ms"))
    speed_up, half = rounded(row[2].removesuffix("x"))
    assert low - half <= speed_up <= high + half, (reference, row)
    worst = row[3]
    # the five lanes are the five single-LoRA trainings: float32 rounding of a batched matmul
    # against five separate ones (1.5e-4 seen on one CPU); a lane with another lane's lr or
    # gradients would differ by percents
    assert float(worst) < 1e-3


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


COMMITTED_WORKER_S = 684.423  # sweeps/lr_vs_steps/report.json: cost/measured_train_seconds + cost/measured_eval_seconds


def test_the_floor_counts_the_committed_sweeps_work_from_its_report():
    """The arithmetic floor multiplies per-unit times by the sweep's work: every lr's optimizer
    steps to where it collapsed (or stayed fine to the budget), its sampled checkpoints and its
    validation points between them. The committed sweep, as the README states it: 4e-4 and the
    bisected 2.83e-4 collapse at step 2000, 2e-4 and 1.5e-4 at 3500, 1e-4 at 4000, 5e-5 still
    fine at the refinement's 5000."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_arithmetic_floor import sweep_work

    work = sweep_work(REPO / "sweeps" / "lr_vs_steps" / "report.json")
    assert work["steps"] == 2000 + 2000 + 3500 + 3500 + 4000 + 5000
    # economy recipe: every checkpoint (500 steps apart) screened, 5 + 4 + 7 + 7 + 8 + 10 (the
    # bisection evaluated 2500 too), and the deciding ones of them evaluated in full
    assert work["screened"] == 41 and work["evaluations"] == 24
    assert work["validation"] == 0  # economy: validation every 500 steps, at the checkpoints
    # the report's measured training (497.6 s) and evaluation (186.9 s) seconds of all workers
    assert work["worker_s"] == pytest.approx(COMMITTED_WORKER_S, abs=0.01)


def test_the_floor_counts_a_full_recipe_sweep_one_evaluation_a_checkpoint(tmp_path):
    """A report without screening (the full recipe: no "evaluations" key in older reports, no
    full evaluations beside the checkpoints' own): each sampled checkpoint is one full evaluation."""
    import json

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_arithmetic_floor import sweep_work

    report = json.loads((REPO / "sweeps" / "reproduce_2500_2e-4" / "report.json").read_text())
    report.pop("evaluations", None)
    (tmp_path / "report.json").write_text(json.dumps(report))
    work = sweep_work(tmp_path / "report.json")
    sampled = sum(1 for t in report["validation"] for p in t["points"] if p["sampled"])
    assert sampled > 0 and (work["screened"], work["evaluations"]) == (0, sampled)


@pytest.mark.slow
def test_floor_benchmark_prints_the_sweeps_floor_from_its_measured_units():
    import re

    out = run_benchmark("bench_arithmetic_floor.py", "--steps", "4", "--wall", "500")
    arithmetic = {}
    for line in out.splitlines():
        if line.startswith("| ") and " ms |" in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            arithmetic[cells[0]] = float(cells[2].removesuffix(" ms")) / 1000
    work = re.search(r"(\d+) optimizer steps, (\d+) full evaluations, (\d+) screened checkpoints, (\d+) validation points", out)
    steps, evaluations, screened, validation = map(int, work.groups())
    expected = (steps * arithmetic["training step, lanes of 3 (per lane)"] + evaluations * arithmetic["full evaluation (48 samples, 12 of them the screening's)"]
                + screened * arithmetic["screening evaluation (12 samples)"] + validation * arithmetic["validation point"])
    floor = float(re.search(r"its arithmetic alone: (\d+) worker-seconds", out).group(1))
    assert abs(floor - expected) <= 0.01 * expected + 1, out
    # the committed sweep's work (test above), and its worker-seconds as measured there
    assert (steps, evaluations, screened, validation) == (20000, 24, 41, 0)
    assert f"{COMMITTED_WORKER_S:.0f} worker-seconds measured there" in out
    # the floor on 2 workers, and the given 500 s wall as a multiple of it
    wall_floor, took, times = re.search(r"= (\d+) s of wall time on 2 workers \(the sweep took (\d+) s: ([\d.]+)x", out).groups()
    assert took == "500"
    low, high = floor - 0.5, floor + 0.5  # the worker-seconds printed to the second
    assert low / 2 - 0.5 <= float(wall_floor) <= high / 2 + 0.5
    assert 500 / (high / 2) - 0.005 <= float(times) <= 500 / (low / 2) + 0.005, out


def test_boundary_fit_benchmark_prints_the_ratio_of_its_times_and_the_fits_agree():
    out = run_benchmark("bench_boundary_fit.py", "--report", str(REPO / "sweeps" / "lr_vs_steps" / "report.json"), "--repeats", "1")
    import re

    value = dict(re.findall(r"^(analytic gradient|numerical gradient|speed-up)\s+([\d.]+)", out, flags=re.M))
    low, high = ratio_bounds(value["numerical gradient"], value["analytic gradient"])
    speed_up, half = rounded(value["speed-up"])
    assert low - half <= speed_up <= high + half, out
    # the same maximum: a gradient that pointed elsewhere would stop at another line
    assert float(out.split("in the coefficients:")[1].split()[0]) < 1e-3
    assert float(out.split("in the interval ends:")[1]) < 0.05


@pytest.mark.slow
def test_worker_layout_benchmark_prints_each_layouts_rate_from_its_step_times():
    import os
    import re

    out = run_benchmark("bench_worker_layout.py", "--steps", "2", "--rounds", "1")
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| layout")]
    cores = os.cpu_count() or 1
    assert [len(r[1].split(",")) for r in rows] == [1, cores, 1], out  # one worker alone, one per core at once, one on every core
    lanes = [3, 3 * cores, 5]
    rates = []
    for row, n in zip(rows, lanes):
        # one round: the machine's rate is the layout's lane-steps over its slowest worker's time
        slowest_ms = max(float(ms) for ms in row[1].split(","))
        rate = float(row[2])
        expected = n * 1000 / slowest_ms
        assert abs(rate - expected) <= 0.01 * expected + 0.05, (row, expected)
        rates.append(rate)
    for row, rate in zip(rows, rates):
        assert abs(float(row[3].removesuffix("x")) - rate / rates[1]) <= 0.006, row
    beside, alone = map(float, re.search(r"\(([\d.]+) against ([\d.]+) ms a step", out).groups())
    assert beside == min(float(ms) for ms in rows[1][1].split(",")) and alone == float(rows[0][1])
    speed = float(re.search(r"trains at ([\d.]+)x its speed alone", out).group(1))
    assert abs(speed - alone / beside) <= 0.006, out
