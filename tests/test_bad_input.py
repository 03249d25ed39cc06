"""The bad-input catalogue, as a user meets it on the command line: each case is one clear
message naming the file, key or value (and what would be valid), exit code 2, no traceback,
and nothing written: no MLflow store, no study, no sweep folder.

Elsewhere in the catalogue: a LoRA from another model (test_lora_compat.py), an unreachable
MLflow server (test_tracking_faults.py), a study prepared with other settings or tracked to
another store (test_workers.py), a password in an override that an error would echo
(test_redaction.py)."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from conftest import TINY_DATA, run_cli
from services import free_port


def data_folder(tmp_path, kind):
    """A copy of the tiny dataset broken in one way; returns (folder, the message to expect)."""
    folder = tmp_path / "imgs"
    if kind == "missing":
        return folder, "does not exist"
    if kind == "empty":
        folder.mkdir()
        return folder, "has no images"
    shutil.copytree(TINY_DATA, folder)
    if kind == "corrupt":
        (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
        return folder, "b.png cannot be read"
    if kind == "truncated":
        (folder / "003.png").write_bytes((folder / "003.png").read_bytes()[:100])
        return folder, "003.png cannot be read"
    if kind == "non_image":
        (folder / "model.safetensors").write_bytes(b"x")
        return folder, "model.safetensors is not an image or a caption"
    if kind == "orphan_caption":
        (folder / "c.txt").write_text("photo of [trigger]")
        return folder, "c.txt has no image"
    if kind == "too_small":
        Image.new("RGB", (20, 20)).save(folder / "small.png")
        return folder, "small.png is 20x20, smaller than data.resolution=32"
    raise ValueError(kind)


def assert_refused(proc, message, tmp_path):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt", "truncated", "non_image", "orphan_caption", "too_small"])
def test_bad_dataset(tmp_path, kind):
    folder, message = data_folder(tmp_path, kind)
    proc = run_cli("model=tiny", "data=tiny_character", f"data.path={folder}", "+sweep=lr_vs_steps", cwd=tmp_path)
    assert_refused(proc, message, tmp_path)
    assert str(folder) in proc.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        # out of range, in a single trial
        (["train.lr=0"], "config key 'train.lr' = 0.0 is invalid: a number in (0, 1]"),
        (["train.lr=-0.001"], "'train.lr'"),
        (["train.steps=0"], "config key 'train.steps' = 0 is invalid: an integer in [1, 1000000]"),
        (["train.rank=0"], "config key 'train.rank' = 0 is invalid: an integer in [1, 1024]"),
        (["model=flux2_klein_9b"], "distilled models are for evaluation only"),
        # out of range, in a sweep's values
        (["+sweep=lr_vs_steps", "sweep.params.train.lr.values=[0,1e-4]"], "train.lr"),
        (["+sweep=rank_vs_lr", "sweep.params.train.rank.values=[4,2048]"], "train.rank"),
        (["+sweep=lr_vs_steps", "sweep.params.train.steps.values=[0,500]"], "train.steps"),
        # malformed search space
        (["+sweep=lr_vs_steps", "sweep.params.train.lr.values=[]"], "sweep.params.train.lr.values"),
        (["+sweep=search", "sweep.params.train.lr.low=1e-3"], "sweep.params.train.lr.low"),
        (["+sweep=lr_vs_steps", "+sweep.params.train.bogus={type: categorical, values: [1]}"], "train.bogus"),
        (["+sweep=lr_vs_steps", "+sweep.params.model.name={type: categorical, values: [a]}"], "sweep.params.model.name"),
        (["+sweep=lr_vs_steps", "sweep.sampler=annealing"], "sweep.sampler"),
        (["+sweep=lr_vs_steps", "sweep.role=boss"], "sweep.role"),
        (["+sweep=lr_vs_steps", "eval=none"], "eval.enabled"),
        # needs the model's config or the environment: checked for every cell before anything exists
        (["+sweep=lr_vs_steps", "data.resolution=30"], "config key 'data.resolution' = 30 is invalid: a multiple of 4 for model tiny"),
        (["+sweep=lr_vs_steps", "+sweep.params.data.resolution={type: categorical, values: [32, 30]}"],
         "config key 'data.resolution' = 30 is invalid: a multiple of 4"),
        (["+sweep=lr_vs_steps_images"], "data.max_images: 10 is more than the 8 images in"),  # tiny_character: 8
        (["+sweep=lr_vs_steps", "model.text_encoder_layers=[1,2,9]"], "layer indices <= 3: the text encoder of tiny has 3 layers"),
        (["+sweep=lr_vs_steps", "train.device=cuda"], "config key 'train.device' = 'cuda' is invalid: auto or cpu: no CUDA device"),
        (["+sweep=lr_vs_steps", "train.optimizer=adamw8bit"], "config key 'train.optimizer' = 'adamw8bit' is invalid"),
        (["+sweep=lr_vs_steps", "model=flux2_klein_base_9b", "model.path=/no/such/klein"], "model.path: folder /no/such/klein does not exist"),
        (["train.device=cuda"], "no CUDA device"),  # a single trial too, before the model loads
        # a key that is no part of the config
        (["+sweep=lr_vs_steps", "+trian.lr=1e-4"], "config key 'trian' = {'lr': 0.0001} is invalid: unknown top-level key"),
    ],
)
def test_bad_value(tmp_path, overrides, message):
    assert_refused(run_cli("model=tiny", "data=tiny_character", *overrides, cwd=tmp_path), message, tmp_path)


def test_unknown_sweep_name(tmp_path):
    proc = run_cli("+sweep=lr_vs_stepz", cwd=tmp_path)
    assert proc.returncode != 0 and "Could not find 'sweep/lr_vs_stepz'" in proc.stderr and "lr_vs_steps" in proc.stderr
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def test_unknown_model(tmp_path):
    proc = run_cli("model=flux3_giant", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'model/flux3_giant'" in proc.stderr and "flux2_klein_base_9b" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("scheme", ["postgresql", "mysql"])
def test_unreachable_or_unusable_storage_url(tmp_path, scheme):
    url = f"{scheme}://klein:secret@127.0.0.1:{free_port()}/klein"
    proc = run_cli("model=tiny", "data=tiny_character", "+sweep=lr_vs_steps", f"sweep.storage={url}", cwd=tmp_path)
    expected = "cannot open Optuna storage" if scheme == "postgresql" else "needs a database driver that is not installed"
    assert_refused(proc, "sweep.storage: ", tmp_path)
    assert expected in proc.stderr and "secret" not in proc.stderr  # the password is never printed


@pytest.mark.parametrize("sweep", [[], ["+sweep=lr_vs_steps"]], ids=["single", "sweep"])
def test_a_tracking_database_that_does_not_answer_is_refused_before_anything_is_written(tmp_path, sweep):
    port = free_port()  # bound, then closed: nothing answers there
    proc = run_cli("model=tiny", "data=tiny_character", *sweep, f"tracking.uri=postgresql://ks:S3cretPw@127.0.0.1:{port}/db",
                   cwd=tmp_path, timeout=120)
    assert_refused(proc, f"tracking.uri: cannot open the MLflow store postgresql://ks:***@127.0.0.1:{port}/db: ", tmp_path)
    assert "S3cretPw" not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/, sweeps/, mlflow.db, encoding cache


@pytest.mark.parametrize("override,message", [
    ("tracking.uri=sqlite:///{blocker}/sub/mlflow.db", "tracking.uri: cannot open the MLflow store sqlite:///{blocker}/sub/mlflow.db: "),
    ("sweep.storage=sqlite:///{blocker}/study.db", "sweep.storage: cannot open Optuna storage sqlite:///{blocker}/study.db: "),
], ids=["tracking", "storage"])
def test_a_sqlite_store_whose_folder_cannot_be_created_is_refused_before_anything_is_written(tmp_path, override, message):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run_cli("model=tiny", "data=tiny_character", "+sweep=lr_vs_steps", override.format(blocker=blocker), cwd=tmp_path)
    assert_refused(proc, message.format(blocker=blocker), tmp_path)
    assert f"{blocker} is a file" in proc.stderr
    assert list(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize("typo,key", [("trian:\n  lr: 1.0e-4\n", "trian"), ("sweeps:\n  name: x\n", "sweeps")])
def test_a_typo_in_a_sweep_file_names_the_key_and_the_file(tmp_path, typo, key):
    mine = tmp_path / "conf" / "sweep"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - /klein_sweep_defaults\n  - override /eval: default\n"
                                    "  - _self_\nsweep:\n  name: mine\n  params:\n    train:\n"
                                    "      lr: {type: categorical, values: [1.0e-4]}\n" + typo)
    proc = run_cli("--config-dir", str(tmp_path / "conf"), "model=tiny", "data=tiny_character", "+sweep=mine", cwd=tmp_path)
    assert_refused(proc, f"config key '{key}'", tmp_path)
    assert "unknown top-level key (set in the sweep file sweep/mine.yaml or on the command line)" in proc.stderr


def test_passwords_never_reach_the_terminal(tmp_path):
    port = free_port()
    proc = run_cli("model=tiny", "data=tiny_character", "+sweep=lr_vs_steps", f"tracking.uri=http://klein:s3cret@127.0.0.1:{port}",
                   cwd=tmp_path)
    assert_refused(proc, f"no MLflow server answers at http://klein:***@127.0.0.1:{port}", tmp_path)
    assert "s3cret" not in proc.stderr + proc.stdout
