"""`python -m klein_sweep ...` for the tests, forked from a server that imported the libraries once.

A command spends ~6-10 s of CPU importing torch, diffusers, transformers, peft, MLflow and the
rest before it does anything, and the test run starts dozens of them on two cores. The server
here (one per test process, started on first use) imports them once; each command is a process
forked from it that runs the module as `python -m` does (`runpy`, `sys.argv`, the test's cwd,
environment and pipes, its own exit status), so the test sees a real process: it can signal it,
kill it, read its output and exit code. The sweep's own worker processes start as they always do.

Commands that must meet a fresh interpreter still get one (conftest.command_server decides): an
environment that changes what is importable (another PYTHONPATH than the server's), and the
tests of the installed entry points (tests/test_wheel.py), which start theirs themselves.

    server = ZygoteServer.shared(pythonpath)   the test process's server
    server.popen(target, args, cwd, env)       -> ForkedProcess (poll, wait, communicate, send_signal, kill)

`target`: a module name (`python -m klein_sweep`) or a script's Path (`python benchmarks/x.py`).
"""

from __future__ import annotations

import atexit
import io
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRELOAD = (
    "klein_sweep.sweep.preload",  # torch, diffusers, transformers, peft, accelerate, MLflow, Optuna, torchmetrics
    "klein_sweep.config", "klein_sweep.preflight", "klein_sweep.sweep.parallel", "klein_sweep.report",
    "klein_sweep.report.plots", "klein_sweep.tracking", "hydra", "mlflow.store.tracking.sqlalchemy_store",
)


class ForkedProcess:
    """subprocess.Popen's interface for a process the server forked (not our child: the server
    reaps it and sends its exit status)."""

    def __init__(self, conn: socket.socket, pid: int, stdout: int, stderr: int, received: bytes = b""):
        self.pid, self._conn, self._pipes = pid, conn, {stdout: bytearray(), stderr: bytearray()}
        self._stdout, self._stderr = stdout, stderr
        self._status = bytearray(received)  # what arrived of the exit status so far
        self.returncode: int | None = None
        self.args = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._read_status(timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and not self._read_status(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def _read_status(self, timeout: float | None) -> bool:
        """The server sends the exit status once it reaped the process, then closes: read to the end."""
        self._conn.settimeout(timeout)
        while True:
            try:
                chunk = self._conn.recv(256)
            except (socket.timeout, BlockingIOError):
                return False
            if not chunk:
                break
            self._status += chunk
            self._conn.settimeout(None)  # the rest follows at once
        self._conn.close()
        self.returncode = int(json.loads(self._status)["status"]) if self._status else -signal.SIGKILL  # a lost server
        return True

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Both pipes to their end (the process and whatever it started that holds them), then
        the exit status; text as Popen(text=True) decodes it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            for fd in self._pipes:
                if not self._closed(fd):
                    sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        self._pipes[key.fd] += chunk
                    else:
                        sel.unregister(key.fd)
                        os.close(key.fd)
                        self._pipes[key.fd] = bytes(self._pipes[key.fd])  # bytes: closed
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return _text(self._pipes[self._stdout]), _text(self._pipes[self._stderr])

    def _closed(self, fd: int) -> bool:
        return isinstance(self._pipes[fd], bytes)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __del__(self):
        for fd, data in self._pipes.items():
            if not isinstance(data, bytes):
                os.close(fd)
        self._conn.close()


def _text(data: bytes) -> str:
    return io.TextIOWrapper(io.BytesIO(bytes(data)), encoding="utf-8", errors="replace").read()  # universal newlines


class ZygoteServer:
    _shared: "ZygoteServer | None" = None

    def __init__(self, process: subprocess.Popen, folder: str, pythonpath: str):
        self.process, self.folder, self.pythonpath = process, folder, pythonpath
        self.path = os.path.join(folder, "socket")

    @classmethod
    def shared(cls, pythonpath: str) -> "ZygoteServer":
        if cls._shared is None or cls._shared.process.poll() is not None:
            cls._shared = cls.start(pythonpath)
            atexit.register(cls._shared.stop)
        return cls._shared

    @classmethod
    def start(cls, pythonpath: str) -> "ZygoteServer":
        folder = tempfile.mkdtemp(prefix="klein-zygote-")
        with open(os.path.join(folder, "server.log"), "wb") as log:
            process = subprocess.Popen([sys.executable, str(Path(__file__)), os.path.join(folder, "socket")],
                                       env={**os.environ, "PYTHONPATH": pythonpath}, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        server = cls(process, folder, pythonpath)
        deadline = time.monotonic() + 300
        while not os.path.exists(server.path):  # it listens once its imports are done
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                log_text = Path(folder, "server.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the test command server did not start (exit {process.poll()}):\n{log_text}")
            time.sleep(0.05)
        return server

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def popen(self, target: str | Path, args: list[str], cwd: Path, env: dict) -> ForkedProcess:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.path)
            script = isinstance(target, Path)
            request = json.dumps({"module": None if script else target, "script": str(target) if script else None,
                                  "args": list(args), "cwd": str(cwd), "env": env})
            with open(os.devnull, "rb") as devnull:
                socket.send_fds(conn, [request.encode() + b"\n"], [devnull.fileno(), out_w, err_w])
            line, received = _read_line(conn)
            pid = int(json.loads(line)["pid"])
        except BaseException:
            conn.close()
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        proc = ForkedProcess(conn, pid, out_r, err_r, received)
        proc.args = [sys.executable, *([str(target)] if isinstance(target, Path) else ["-m", target]), *args]
        return proc


def _read_line(conn: socket.socket) -> tuple[bytes, bytes]:
    """(the first line, whatever came after it)."""
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("the test command server closed the connection")
        data += chunk
    line, _, rest = data.partition(b"\n")
    return line, rest


# ---- the server process -------------------------------------------------------------------


def _serve(path: str) -> None:
    import gc
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the imports' objects: never collected again, in the server or a command
    # Imports only, no torch operation: a process forked after torch's thread pool started would
    # inherit it broken (the same rule as the sweep's fork server, klein_sweep/sweep/preload.py).
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # the socket appears when it accepts
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    children: dict[int, socket.socket] = {}
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    while os.getppid() == parent:  # the test process is gone: so is its server
        for _ in sel.select(0.05):
            conn, _ = listener.accept()
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            while not msg.endswith(b"\n"):
                msg += conn.recv(1 << 20)
            request = json.loads(msg)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                sel.close()
                listener.close()
                for c in children.values():
                    c.close()
                conn.close()
                _child(request, fds)  # never returns
            for fd in fds:
                os.close(fd)
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            children[pid] = conn
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode())
                except OSError:  # the test stopped listening
                    pass
                conn.close()


def _child(request: dict, fds: list[int]) -> None:
    """The forked command: the test's pipes as 0, 1 and 2, its cwd and environment, then the
    module as `python -m` runs it (or the script as `python path` does), and the interpreter's
    exit (threads joined, atexit hooks)."""
    import atexit as _atexit
    import runpy
    import threading
    import traceback

    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as in a fresh interpreter
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the server's
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = request["script"]
        # sys.path[0] as the interpreter sets it: the working folder for -m, the script's folder
        sys.path[0] = os.path.dirname(os.path.abspath(script)) if script else os.getcwd()
        sys.argv = [script or "-m", *request["args"]]
        code = 0
        try:
            if script:
                runpy.run_path(script, run_name="__main__")
            else:
                runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            traceback.print_exc()
            code = -signal.SIGINT
        except BaseException:
            traceback.print_exc()
            code = 1
        threading._shutdown()  # what the interpreter's exit does: wait for non-daemon threads
        _atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if code < 0:  # died of the signal, as Python does on an uncaught KeyboardInterrupt
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        os._exit(code & 0xFF)


if __name__ == "__main__":
    _serve(sys.argv[1])
