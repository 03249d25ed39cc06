"""Typed settings. The Hydra config becomes these dataclasses at the entry point; nothing below
the entry point sees an OmegaConf object.

    schema.py  model / data / train / eval / tracking groups and the collapse thresholds
    sweep.py   the sweep's search space, sampler, storage and role
    checks.py  value checks and the dict -> dataclass builder (messages name the key)
    build.py   resolved config -> Settings; the shipped conf/ folder; defaults for Hydra
"""

from klein_sweep.config.build import (
    ASSETS_DIR,
    CONF_DIR,
    build_settings,
    compose_config,
    flatten,
    register_resolvers,
)
from klein_sweep.config.checks import build_dataclass
from klein_sweep.config.schema import (
    TOTAL_INDEPENDENT_SCHEDULES,
    CollapseThresholds,
    DataConfig,
    EvalConfig,
    ModelConfig,
    Settings,
    TrackingConfig,
    TrainConfig,
)
from klein_sweep.config.sweep import ParamSpec, SweepConfig
from klein_sweep.errors import ConfigError

__all__ = [
    "ASSETS_DIR", "CONF_DIR", "TOTAL_INDEPENDENT_SCHEDULES", "CollapseThresholds", "ConfigError", "DataConfig",
    "EvalConfig", "ModelConfig", "ParamSpec", "Settings", "SweepConfig", "TrackingConfig", "TrainConfig",
    "build_dataclass", "build_settings", "compose_config", "flatten", "register_resolvers",
]
