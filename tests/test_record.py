"""The trial record is the study's contract: one codec, a version, NaN kept as NaN, unknown
versions refused with a message."""

from __future__ import annotations

import json
import math

import pytest

from klein_sweep.record import (
    RECORD_VERSION,
    Attr,
    BaseStats,
    CheckpointRow,
    Judged,
    RecordError,
    StudyMeta,
    TrialRecord,
    decode_trial,
    encode_trial,
)


def sample_record() -> TrialRecord:
    rows = [
        CheckpointRow(step=500, repeats=25.0, loss=0.41, lr=1e-4, lora_norm=0.8,
                      metrics={"id_sim": 0.61, "kid": 0.012, "is": 1.9, "leak": 0.4}, state="good",
                      scales={"0.5": Judged({"id_sim": 0.55}, "underfit", "identity near base")},
                      full={"id_sim": 0.63, "kid": 0.010}, distilled={"id_sim": 0.58}),
        CheckpointRow(step=1000, loss=float("nan"), lora_norm=float("inf"), state="collapsed", reason="non-finite loss"),
        CheckpointRow(step=1500),  # not evaluated, not judged: every optional part missing
    ]
    return TrialRecord(state="collapsed", steps=1500, rows=rows, collapse_step=1000, best_step=500,
                       base=BaseStats(id_sim=0.5, leak=0.39, degenerate=0.0, prior_kid_noise=0.004, reference_id_sim=0.93,
                                      reference_sample_sim=0.7, kid=0.4, prior_reference_kid=0.6),
                       base_full=BaseStats(id_sim=0.52, leak=0.37, reference_id_sim=0.93),
                       base_distilled=BaseStats(id_sim=0.48, model="flux2_klein_9b"), train_seconds=12.5, eval_seconds=3.25)


def stored(attrs: dict) -> dict:
    """What a storage hands back: strict JSON (no NaN tokens allowed)."""
    return json.loads(json.dumps(attrs, allow_nan=False))


def test_round_trip_keeps_every_field_nan_and_missing_metrics():
    record = sample_record()
    back = decode_trial(stored(encode_trial(record)))
    assert back.state == "collapsed" and back.steps == 1500 and back.collapse_step == 1000 and back.best_step == 500
    assert back.base == record.base and back.base_full == record.base_full and back.base_distilled.model == "flux2_klein_9b"
    first, diverged, bare = back.rows
    assert first == record.rows[0]  # metrics, scales with their verdict, full and distilled
    assert math.isnan(diverged.loss) and diverged.lora_norm == math.inf and diverged.reason == "non-finite loss"
    assert bare.metrics == {} and not bare.evaluated and bare.state is None and bare.full is None
    # value(): the full evaluation's figure where it ran, the checkpoint's own otherwise
    assert first.metrics["id_sim"] == 0.61 and first.value("id_sim") == 0.63 and first.value("loss") == 0.41 and first.value("fid") is None


def test_attributes_are_separate_and_readable():
    attrs = encode_trial(sample_record())
    assert attrs[Attr.VERSION] == RECORD_VERSION and attrs[Attr.STATE] == "collapsed"
    assert attrs[Attr.CHECKPOINTS][1]["loss"] == "nan"  # JSON has no NaN: a string the codec reads back


def test_unknown_version_and_unknown_metric_are_refused():
    attrs = stored(encode_trial(sample_record()))
    with pytest.raises(RecordError, match=r"trial 7: record version 99, this klein_sweep reads version 2"):
        decode_trial({**attrs, Attr.VERSION: 99}, where="trial 7")
    with pytest.raises(RecordError, match="version None"):
        decode_trial({k: v for k, v in attrs.items() if k != Attr.VERSION})
    attrs[Attr.CHECKPOINTS][0]["sharpness"] = 1.0
    with pytest.raises(RecordError, match=r"unknown metric keys \['sharpness'\]"):
        decode_trial(attrs)


def test_a_trial_without_a_record_decodes_to_none():
    assert decode_trial({Attr.CELL: {"train.lr": 1e-4}, Attr.WORKER: "host:1"}) is None


def test_study_meta_round_trip_and_version():
    meta = StudyMeta(objective="eval/id_sim", direction="maximize", step_axis="steps", step_values=[500, 1000],
                     repeats_values=None, steps_are_checkpoints=True, notes=["n"], n_cells=5, trainings_saved=20,
                     plan_hash="abc", plan={"train.rank": 16})
    assert StudyMeta.from_json(stored(meta.to_json())) == meta
    with pytest.raises(RecordError, match="study meta version 0"):
        StudyMeta.from_json({**meta.to_json(), "version": 0})
