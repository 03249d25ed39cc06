"""The Hydra entry point.

    python -m klein_sweep                              train + track one LoRA (the default config)
    python -m klein_sweep train.lr=2e-4 train.steps=1500
    python -m klein_sweep data.path=/my/images data.trigger=ohwx model=flux2_klein_base_9b data.resolution=1024
    python -m klein_sweep --config-dir my_sweeps +sweep=my_sweep    your own sweep files beside the shipped ones

The configs ship inside the package (klein_sweep/conf), so an installed wheel runs from any
folder. The Hydra object stops here: below this file everything takes typed settings.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from klein_sweep import interrupts
from klein_sweep.config import Settings, build_settings, register_resolvers
from klein_sweep.errors import KleinSweepError
from klein_sweep.quick_exit import skip_collection_at_exit
from klein_sweep.redaction import redact, redacted_output

log = logging.getLogger("klein_sweep")

register_resolvers()


# config_path is relative to this file: the conf/ folder inside the installed package.
@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def app(cfg: DictConfig) -> None:
    """Hydra's task: no exception leaves it (Hydra's own report of one would echo every
    override, passwords included)."""
    settings = None
    interrupts.install()
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        choices = hydra.core.hydra_config.HydraConfig.get().runtime.choices
        origin = f"the sweep file sweep/{choices['sweep']}.yaml" if choices.get("sweep") else None
        settings = build_settings(resolved, origin=origin)
        dry_run = settings.sweep is not None and settings.sweep.dry_run
        if settings.tracking.backend == "mlflow" and not dry_run:
            from klein_sweep.tracking import check_reachable

            check_reachable(settings.tracking.uri)  # before anything is written anywhere
        if settings.sweep is not None:
            run_sweep_command(settings, resolved)
        else:
            run_single_trial(settings, OmegaConf.to_yaml(cfg, resolve=True))
    except KleinSweepError as exc:
        # One clear line and a non-zero exit; SystemExit passes through Hydra untouched.
        print(f"klein_sweep: error: {redact(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"klein_sweep: interrupted: {interrupted_line(settings)}", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # a bug or a library's own failure: still one redacted line
        report_unexpected(exc)
        sys.exit(1)


def main() -> None:
    """The command (`python -m klein_sweep`, `klein-sweep`): Hydra's app, with everything it
    prints - our lines, library messages, Hydra's own errors, which echo the overrides - passed
    through `redact`, so a password given on the command line never reaches the terminal."""
    skip_collection_at_exit()
    with redacted_output():
        try:
            app()
        except Exception as exc:  # Hydra re-raises its own errors under HYDRA_FULL_ERROR=1
            report_unexpected(exc)
            sys.exit(1)


def report_unexpected(exc: BaseException) -> None:
    """An error that is no user input's: its type and first line, redacted; the redacted
    traceback under HYDRA_FULL_ERROR=1."""
    text = str(exc).strip()
    print(f"klein_sweep: error: {exc.__class__.__name__}: {redact(text.splitlines()[0][:300] if text else '')}", file=sys.stderr)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        print(redact("".join(traceback.format_exception(exc))), file=sys.stderr, end="")
    else:
        print("Set the environment variable HYDRA_FULL_ERROR=1 for the traceback.", file=sys.stderr)


def interrupted_line(settings: Settings | None) -> str:
    if settings is None:
        return "nothing was started"
    if settings.sweep is not None:
        # Two workers, or lanes, have several trials in flight: each is marked.
        return (f"sweep {settings.sweep.name} stopped; every trial in flight is marked interrupted and its MLflow run KILLED. "
                "The same command resumes the sweep: finished cells are kept, the interrupted ones run again")
    return "training stopped; its MLflow run is marked KILLED and no LoRA was saved after the last checkpoint. The same command trains again"


def run_single_trial(settings: Settings, resolved_yaml: str) -> None:
    from klein_sweep.preflight import check_settings
    from klein_sweep.training.trial import default_run_name, prepare_model, resolve_plan, run_training

    check_settings(settings)  # before the model loads or anything is written
    plan = resolve_plan(settings)
    log_prompt_source(settings)
    log.info(
        "%d images, %d steps, %.1f repeats per image (batch %d x grad_accum %d)",
        len(plan.examples), plan.steps, plan.repeats_per_image, settings.train.batch_size, settings.train.grad_accum,
    )
    from klein_sweep.evaluation.evaluator import eval_prompts

    evaluating = settings.eval.enabled
    trigger, prior = eval_prompts(settings) if evaluating else ([], [])
    prepared = prepare_model(plan, extra_prompts=trigger + prior)  # the eval prompts encoded once, with the captions
    stats = prepared.data.stats
    log.info("encodings: %d from cache, %d encoded (%.1fs)", stats.hits, stats.misses, prepared.encode_seconds)

    out = Path(settings.output_dir).absolute()  # printed paths work from any folder
    settings.output_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    config_path.write_text(redact(resolved_yaml))  # the artifact never carries a password

    tracker = open_tracker(settings, settings.tracking.run_name or default_run_name(plan))
    status, record = "FAILED", None
    try:
        tracker.log_artifact(config_path)
        recorder = None
        if evaluating:  # the same evaluation, collapse rules and metrics as a sweep's trials
            from klein_sweep.evaluation.policies import EvaluationPolicy
            from klein_sweep.evaluation.recorder import TrialRecorder

            recorder = TrialRecorder(settings, EvaluationPolicy(settings, prepared, plan.examples), tracker, len(plan.examples))
        outcome = run_training(plan, prepared, tracker, evaluate=recorder.on_checkpoint if recorder else None)
        if recorder is not None:
            record, _ = recorder.finish(outcome, plan.steps, model=prepared.pipe.transformer)
        tracker.set_tags({"klein.status": outcome.status, **({"klein.reason": outcome.reason} if outcome.reason else {})})
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)

    if outcome.status == "diverged":
        print(f"training diverged: {outcome.reason}; no LoRA saved")
    else:
        print(f"trained {outcome.steps_done} steps, final loss {outcome.final_loss:.4f}")
        print(f"LoRA: {outcome.lora_path}")
        print(f"ComfyUI / ai-toolkit LoRA: {outcome.lora_path.with_name('klein_lora_comfyui.safetensors')}")
    if record is not None:
        best = next((r for r in record.rows if r.step == record.best_step), None)
        steps = ", ".join(str(r.step) for r in record.rows)
        print(f"evaluated at steps {steps}: state {record.state}"
              + (f", best step {best.step} (identity {best.value('id_sim') or float('nan'):.3f}), LoRA in {Path(settings.output_dir) / 'lora_best'}" if best else "")
              + (f", collapsed at step {record.collapse_step}: {next(r.reason for r in record.rows if r.state == 'collapsed')}"
                 if record.collapse_step is not None else ""))
    if outcome.run_description:
        print(f"MLflow {outcome.run_description}; artifacts: config.yaml, lora/ (diffusers + ComfyUI files)")
        from klein_sweep.tracking import mlflow_ui_command

        print("browse with: " + mlflow_ui_command(settings.tracking.uri))


def run_sweep_command(settings: Settings, resolved: dict) -> None:
    from klein_sweep.errors import ConfigError
    from klein_sweep.sweep.plan import plan_sweep

    if not settings.eval.enabled and settings.sweep.objective.startswith("eval/"):
        raise ConfigError("eval.enabled", False, f"true: the sweep's objective {settings.sweep.objective} is measured at checkpoints (eval=default)")
    plan = plan_sweep(settings, resolved)
    for note in plan.notes:
        log.info(note)
    log_prompt_source(settings)
    if settings.sweep.dry_run:
        from klein_sweep.cost.preview import estimate_sweep_cost, render_cost, write_cost

        from klein_sweep.evaluation.plan import describe_evaluation
        from klein_sweep.training.loop import checkpoint_schedule

        cost = estimate_sweep_cost(plan)
        print(render_cost(cost, plan.study_name))
        t = settings.train
        checkpoints = plan.step_values if plan.steps_are_checkpoints else checkpoint_schedule(t.steps, t.checkpoint_every, [])
        print(describe_evaluation(settings, checkpoints))
        print(f"written to {write_cost(cost, plan.output_dir.absolute())}; no study or MLflow run was created")
        return
    from klein_sweep.sweep.study import check_storage

    check_storage(plan)  # before the study, the MLflow run or any file exists
    from klein_sweep.sweep.parallel import run_on_this_machine  # torch and the trial code: after the checks

    log.info("study %s in %s", plan.study_name, redact(plan.storage_url))
    summary = run_on_this_machine(plan)
    if settings.sweep.role == "prepare":
        print(f"sweep {plan.study_name} prepared in {redact(plan.storage_url)}: {len(plan.cells) or settings.sweep.n_trials} "
              f"{'cells' if plan.cells else 'trials'}" + (f", MLflow parent run {summary.parent_run_id}" if summary.parent_run_id else ""))
        print("start workers with the same command and sweep.role=work (as many as you have GPUs or machines)")
        return
    who = f"{summary.workers} workers" if summary.workers > 1 else "this worker"
    print(f"sweep {plan.study_name}: {who} ran {len(summary.ran)} trials, {len(summary.failed)} failed")
    plots = ", ".join(p.name for p in sorted(summary.report_dir.glob("*.png")))
    print(f"report: {summary.report_dir / 'report.md'} (with {plots})")
    if summary.parent_run_id:
        from klein_sweep.tracking import mlflow_ui_command, runs_view_route

        print(f"MLflow experiment '{plan.study_name}', parent run {summary.parent_run_id}; browse with: {mlflow_ui_command(settings.tracking.uri)}")
        if summary.experiment_id:
            print(f"  the trials with their states: http://127.0.0.1:5000/{runs_view_route(summary.experiment_id)}")


def log_prompt_source(settings: Settings) -> None:
    """A real model's evaluation prompts: the class word used, and where it came from."""
    from klein_sweep.evaluation.prompts import prompt_note

    note = prompt_note(settings)
    if note:
        log.info(note)


def open_tracker(settings: Settings, run_name: str):
    from klein_sweep.tracking import MlflowTracker, NullTracker

    if settings.tracking.backend == "none":
        return NullTracker()
    return MlflowTracker.start(settings.tracking.uri, settings.tracking.experiment, run_name=run_name)


if __name__ == "__main__":
    main()
