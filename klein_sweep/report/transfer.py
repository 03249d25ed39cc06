"""Base -> distilled transfer (eval.also_distilled): each checkpoint's LoRA on the base model it
was trained on and on the distilled model (4 steps, no CFG), judged by the same collapse rules
against each model's own no-LoRA reference; where does the distilled model collapse, earlier or
later than the base?"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from klein_sweep.config.evaluation import CollapseThresholds
from klein_sweep.evaluation import collapse
from klein_sweep.record import CheckpointRow
from klein_sweep.report.results import SweepResults, TrialResult, checkpoints_with, fmt_value, setting_label


@dataclass
class Transfer:
    trial: TrialResult
    rows: list[CheckpointRow]  # the trial's rows with `distilled` metrics
    states: dict[int, str]  # step -> state on the distilled model
    base_collapse: int | None  # first collapsed step on the base model (among these checkpoints)
    distilled_collapse: int | None

    @property
    def verdict(self) -> str:
        b, d = self.base_collapse, self.distilled_collapse
        if b is None and d is None:
            return "neither collapsed"
        if b is None:
            return f"distilled collapses first (at {d}; base not by {self.rows[-1].step})"
        if d is None:
            return f"base collapses first (at {b}; distilled not by {self.rows[-1].step})"
        return "same checkpoint" if b == d else ("distilled earlier" if d < b else "distilled later")


def thresholds(results: SweepResults) -> CollapseThresholds:
    """The sweep's collapse thresholds, from the plan stored on the study."""
    plan = results.plan
    names = {f.name for f in dataclasses.fields(CollapseThresholds)}
    return CollapseThresholds(**{k[len("eval."):]: v for k, v in plan.items() if k.startswith("eval.") and k[len("eval."):] in names})


def transfers(results: SweepResults) -> list[Transfer]:
    th = thresholds(results)
    by_trial: dict[int, list[CheckpointRow]] = {}
    for t, r in checkpoints_with(results, "distilled"):
        by_trial.setdefault(t.number, []).append(r)
    out = []
    for t in results.trials:
        rows = sorted(by_trial.get(t.number, []), key=lambda r: r.step)
        if not rows:
            continue
        series = [CheckpointRow(step=r.step, loss=r.loss, metrics=dict(r.distilled)) for r in rows]
        judged = collapse.classify(series, t.record.base_distilled, th)
        states = {j.step: j.state for j in judged}
        base_first = next((r.step for r in rows if r.state == "collapsed"), None)
        out.append(Transfer(t, rows, states, base_first, collapse.first_collapse_step(judged)))
    return out


def transfer_section(results: SweepResults) -> list[str]:
    found = transfers(results)
    if not found:
        return []
    lines = ["", "## Base -> distilled transfer", "",
             "Each checkpoint's LoRA on the base model (its own recipe) and on the distilled model (4 steps, no CFG), "
             "judged by the same collapse rules against each model's own no-LoRA samples.", "",
             "| setting | step | identity on base | identity on distilled | KID on distilled | leak on distilled | state on base | state on distilled |",
             "|---|---|---|---|---|---|---|---|"]
    for tr in found:
        for r in tr.rows:
            d = r.distilled
            lines.append(f"| {setting_label(tr.trial.setting)} | {r.step} | {fmt_value(r.value('id_sim'))} | {fmt_value(d.get('id_sim'))} | "
                         f"{fmt_value(d.get('kid'))} | {fmt_value(d.get('leak'))} | {r.state or '?'} | {tr.states.get(r.step, '?')} |")
    lines += ["", "| setting | first collapse on base | first collapse on distilled | |", "|---|---|---|---|"]
    for tr in found:
        lines.append(f"| {setting_label(tr.trial.setting)} | {tr.base_collapse or 'none'} | {tr.distilled_collapse or 'none'} | {tr.verdict} |")
    gaps = [r.distilled["id_sim"] - r.value("id_sim") for tr in found for r in tr.rows
            if isinstance(r.value("id_sim"), (int, float)) and isinstance(r.distilled.get("id_sim"), (int, float))]
    if gaps:
        lines += ["", f"Mean identity change from base to distilled: {sum(gaps) / len(gaps):+.3f} over {len(gaps)} checkpoints."]
    return lines


def transfer_json(results: SweepResults) -> list[dict]:
    return [{"trial": tr.trial.number, "setting": tr.trial.setting, "base_collapse": tr.base_collapse,
             "distilled_collapse": tr.distilled_collapse, "verdict": tr.verdict,
             "states": {str(k): v for k, v in tr.states.items()}} for tr in transfers(results)]
