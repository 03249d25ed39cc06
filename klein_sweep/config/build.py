"""From Hydra's resolved config to typed settings; the config folder shipped in the package; the
dataclass defaults handed to Hydra.

One place per default: every default lives on its dataclass field (schema.py, sweep.py). Hydra
gets them through its ConfigStore as plain (untyped) nodes, so a group YAML states only what
differs, every key can still be overridden from the command line, and our own checks (which
name the key and what is valid, exit status 2) judge the values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from klein_sweep.config.checks import build_dataclass
from klein_sweep.config.schema import DataConfig, EvalConfig, ModelConfig, Settings, TrackingConfig, TrainConfig
from klein_sweep.config.sweep import SweepConfig
from klein_sweep.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# Inside the package, so an installed wheel finds its configs from any working directory.
CONF_DIR = PACKAGE_DIR / "conf"
ASSETS_DIR = PACKAGE_DIR / "assets"

GROUPS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "tracking": TrackingConfig}
# ConfigStore names the YAML defaults lists refer to.
BASE_DEFAULTS = "klein_defaults"
SWEEP_DEFAULTS = "klein_sweep_defaults"


TOP_LEVEL_KEYS = (*GROUPS, "sweep", "output_dir")


def build_settings(cfg: dict[str, Any], output_dir: str | None = None, origin: str | None = None) -> Settings:
    """Validate a resolved config dict (``OmegaConf.to_container(cfg, resolve=True)``). `origin`
    names the file that set global keys (a sweep file) for the message about an unknown key."""
    unknown = sorted(set(cfg) - set(TOP_LEVEL_KEYS))
    if unknown:
        where = f" (set in {origin} or on the command line)" if origin else ""
        raise ConfigError(unknown[0], cfg[unknown[0]], f"unknown top-level key{where}; valid top-level keys: {', '.join(TOP_LEVEL_KEYS)}")
    output_dir = output_dir or cfg.get("output_dir") or "outputs"
    parts = {}
    for group, cls in GROUPS.items():
        values = cfg.get(group) or {}
        if not isinstance(values, dict):
            raise ConfigError(group, values, f"a mapping of {cls.__name__} fields")
        parts[group] = build_dataclass(cls, values, prefix=group)
    sweep = cfg.get("sweep")
    if sweep is not None:
        if not isinstance(sweep, dict):
            raise ConfigError("sweep", sweep, "a sweep config (use +sweep=NAME)")
        parts["sweep"] = build_dataclass(SweepConfig, sweep, prefix="sweep")
    if "data" in parts and "model" in parts and "eval" in parts:
        from klein_sweep.config.recipes import resolve_eval_recipe
        from klein_sweep.evaluation.prompts import resolve_prompts

        parts["eval"] = resolve_prompts(parts["eval"], parts["model"], parts["data"])
        parts["eval"] = resolve_eval_recipe(parts["eval"], parts["model"], parts["data"])
    return Settings(**parts, output_dir=output_dir)


def field_defaults(cls) -> dict[str, Any]:
    """{field: default} of a config dataclass, without running its checks (a DataConfig without
    a path is not valid, but its other defaults are)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def register_defaults() -> None:
    """Put the dataclass defaults into Hydra's ConfigStore: `klein_defaults` (every group, first in
    config.yaml's defaults list) and `klein_sweep_defaults` (the `sweep:` block, first in every
    sweep file's defaults list). Idempotent."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name=BASE_DEFAULTS, node={group: field_defaults(cls) for group, cls in GROUPS.items()})
    sweep = field_defaults(SweepConfig)
    sweep.pop("name")  # every sweep file names itself
    store.store(name=SWEEP_DEFAULTS, node={"sweep": sweep})


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}: MLflow params under their dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def register_resolvers() -> None:
    """`${asset:NAME}` in a config resolves to a folder shipped inside the package; the dataclass
    defaults are registered with Hydra at the same time (both are needed before composing)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS_DIR / name))
    register_defaults()


def compose_config(overrides: list[str] = (), config_dir: str | Path | None = None) -> dict[str, Any]:
    """The resolved config dict for `overrides`, composed as the command line would (for the
    lora check CLI, tests and notebooks)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir or CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)
