"""Credentials in URLs are masked wherever they could be shown, and only the secret is masked."""

from __future__ import annotations

import pytest

from klein_sweep.redaction import redact, redact_values


@pytest.mark.parametrize(
    "text,expected",
    [
        ("postgresql://klein:s3cret@db:5432/klein", "postgresql://klein:***@db:5432/klein"),
        ("http://user:tok@mlflow:5000", "http://user:***@mlflow:5000"),
        ("postgresql://db/klein?user=k&password=s3cret&sslmode=require", "postgresql://db/klein?user=k&password=***&sslmode=require"),
        ("https://host/api?access_token=abc;x=1", "https://host/api?access_token=***;x=1"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("http://host:5000", "http://host:5000"),
        ("error at postgresql://a:b@h/x, then http://c:d@h2", "error at postgresql://a:***@h/x, then http://c:***@h2"),
    ],
)
def test_redact(text, expected):
    assert redact(text) == expected


def test_redact_values_walks_nested_configs():
    cfg = {"sweep": {"storage": "postgresql://u:pw@h/db"}, "train": {"lr": 1e-4}, "list": ["http://a:b@c"]}
    assert redact_values(cfg) == {"sweep": {"storage": "postgresql://u:***@h/db"}, "train": {"lr": 1e-4}, "list": ["http://a:***@c"]}


def test_mlflow_params_and_tags_are_redacted(tmp_path):
    from mlflow.tracking import MlflowClient

    from klein_sweep.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker.start(uri, "e", run_name="r", tags={"origin": "postgresql://u:pw@h/db"})
    tracker.log_params({"tracking.uri": "http://user:pw@host:5000", "sweep.storage": "postgresql://u:pw@h/db?password=pw"})
    tracker.set_tags({"note": "see http://x:pw@h"})
    tracker.finish()
    run = MlflowClient(uri).get_run(tracker.run_id)
    shown = " ".join([*run.data.params.values(), *run.data.tags.values()])
    assert "pw" not in shown.replace("pwd", "")
    assert run.data.params["tracking.uri"] == "http://user:***@host:5000"
