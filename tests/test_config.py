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


def file_values(raw: dict, prefix: str = "") -> dict:
    """The plain values a conf file sets, by dotted key (no defaults list, no interpolations)."""
    out = {}
    for key, value in raw.items():
        if key == "defaults":
            continue
        if isinstance(value, dict):
            out.update(file_values(value, f"{prefix}{key}."))
        elif not (isinstance(value, str) and ("${" in value or value == "???")):
            out[prefix + key] = value
    return out


def setting(section, dotted: str):
    for part in dotted.split("."):
        section = section[part] if isinstance(section, dict) else getattr(section, part)
    return list(section) if isinstance(section, tuple) else section


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_conf_file_composes_into_the_settings_it_names(group, option, tmp_path):
    """Choosing a file gives the settings its values, not the defaults'; a file that only
    overrides other groups (debug=smoke) gives those groups' settings."""
    import yaml

    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "folder"):
        overrides.append(f"data.path={tmp_path}")
    _, s = compose_settings(*overrides)
    raw = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()) or {}
    if hasattr(s, group):
        values = file_values(raw)
        assert {k: setting(getattr(s, group), k) for k in values} == values
        if (group, option) == ("data", "folder"):
            assert s.data.path == str(tmp_path)
        elif str(raw.get("path", "")).startswith("${asset:"):
            assert s.data.path.endswith(option)
    else:  # a package of overrides of other groups
        chosen = [d for d in raw["defaults"] if isinstance(d, dict)]
        assert chosen
        # the groups chosen together (the eval recipe depends on the model chosen beside it)
        groups = [(key.removeprefix("override /"), value) for entry in chosen for key, value in entry.items()]
        _, together = compose_settings(*(f"{group}={value}" for group, value in groups))
        for other, value in groups:
            assert getattr(s, other) == getattr(together, other), other
            assert getattr(s, other) != getattr(compose_settings()[1], other), f"{other}={value} changes nothing"


@pytest.mark.parametrize(
    "n_images,repeats,batch,grad_accum,steps",
    [
        (8, 80, 1, 4, 160),  # the README's train.repeats=80 train.grad_accum=4: ceil(8 x 80 / 4)
        (8, 80, 2, 4, 80),  # two images a micro-step: half the steps
        (8, 2.5, 1, 3, 7),  # 20 images seen / 3 per step = 6.67: rounded up, never short of the repeats
        (8, 3, 1, 3, 8),  # exactly 24 / 3: not rounded up to 9
        (55, 100, 1, 1, 5500),  # the schema's example: 55 images, 100 repeats
        (55, 100, 1, 4, 1375),
    ],
)
def test_repeats_set_the_steps_a_trial_trains(tmp_path, n_images, repeats, batch, grad_accum, steps):
    """steps = ceil(N x repeats / (batch x grad_accum)), counted on the data folder's images, and
    the repeats per image the trial logs are the repeats asked for (or just above, rounded up)."""
    from PIL import Image

    from klein_sweep.training.trial import resolve_plan

    for i in range(n_images):
        Image.new("RGB", (16, 16), (i, 90, 160)).save(tmp_path / f"{i:03d}.png")
    _, s = compose_settings("model=tiny", "data=folder", f"data.path={tmp_path}", "data.resolution=16", "train.steps=null",
                            f"train.repeats={repeats}", f"train.batch_size={batch}", f"train.grad_accum={grad_accum}")
    plan = resolve_plan(s)
    assert len(plan.examples) == n_images
    assert plan.steps == steps
    assert repeats <= plan.repeats_per_image < repeats + batch * grad_accum / n_images
    # without repeats, train.steps is the step count as given
    _, fixed = compose_settings("model=tiny", "data=folder", f"data.path={tmp_path}", "data.resolution=16", "train.steps=123",
                                f"train.batch_size={batch}", f"train.grad_accum={grad_accum}")
    assert resolve_plan(fixed).steps == 123


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


# economy on the real models and the mini world, full on the tiny model
@pytest.mark.parametrize("model,every,images", [("mini", 500, 2), ("flux2_klein_base_9b", 500, 2), ("tiny", 250, 8)])
def test_the_recipe_fills_the_validation_cadence_a_user_left_open(model, every, images):
    e = compose_settings(f"model={model}", "eval=default")[1].eval
    assert (e.validation_every, e.validation_images) == (every, images)
    assert compose_settings(f"model={model}", "eval=default", "eval.validation_every=7")[1].eval.validation_every == 7
