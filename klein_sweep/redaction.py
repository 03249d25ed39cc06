"""Credentials never leave the process: every URL that may carry one (Optuna storage, MLflow
tracking URI) passes through `redact` before it is printed, logged, put in an error, a param, a
tag, a report or the resolved-config artifact.

    postgresql://klein:s3cret@db:5432/klein          -> postgresql://klein:***@db:5432/klein
    http://user:tok@mlflow:5000                      -> http://user:***@mlflow:5000
    postgresql://db/klein?user=k&password=s3cret     -> postgresql://db/klein?user=k&password=***
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# scheme://user:password@host -> the password part
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@\s]*)@")
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
