"""Run a sweep in-process or as a worker process, at debug size on the tiny model."""

from __future__ import annotations

from pathlib import Path

from conftest import start_python

# Each committed sweep shrunk to two short trials on the tiny model.
DEBUG_SIZE = {
    # refinement (on in lr_vs_steps) has its own tests: tests/test_refine.py
    "lr_vs_steps": ["sweep.params.train.lr.values=[1e-4,4e-4]", "sweep.params.train.steps.values=[2,4]", "sweep.refine=false"],
    # the tiny model has no distilled sibling: it stands in for itself with the distilled recipe
    "lr_vs_steps_distilled": ["sweep.params.train.lr.values=[1e-4,4e-4]", "sweep.params.train.steps.values=[2,4]",
                              "eval.distilled_model=tiny"],
    "lr_vs_steps_seeds": ["sweep.params.train.lr.values=[1e-4]", "sweep.params.train.steps.values=[2,4]"],  # x seeds 0, 1
    "reproduce_2500_2e-4": ["sweep.params.train.lr.values=[1e-4,2e-4]", "sweep.params.train.steps.values=[2,4]"],
    "rank_vs_lr": ["sweep.params.train.rank.values=[4,8]", "sweep.params.train.lr.values=[1e-4]", "sweep.params.train.steps.values=[2]",
                   "sweep.refine=false"],
    "lr_vs_steps_images": ["sweep.params.train.lr.values=[1e-4]", "sweep.params.train.steps.values=[2,4]",
                           "sweep.params.data.max_images.values=[2,4]", "sweep.refine=false"],
    "lr_vs_steps_subject_b": ["sweep.params.train.lr.values=[1e-4,4e-4]", "sweep.params.train.steps.values=[2,4]", "sweep.refine=false"],
    "grad_accum_repeats": ["sweep.params.train.grad_accum.values=[1,2]", "sweep.repeats_values=[1,2]"],
    "search": ["sweep.n_trials=2", "sweep.params.train.steps.low=2", "sweep.params.train.steps.high=4",
               "sweep.params.train.steps.step=2", "train.checkpoint_every=2"],
}
COMMON = ["model=tiny", "data=tiny_character", "eval.seeds=[0,1]", "eval.trigger_prompts=['photo of [trigger]']", "eval.prior_prompts=['photo of a creature']"]


def sweep_args(name: str, tmp: Path, *extra: str) -> list[str]:
    return [f"+sweep={name}", *COMMON, *DEBUG_SIZE[name], f"data.cache_dir={tmp / 'cache'}", *extra]


def run_worker(args: list[str], cwd: Path, env: dict | None = None):
    """`python -m klein_sweep ARGS` started, not waited for (conftest.start_python)."""
    return start_python("klein_sweep", *args, cwd=cwd, env=env)


def load_study(folder: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{folder / 'study.db'}"
    (name,) = optuna.study.get_all_study_names(url)
    return optuna.load_study(study_name=name, storage=url)


def completed_cells(study) -> list[str]:
    from optuna.trial import TrialState

    from klein_sweep.sweep.plan import cell_key

    return sorted(cell_key(t.user_attrs["cell"]) for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))


def compose_plan(overrides: list[str]):
    """The SweepPlan the CLI would build from these overrides, for in-process runs."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from klein_sweep.config import CONF_DIR, build_settings, register_resolvers
    from klein_sweep.sweep.plan import plan_sweep

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    return plan_sweep(build_settings(cfg), cfg)


def tiny_world(tmp_path: Path, *extra: str):
    """(settings, pipe, encoded data) of the tiny model with the lr_vs_steps evaluation on two
    prior prompts, caches under tmp_path: what a worker holds before its first trial."""
    from klein_sweep.config import build_settings
    from klein_sweep.data.encoding import EncodingCache, EncodingKey, encode_data
    from klein_sweep.data.folder import load_examples
    from klein_sweep.evaluation.evaluator import eval_prompts
    from klein_sweep.models.tiny import TINY_MAX_SEQUENCE_LENGTH, TINY_TEXT_LAYERS, build_tiny_pipeline

    plan = compose_plan(["+sweep=lr_vs_steps", "sweep.refine=false", *COMMON, "eval.prior_prompts=['photo of a creature','a creature on a sky background']",
                         f"sweep.output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", *extra])
    settings = build_settings(plan.base_cfg)
    pipe = build_tiny_pipeline(settings.model.seed)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    key = EncodingKey("tiny", settings.data.resolution, tuple(TINY_TEXT_LAYERS), TINY_MAX_SEQUENCE_LENGTH)
    trigger, prior = eval_prompts(settings)
    data = encode_data(pipe, load_examples(settings.data), key, EncodingCache(None), extra_prompts=trigger + prior)
    return settings, pipe, data


def finish(study, cell: dict, rows: list[dict], refine: dict | None = None):
    """A finished trial with a stored record, as a worker leaves it."""
    from optuna.trial import TrialState, create_trial

    from klein_sweep.record import CheckpointRow, TrialRecord, encode_trial

    collapse = next((r["step"] for r in rows if r.get("state") == "collapsed"), None)
    record = TrialRecord(state=rows[-1]["state"], steps=rows[-1]["step"], rows=[CheckpointRow.from_json(r) for r in rows],
                         collapse_step=collapse)
    attrs = {"cell": cell, **encode_trial(record), **({"refine": refine} if refine else {})}
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, user_attrs=attrs))
