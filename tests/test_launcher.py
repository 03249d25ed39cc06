"""The SLURM launcher config composes into a real submitit sbatch script for N workers, and
the same multirun pattern really starts N workers on one study (submitit's local executor)."""

from __future__ import annotations

import pytest
from conftest import run_cli
from sweep_helpers import completed_cells, load_study, sweep_args

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra (hydra-submitit-launcher)")

WORKERS = ["+sweep=lr_vs_steps", "sweep.storage=postgresql://klein:secret@db.cluster/klein",
           "tracking.uri=http://mlflow.cluster:5000", "sweep.role=work", "+launcher=slurm", "hydra.launcher.partition=gpu"]


def test_slurm_launcher_config_makes_a_job_array_of_gpu_workers(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from klein_sweep.config import CONF_DIR, build_settings, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=WORKERS, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert launcher.gpus_per_node == 1 and launcher.array_parallelism == 8 and launcher.partition == "gpu"
    # The workers' own settings are valid (the same check as at start-up).
    app = OmegaConf.to_container(cfg, resolve=False)
    app.pop("hydra")
    settings = build_settings(OmegaConf.to_container(OmegaConf.create(app), resolve=True))
    assert settings.sweep.role == "work" and settings.sweep.storage.startswith("postgresql://")

    # The real plugin launches 4 workers: its key mapping and submitit's sbatch script, submitted
    # to a stand-in sbatch that keeps the script (srun only has to exist for submitit's check).
    import os
    import stat

    from hydra.utils import instantiate
    from submitit.core.utils import DelayedSubmission
    from submitit.slurm.slurm import SlurmJob

    bin_dir, script_copy = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    for name, body in (("sbatch", f'cp "$1" {script_copy}\necho "Submitted batch job 4242"\n'), ("srun", "exit 0\n")):
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(SlurmJob, "results", lambda self: [self.job_id])  # no cluster to wait for
    monkeypatch.chdir(tmp_path)  # hydra.sweep.dir and the submitit folder are relative: multirun/...

    plugin = instantiate(launcher)
    plugin.setup(hydra_context=None, task_function=lambda cfg: None, config=cfg)
    returned = plugin.launch([[f"sweep.worker={i}"] for i in range(4)], initial_job_idx=0)
    assert returned == [f"4242_{i}" for i in range(4)]  # one job array, a task per worker
    script = script_copy.read_text()
    for flag in ("--array=0-3%4", "--gpus-per-node=1", "--partition=gpu", "--time=2880", "--job-name=klein_sweep",
                 "--cpus-per-task=8", "--mem=64GB", "--nodes=1", "--ntasks-per-node=1"):
        assert f"#SBATCH {flag}\n" in script, (flag, script)
    assert "--account" not in script  # account: null is left to the cluster's default
    # each array task runs the app with its own worker index
    pickles = sorted((tmp_path / "multirun").rglob("*_submitted.pkl"))
    assert len(pickles) == 4
    overrides = sorted(DelayedSubmission.load(path).args[0] for path in pickles)
    assert overrides == [[f"sweep.worker={i}"] for i in range(4)]


@pytest.mark.slow
def test_multirun_launcher_starts_workers_that_share_one_study(tmp_path):
    """`-m ... hydra/launcher=submitit_local sweep.worker=0,1`: two worker jobs from one
    command, one study (sqlite here; PostgreSQL across machines)."""
    args = sweep_args("lr_vs_steps", tmp_path, "tracking=none", "sweep.params.train.lr.values=[1e-4,2e-4,4e-4]")
    prepared = run_cli(*args, "sweep.role=prepare", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    launched = run_cli("-m", *args, "sweep.role=work", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                       "sweep.worker=0,1", cwd=tmp_path, timeout=600)
    assert launched.returncode == 0, launched.stderr[-4000:]
    study = load_study(tmp_path / "sweeps" / "lr_vs_steps")
    cells = completed_cells(study)
    assert len(cells) == 3 and len(set(cells)) == 3
