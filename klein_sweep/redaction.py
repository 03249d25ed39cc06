"""Credentials never leave the process: every URL that may carry one (Optuna storage, MLflow
tracking URI) passes through `redact` before it is printed, logged, put in an error, a param, a
tag, a report or the resolved-config artifact.

    postgresql://klein:s3cret@db:5432/klein          -> postgresql://klein:***@db:5432/klein
    http://user:tok@mlflow:5000                      -> http://user:***@mlflow:5000
    postgresql://db/klein?user=k&password=s3cret     -> postgresql://db/klein?user=k&password=***

The command line also prints through `redacted_output()`: whatever reaches stdout or stderr -
Hydra's own errors, which echo overrides, and library messages - is redacted on its way out.
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Any

MASK = "***"
# scheme://user:password@host -> the password part. The authority ends at the first /, ? or #
# (RFC 3986: a / ? # in a password must be percent-encoded, and clients cut the authority there
# too); inside it the userinfo runs to its LAST @, so a password (or a user name, as Azure's
# user@server) with a raw @ is masked whole, and an @ in a path, query or fragment is left alone.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/?#\s]*):(?P<secret>[^/?#\s]*)@")
# ?password=... or &token=... in a query string (also sslpassword, access_token, api_key, secret)
_QUERY = re.compile(r"(?P<key>[?&;](?:[A-Za-z_]*password|[A-Za-z_]*token|api_?key|secret)=)(?P<secret>[^&;#\s]*)", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the secret of every credential-bearing URL in it masked (any number of URLs,
    anywhere in the string: a message, a log line, a YAML dump)."""
    if not isinstance(text, str):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


def redact_values(obj: Any) -> Any:
    """A copy of a nested dict / list structure with every string redacted (params, configs)."""
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_values(v) for v in obj)
    return redact(obj) if isinstance(obj, str) else obj


class RedactingStream:
    """A text stream (sys.stdout, sys.stderr) whose every line passes through `redact` on its
    way out: what libraries and Hydra itself print - an override echoed in Hydra's own error, a
    driver's message - shows no secret either. Text is held until its line ends or the stream
    is flushed, so a URL written in pieces is still masked whole."""

    def __init__(self, stream):
        import threading

        self._stream, self._pending, self._lock = stream, "", threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            if "\n" in self._pending:
                lines, _, self._pending = self._pending.rpartition("\n")
                self._stream.write(redact(lines + "\n"))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._stream.write(redact(self._pending))
                self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding, ...: the wrapped stream's
        if name == "_stream":  # not set yet (a copy being built)
            raise AttributeError(name)
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_output():
    """sys.stdout and sys.stderr through `RedactingStream` while the block runs."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved
