"""Which metric network serves which model, and where its weights must lie: decided from the
settings alone, without torch, so the checks before a sweep (preflight.py) refuse bad input in
about a second. Building the networks is networks.py's and real_networks.py's.
"""

from __future__ import annotations

from pathlib import Path

from klein_sweep.errors import ConfigError

DOWNLOADS = {
    "dinov2": "hf download facebook/dinov2-base --include '*.json' --include '*.safetensors' --local-dir DIR",
    "clip": "hf download openai/clip-vit-large-patch14 --include '*.json' --include '*.txt' --include '*.safetensors' --local-dir DIR",
    "inception": "the FID Inception weights https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth saved as DIR/weights-inception-2015-12-05-6726825d.pth",
    "arcface": "an insightface model pack (e.g. buffalo_l) unpacked as DIR/models/buffalo_l",
}

# What each network imports, as (module, pip name), and how to install it: checked before a run
# starts (preflight.py), since the import itself happens only once the model has loaded.
PACKAGES = {
    "inception": ((("torch_fidelity", "torch-fidelity"), ("torchvision", "torchvision")),
                  "pip install 'klein_sweep[inception]' (torchvision comes with it; some machines have no CPU build of it)"),
    "arcface": ((("insightface", "insightface"), ("onnxruntime", "onnxruntime")), "pip install 'klein_sweep[arcface]'"),
    "dinov2": ((("transformers", "transformers"),), "pip install 'transformers>=4.57' (a dependency of klein_sweep)"),
    "clip": ((("transformers", "transformers"),), "pip install 'transformers>=4.57' (a dependency of klein_sweep)"),
}
# Modules that can be installed and still fail to import (a torchvision built for another torch):
# imported for real when present, not only found.
IMPORT_CHECKED = {"torchvision"}


def network_path(paths: dict, name: str) -> Path:
    """The local folder for `name`, or a ConfigError saying what to download."""
    raw = (paths or {}).get(name)
    if not raw or not Path(raw).exists():
        where = f"no folder {raw}" if raw else "not set"
        raise ConfigError(
            f"eval.network_paths.{name}", raw,
            f"a local folder with the {name} weights ({where}); download once with: {DOWNLOADS[name]}, "
            f"then set eval.network_paths.{name}=DIR",
        )
    return Path(raw)


def resolve_networks(eval_cfg, model_kind: str) -> tuple[str, str | None]:
    """(feature network, identity network) with `auto` decided: the network that knows the
    model's world - the mini world's own net, a random conv net for the random tiny model, for
    real images Inception (distribution metrics) and DINOv2 (identity). Identity None: the
    feature network's own identity embedding."""
    feature = eval_cfg.feature_network
    if feature == "auto":
        feature = {"pretrained": "inception", "mini": "mini"}.get(model_kind, "random_conv")
    identity = eval_cfg.identity_network
    if identity == "auto":
        identity = "dinov2" if model_kind == "pretrained" else "same"
    return feature, (None if identity == "same" else identity)


def networks_needed(eval_cfg, model_kind: str) -> list[str]:
    """The real networks an eval config will load (to check their folders before a sweep starts)."""
    names = [*resolve_networks(eval_cfg, model_kind), "clip" if eval_cfg.prompt_fidelity else None]
    return sorted({n for n in names if n in DOWNLOADS})


def check_networks_available(eval_cfg, model_kind: str) -> None:
    """ConfigError naming what to download, before anything is written."""
    for name in networks_needed(eval_cfg, model_kind):
        network_path(eval_cfg.network_paths, name)
