"""Real servers for the tests that need them: a throw-away PostgreSQL cluster and an MLflow
tracking server, both bound to 127.0.0.1, both stopped (and their data removed) afterwards.

No mocks: the workers talk to the same servers a user's cluster would run.
"""

from __future__ import annotations

import glob
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """Debian installs the server programs under /usr/lib/postgresql/<version>/bin, off PATH."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


class PostgresServer:
    """initdb into a temporary folder, start on 127.0.0.1:<free port>, trust auth for the local
    user. As root the server runs as the `postgres` system user (PostgreSQL refuses root)."""

    def __init__(self):
        self.bin = postgres_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="klein_pg_"))
        self.port = free_port()
        self.user = "klein"
        self._as_root = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, cwd=self.root)

    def start(self) -> "PostgresServer":
        data = self.root / "data"
        if self._as_root:
            shutil.chown(self.root, "postgres")
            self.root.chmod(0o700)
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")
        # fsync off: a test cluster that dies loses nothing we care about, and it is 10x faster.
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(self.root / "server.log"), "-w", "start")
        return self

    def create_database(self, name: str) -> str:
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """`mlflow server` over a database, artifacts served from a local folder, on 127.0.0.1."""

    def __init__(self, backend_uri: str, artifacts: Path, port: int | None = None):
        self.backend_uri, self.artifacts = backend_uri, artifacts
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = artifacts.parent / f"mlflow_server_{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> "MlflowServer":
        self.artifacts.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "2",
        ]
        # No job runner: klein_sweep submits no MLflow jobs (judges, prompt optimization), and the
        # runner and its huey consumers each import the server again: 39 -> 13 s of CPU per server
        # started and left idle 15 s (2 cores AVX-512).
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        # A session of its own: `mlflow server` starts uvicorn workers, which outlive a
        # terminated parent; stop() ends the whole group.
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer in {timeout:.0f}s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """The server and every process it started, as a machine that dies takes them all."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:  # stopped already
            return
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the workers that outlived their parent's end
        except ProcessLookupError:
            pass
        self.proc.wait()


def chromium_bin() -> str | None:
    """Debian's headless-capable `chromium`; installed here (as root, like PostgreSQL in .ci/run)
    when missing and apt-get is at hand."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=900)
        found = shutil.which("chromium")
    return found


def browse(url: str, screenshot: Path, wait_ms: int = 20000, height: int = 1200) -> str:
    """What a person sees at `url`: the page's DOM after its scripts ran (headless Chromium,
    --dump-dom), with a screenshot beside it. `wait_ms` of virtual time lets the app fetch its
    data and draw lazily loaded cards."""
    proc = subprocess.run(
        [chromium_bin(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--virtual-time-budget={wait_ms}",
         f"--window-size=1600,{height}", f"--screenshot={screenshot}", "--dump-dom", url],
        capture_output=True, text=True, timeout=300, cwd=screenshot.parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class BrowserPage:
    """One headless Chromium tab driven over the DevTools protocol (on a pipe: no port, no
    driver, no extra package), for what --dump-dom cannot tell: where things are drawn. `js`
    evaluates an expression in the page; `wait_for` polls one until it is truthy.

        with BrowserPage(width=1600, height=1200) as page:
            page.goto(url)
            page.wait_for("document.querySelector('img') !== null")
    """

    def __init__(self, width: int = 1600, height: int = 1200):
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="klein_chromium_")
        self._id, self._buffer, self.pid = 0, b"", None
        self.answer_timeout = 120.0

    def __enter__(self) -> "BrowserPage":
        to_chrome, from_chrome = os.pipe(), os.pipe()  # Chromium reads commands on fd 3, answers on fd 4
        devnull = os.open(os.devnull, os.O_RDWR)
        args = [chromium_bin(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--remote-debugging-pipe",
                f"--window-size={self.width},{self.height}", f"--user-data-dir={self.profile}", "about:blank"]
        try:
            self.pid = os.posix_spawn(args[0], args, os.environ, file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, devnull, 2),
                (os.POSIX_SPAWN_DUP2, to_chrome[0], 3), (os.POSIX_SPAWN_DUP2, from_chrome[1], 4)])
        finally:
            for fd in (devnull, to_chrome[0], from_chrome[1]):
                os.close(fd)
        self._out, self._in = os.fdopen(to_chrome[1], "wb", buffering=0), os.fdopen(from_chrome[0], "rb", buffering=0)
        target = next(t for t in self._send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self._session = self._send("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
        self._send("Page.enable", page=True)
        self._send("Emulation.setDeviceMetricsOverride", page=True, width=self.width, height=self.height, deviceScaleFactor=1,
                   mobile=False)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._send("Browser.close")
        except (OSError, RuntimeError):
            os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        self._out.close()
        self._in.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _send(self, method: str, page: bool = False, **params):
        import json

        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": self._session} if page else {})}
        self._out.write(json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                # a Chromium that stops answering fails the test instead of hanging it
                if not select.select([self._in], [], [], self.answer_timeout)[0]:
                    raise RuntimeError(f"chromium did not answer {method} within {self.answer_timeout:.0f} s")
                chunk = self._in.read(1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium closed its pipe during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def goto(self, url: str) -> None:
        self._send("Page.navigate", page=True, url=url)

    def js(self, expression: str):
        """The expression's value (JSON-able), awaited when it is a promise."""
        result = self._send("Runtime.evaluate", page=True, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:200]}: {result['exceptionDetails'].get('exception', result['exceptionDetails'])}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90, what: str = ""):
        """The expression's first truthy value, polled (an exception, as while the page loads,
        counts as not yet); an AssertionError naming `what` after `timeout` s."""
        deadline, error = time.time() + timeout, None
        while True:
            try:
                value = self.js(expression)
            except RuntimeError as exc:
                value, error = None, exc
            if value:
                return value
            assert time.time() < deadline, f"not shown within {timeout:.0f} s: {what or expression}" + (f" (last: {error})" if error else "")
            time.sleep(0.25)

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self._send("Page.captureScreenshot", page=True, format="png")["data"]))


def page_text(dom: str) -> str:
    """The visible words of a dumped DOM, whitespace collapsed."""
    import html
    import re

    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))
