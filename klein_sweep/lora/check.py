"""Check that a LoRA file fits a model before loading it anywhere.

    python -m klein_sweep.lora.check LORA.safetensors [model=flux2_klein_9b | model=mini | model.path=DIR ...]

Exit 0 and a one-line summary when it fits; exit 2 and the list of mismatched keys and shapes
when it does not. The real models are checked against their architecture, without weights.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException

    from klein_sweep.config import build_settings, compose_config
    from klein_sweep.errors import KleinSweepError
    from klein_sweep.lora.compat import check_lora_fits
    from klein_sweep.models.loading import transformer_skeleton

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0].startswith("-") or "=" in args[0]:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    path, overrides = args[0], args[1:]
    try:
        settings = build_settings(compose_config(overrides))
        state = check_lora_fits(path, transformer_skeleton(settings.model), settings.model.name)
    except (KleinSweepError, HydraException) as exc:
        print(f"klein_sweep: error: {exc}", file=sys.stderr)
        return 2
    modules = {k.rsplit(".lora_", 1)[0] for k in state}
    ranks = sorted({int(v.shape[0]) for k, v in state.items() if ".lora_A." in k})
    print(f"{path} fits {settings.model.name}: {len(modules)} adapted modules, rank {'/'.join(map(str, ranks))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
