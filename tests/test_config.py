"""Every file under conf/ composes, and bad values are rejected by name."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from klein_sweep.config import CONF_DIR, build_settings, register_resolvers
from klein_sweep.errors import ConfigError

register_resolvers()

GROUP_OPTIONS = [
    (group.name, path.stem)
    for group in sorted(CONF_DIR.iterdir())
    if group.is_dir() and group.name not in ("sweep", "hydra", "launcher")  # launcher: test_launcher.py
    for path in sorted(group.glob("*.yaml"))
]


def compose_settings(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return cfg, build_settings(OmegaConf.to_container(cfg, resolve=True))


def test_default_config_builds():
    _, s = compose_settings()
    assert s.model.kind == "mini" and s.data.path.endswith("mini_character")
    assert s.train.lr == 1e-4 and s.train.alpha == s.train.rank


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_conf_file_composes(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "folder"):
        overrides.append(f"data.path={tmp_path}")
    _, s = compose_settings(*overrides)
    assert s.train.steps >= 1


def test_no_import_of_heavy_libraries_when_composing():
    import subprocess
    import sys

    code = (
        "import sys; from hydra import compose, initialize_config_dir; from omegaconf import OmegaConf;"
        "from klein_sweep.config import CONF_DIR, build_settings, register_resolvers; register_resolvers();"
        "initialize_config_dir(config_dir=str(CONF_DIR), version_base='1.3');"
        "build_settings(OmegaConf.to_container(compose('config'), resolve=True));"
        "import klein_sweep.training.trial, klein_sweep.tracking;"
        "print([m for m in ('diffusers', 'mlflow', 'torch', 'optuna') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.lr=0", "train.lr"),
        ("train.lr=-1e-4", "train.lr"),
        ("train.rank=0", "train.rank"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("train.lr_schedule=exponential", "train.lr_schedule"),
        ("train.targets=everything", "train.targets"),
        ("train.steps=abc", "train.steps"),
        ("+train.learning_rate=1e-4", "train.learning_rate"),
        ("data.caption_dropout=1.5", "data.caption_dropout"),
        ("data.trigger='two words'", "data.trigger"),
        ("eval.validation_sigmas=[0.5,1.0]", "eval.validation_sigmas"),
        ("eval.validation_sigmas=[]", "eval.validation_sigmas"),
        ("eval.validation_every=-1", "eval.validation_every"),
        ("eval.validation_images=0", "eval.validation_images"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        compose_settings(override)
    assert err.value.key == key
    assert key in str(err.value)


def test_repeats_replaces_steps_and_warmup_needs_warmup_schedule():
    _, s = compose_settings("train.repeats=80", "train.steps=null")
    assert s.train.repeats == 80 and s.train.steps is None
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        compose_settings("train.warmup_steps=10")


@pytest.mark.parametrize("model,every,images", [("mini", 250, 8), ("flux2_klein_base_9b", 500, 2)])
def test_the_recipe_fills_the_validation_cadence_a_user_left_open(model, every, images):
    e = compose_settings(f"model={model}", "eval=default")[1].eval
    assert (e.validation_every, e.validation_images) == (every, images)
    assert compose_settings(f"model={model}", "eval=default", "eval.validation_every=7")[1].eval.validation_every == 7
