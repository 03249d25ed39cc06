"""The stores a command writes to - the MLflow tracking URI, the Optuna study's storage - checked
before anything is written anywhere, and without creating anything: a database server must take
a connection within seconds, a sqlite file (or an MLflow folder) must exist or have a folder it
can be created in.

    store_problem(url)   why the store cannot be opened, in a few words; None when it can
    local_path(url)      the file or folder of a sqlite URL, a file: URI or a plain path

An http(s) MLflow server is checked by klein_sweep.tracking.check_reachable (its /health).
"""

from __future__ import annotations

import os
from pathlib import Path

from klein_sweep.redaction import redact

CONNECT_TIMEOUT = 3  # seconds: a server that does not answer fails the check, not the command
# SQLAlchemy database URLs that name a server (scheme before any +driver)
SERVER_DATABASES = ("postgresql", "mysql", "mariadb", "mssql", "oracle", "cockroachdb")
# The DBAPI driver's name for a connect timeout, per SQLAlchemy driver
TIMEOUT_ARGUMENT = {"psycopg": "connect_timeout", "psycopg2": "connect_timeout", "pg8000": "timeout",
                    "mysqldb": "connect_timeout", "pymysql": "connect_timeout", "mysqlconnector": "connection_timeout",
                    "mariadbconnector": "connect_timeout", "pyodbc": "timeout", "pymssql": "login_timeout"}


def scheme(url: str) -> str:
    """The URL's scheme without its driver ("postgresql" of postgresql+psycopg://...), lower case;
    "" for a plain path."""
    head, sep, _ = url.partition("://")
    return head.split("+")[0].lower() if sep else ("file" if url.startswith("file:") else "")


def local_path(url: str) -> Path | None:
    """The file of a sqlite URL, the folder of a file: URI or a plain path; None for anything
    else (a server, sqlite in memory)."""
    kind = scheme(url)
    if kind == "sqlite":
        path = url.split("://", 1)[1].split("?", 1)[0]  # sqlite:///rel.db -> /rel.db, sqlite:////abs.db -> //abs.db
        path = path[1:] if path.startswith("/") else path
        return Path(path) if path and path != ":memory:" else None
    if kind == "file":
        return Path(url[len("file://"):] if url.startswith("file://") else url[len("file:"):])
    if kind == "":
        return Path(url) if url else None
    return None


def store_problem(url: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """Why the store at `url` cannot be opened (a few words, redacted), or None when it can or
    when it is nothing this module checks (an http server, a scheme it does not know)."""
    kind = scheme(url)
    if kind in SERVER_DATABASES:
        return _database_problem(url, timeout)
    path = local_path(url)
    if path is None:
        return None
    if kind == "sqlite":
        if path.is_dir():
            return f"{path} is a folder, not a database file"
        if path.exists():
            return None if os.access(path, os.R_OK | os.W_OK) else f"{path} cannot be written"
        return folder_problem(path.parent)
    return None if path.is_dir() and os.access(path, os.W_OK | os.X_OK) else folder_problem(path)


def folder_problem(folder: Path) -> str | None:
    """Why `folder` cannot be created (or written into), None when it can. Creates nothing."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"folder {folder} cannot be created: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"folder {folder} cannot be created: {existing} is not writable"
    return None


def _database_problem(url: str, timeout: float) -> str | None:
    """One connection, opened and closed, with a connect timeout."""
    try:
        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url
        from sqlalchemy.pool import NullPool

        argument = TIMEOUT_ARGUMENT.get(make_url(url).get_dialect().driver)
        engine = create_engine(url, poolclass=NullPool, connect_args={argument: int(timeout)} if argument else {})
    except ImportError as exc:  # the URL names a database whose driver is not installed
        return f"it needs a database driver that is not installed ({exc.name or _first_line(exc)})"
    except Exception as exc:  # a URL SQLAlchemy cannot parse, a dialect it does not know
        return redact(_first_line(exc))
    try:
        with engine.connect():
            return None
    except ImportError as exc:
        return f"it needs a database driver that is not installed ({exc.name or _first_line(exc)})"
    except Exception as exc:  # refused, timed out, bad password, no such database
        return redact(_first_line(getattr(exc, "orig", None) or exc))
    finally:
        engine.dispose()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else exc.__class__.__name__
