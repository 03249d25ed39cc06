"""Credentials in URLs are masked wherever they could be shown, and only the secret is masked."""

from __future__ import annotations

import os

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
        # a raw @ in the password: masked to the last @ of the authority, no tail left over
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("http://u:p@ss@h", "http://u:***@h"),
        ("postgresql://u@corp:pw@h:5432/db", "postgresql://u@corp:***@h:5432/db"),  # a user name with an @
        # an @ after the authority (path, query, fragment) is no userinfo: left alone
        ("http://mlflow:5000/#/x?x=a@b", "http://mlflow:5000/#/x?x=a@b"),
        ("http://h:8080/users/a@b.com", "http://h:8080/users/a@b.com"),
        ("postgresql://klein@127.0.0.1:5432/db", "postgresql://klein@127.0.0.1:5432/db"),
        ("['tracking.uri=postgresql://ks:pw@h', 'sweep.storage=postgresql://a:b@h2/db']",
         "['tracking.uri=postgresql://ks:***@h', 'sweep.storage=postgresql://a:***@h2/db']"),
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


def test_a_redacting_stream_masks_a_url_written_in_pieces():
    import io

    from klein_sweep.redaction import RedactingStream

    out = io.StringIO()
    stream = RedactingStream(out)
    stream.write("overrides: [tracking.uri=postgresql://ks:S3c")
    stream.write("retPw@h/db]\nprogress")
    assert out.getvalue() == "overrides: [tracking.uri=postgresql://ks:***@h/db]\n"
    stream.flush()  # what is pending (a progress bar without its newline) goes out on flush
    assert out.getvalue().endswith("progress") and "S3c" not in out.getvalue()


SECRET = "S3cretPw"


@pytest.mark.parametrize("full_error", ["0", "1"])
@pytest.mark.parametrize("overrides", [
    [f"trackin.uri=postgresql://ks:{SECRET}@127.0.0.1:5/db"],  # Hydra: "To append ... use +trackin.uri=<the value>"
    [f"+tracking.uri=postgresql://ks:{SECRET}@127.0.0.1:5/db"],  # Hydra: "Either remove + prefix: '<the override>'"
    [f"tracking.uri=postgresql://ks:{SECRET}@127.0.0.1:5/db", "nosuch.key=1"],  # the password in another override
], ids=["typo", "append", "other"])
def test_hydra_composition_errors_never_echo_a_password(tmp_path, overrides, full_error):
    from conftest import run_cli

    proc = run_cli("model=tiny", *overrides, cwd=tmp_path, timeout=120, env={"HYDRA_FULL_ERROR": full_error})
    assert proc.returncode != 0 and ("Could not" in proc.stderr), proc.stderr[-3000:]
    assert SECRET not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("full_error", ["0", "1"])
def test_an_unexpected_error_is_one_redacted_line_never_hydras_report_of_the_overrides(tmp_path, full_error):
    """An exception that is no user error (a bug, a library's failure) would reach Hydra, which
    prints 'Error executing job with overrides: [...]' with every override verbatim. The store
    check is made to fail with a plain RuntimeError that quotes the URL."""
    import subprocess
    import sys

    from conftest import repo_pythonpath
    from services import free_port

    script = ("import sys, klein_sweep.tracking as t\n"
              "def broken(uri): raise RuntimeError(f'store {uri} broke')\n"
              "t.check_reachable = broken\n"
              "from klein_sweep.__main__ import main\n"
              "main()\n")
    uri = f"postgresql://ks:{SECRET}@127.0.0.1:{free_port()}/db"
    proc = subprocess.run([sys.executable, "-c", script, "model=tiny", "data=tiny_character", f"tracking.uri={uri}"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": repo_pythonpath(), "HYDRA_FULL_ERROR": full_error},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "klein_sweep: error: RuntimeError: store postgresql://ks:***@127.0.0.1:" in proc.stderr
    assert "Error executing job" not in proc.stderr
    assert ("Traceback" in proc.stderr) == (full_error == "1")  # the traceback only when asked for, redacted
    assert SECRET not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []
