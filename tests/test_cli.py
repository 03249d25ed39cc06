"""`python -m klein_sweep` as a user runs it: one trial end to end, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from conftest import run_cli


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
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 13))
    assert len(client.get_metric_history(run.info.run_id, "train/lr")) == 12
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/lora_norm")] == [5, 10, 12]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "lora"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "lora")] == ["lora/pytorch_lora_weights.safetensors"]
    local_lora = Path(proc.stdout.split("LoRA: ")[1].splitlines()[0])
    assert local_lora.exists()

    # a second run over the same data encodes nothing
    again = run_cli("model=tiny", "data=tiny_character", "train.steps=2", "tracking=none", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "encodings: 12 from cache, 0 encoded" in again.stderr + again.stdout


def test_repeats_set_steps(tmp_path):
    proc = run_cli("model=tiny", "data=tiny_character", "train.repeats=3", "train.grad_accum=2", "tracking=none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 images, 12 steps, 3.0 repeats per image (batch 1 x grad_accum 2)" in proc.stderr + proc.stdout


def make_folder(tmp_path, kind):
    folder = tmp_path / "imgs"
    folder.mkdir()
    if kind == "empty":
        return folder, "has no images"
    Image.new("RGB", (40, 40), "red").save(folder / "a.png")
    if kind == "corrupt":
        (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
        return folder, "b.png cannot be read"
    if kind == "non_image":
        (folder / "model.safetensors").write_bytes(b"x")
        return folder, "model.safetensors is not an image or a caption"
    if kind == "orphan_caption":
        (folder / "c.txt").write_text("photo of [trigger]")
        return folder, "c.txt has no image"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["empty", "corrupt", "non_image", "orphan_caption"])
def test_bad_data_folder(tmp_path, kind):
    folder, message = make_folder(tmp_path, kind)
    proc = run_cli(f"data.path={folder}", cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and str(folder) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lr=0", "config key 'train.lr' = 0.0 is invalid: a number in (0, 1]"),
        ("train.lr=-0.001", "'train.lr'"),
        ("train.rank=0", "config key 'train.rank' = 0 is invalid: an integer in [1, 1024]"),
        ("model=flux2_klein_9b", "distilled models are for evaluation only"),
    ],
)
def test_bad_values(tmp_path, override, message):
    proc = run_cli(override, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_unknown_model(tmp_path):
    proc = run_cli("model=flux3_giant", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'model/flux3_giant'" in proc.stderr and "flux2_klein_base_9b" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()
