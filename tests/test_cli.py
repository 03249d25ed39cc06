"""`python -m klein_sweep` as a user runs it: one trial end to end (bad input: test_bad_input.py)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import repo_pythonpath, run_cli


def test_one_trial_end_to_end(tmp_path):
    proc = run_cli("model=tiny", "data=tiny_character", "train.steps=12", "train.checkpoint_every=5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA: " in proc.stdout and "MLflow run" in proc.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("klein_sweep")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["train.lr"] == "0.0001" and p["train.steps"] == "12" and p["data.trigger"] == "sks"
    assert p["train.repeats_per_image"] == "1.5" and p["data.n_images"] == "8"
    # the settings a user compares, not all ~80 resolved values (those are config.yaml)
    assert set(p) == {"model.name", "data.trigger", "train.lr", "train.rank", "train.alpha", "train.grad_accum", "train.batch_size",
                      "train.seed", "train.steps", "data.n_images", "train.repeats_per_image"}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 13))
    assert len(client.get_metric_history(run.info.run_id, "train/lr")) == 12
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/lora_norm")] == [5, 10, 12]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "lora"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "lora")] == [
        "lora/klein_lora_comfyui.safetensors", "lora/pytorch_lora_weights.safetensors"]
    local_lora = Path(proc.stdout.split("LoRA: ")[1].splitlines()[0])
    assert local_lora.exists()
    # The printed command browses this folder's store, without MLflow's job runner (lighter on a small machine).
    browse = shlex.split(proc.stdout.split("browse with: ")[1].splitlines()[0])
    assert browse == ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false", "mlflow", "ui", "--backend-store-uri", "sqlite:///mlflow.db"]

    # a second run over the same data encodes nothing
    again = run_cli("model=tiny", "data=tiny_character", "train.steps=2", "tracking=none", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "encodings: 12 from cache, 0 encoded" in again.stderr + again.stdout


def test_help_says_what_the_tool_does_and_its_commands_run(tmp_path):
    """`--help` opens on klein_sweep's own first commands, not Hydra's "__main__ is powered by
    Hydra", and every command it shows composes (checked with --cfg job, which runs nothing)."""
    import re

    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("klein_sweep: LoRA sweeps for FLUX.2 [klein]"), proc.stdout[:500]
    assert "powered by Hydra" not in proc.stdout
    assert re.search(r"^sweep: .*\blr_vs_steps\b", proc.stdout, re.M)  # the groups still follow
    lines = proc.stdout.splitlines()
    commands = []
    for i, line in enumerate(lines):
        if line.startswith("  python -m klein_sweep "):
            text = line.strip()
            while text.endswith("\\"):  # a command continued on the next line
                i += 1
                text = text[:-1].rstrip() + " " + lines[i].strip()
            commands.append(re.split(r"\s{2,}", text)[0].split()[3:])  # the words after `python -m klein_sweep`
    assert len(commands) == 4 and ["+sweep=lr_vs_steps"] in commands, commands
    for words in commands:
        shown = run_cli(*[w for w in words if w not in ("--cfg", "job")], "--cfg", "job", cwd=tmp_path)
        assert shown.returncode == 0 and "train:" in shown.stdout, (words, shown.stderr[-2000:])
    assert not list(tmp_path.iterdir())  # help and --cfg write nothing


def test_repeats_set_steps(tmp_path):
    proc = run_cli("model=tiny", "data=tiny_character", "train.repeats=3", "train.grad_accum=2", "tracking=none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 images, 12 steps, 3.0 repeats per image (batch 1 x grad_accum 2)" in proc.stderr + proc.stdout


def test_a_single_trial_with_evaluation_evaluates_at_its_checkpoints(tmp_path):
    """eval=default on one trial: the sweep's evaluator, metrics and collapse rules, no sweep."""
    proc = run_cli("model=tiny", "data=tiny_character", "eval=default", "train.steps=4", "train.checkpoint_every=2",
                   "eval.seeds=[0]", "eval.feature_network=random_conv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluated at steps 2, 4: state " in proc.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("klein_sweep").experiment_id])
    for key in ("eval/id_sim", "eval/kid", "eval/prior_kid", "eval/leak", "eval/is", "eval/collapsed"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [2, 4], key
    assert run.data.tags["klein.state"] in ("good", "underfit", "overfit", "collapsed")
    logged = {a.path.split("/")[-1].split("+timestamp")[0] for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")}
    # images by key and step; step 0 is the base model's (MLflow's image viewer opens at step 0)
    assert logged == {f"samples~{name}+step+{s}" for name in ("trigger", "prior") for s in (0, 2, 4)}


FREEZE_PROBE = """
import atexit, gc, os, runpy, sys
# Registered before the command's own exit hook, so it runs after it (atexit is last in, first out).
atexit.register(lambda: os.write(2, f"frozen at exit: {gc.get_freeze_count()}\\n".encode()))
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("command", [["klein_sweep", "model=tiny", "data=tiny_character", "data.path=/nonexistent"],
                                     ["klein_sweep.report", "no_such_sweep"]])
def test_the_commands_leave_their_objects_to_the_os_at_exit(tmp_path, command):
    """Both entry points freeze the interpreter's objects before its final collections (~1.5 s
    of CPU once torch and the trial code are imported, klein_sweep/quick_exit.py)."""
    env = {**os.environ, "PYTHONPATH": repo_pythonpath()}
    proc = subprocess.run([sys.executable, "-c", FREEZE_PROBE, *command], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    frozen = int(proc.stderr.rsplit("frozen at exit: ", 1)[1].split()[0])
    assert frozen > 1000, proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())  # a refusal still writes nothing
