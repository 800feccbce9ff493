"""Run `cacheblend serve` as a child process, for tests and benchmarks that need the real server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_healthy(base_url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} while starting:\n{_log_tail(log_path)}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.2)
    raise TimeoutError(f"the server was not healthy after {timeout_s}s:\n{_log_tail(log_path)}")


def _stop(proc: subprocess.Popen, timeout_s: float) -> int:
    """SIGTERM (graceful shutdown), then SIGKILL after `timeout_s`; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def serve_subprocess(log_path: Path, flags: Sequence[str] = (), env: Optional[Mapping[str, str]] = None,
                     startup_timeout_s: float = 180.0, stop_timeout_s: float = 30.0) -> Iterator[str]:
    """`serve_process`, yielding only the base URL."""
    with serve_process(log_path, flags, env, startup_timeout_s, stop_timeout_s) as (base_url, _):
        yield base_url


CACHEBLEND_SERVE = ("-m", "cacheblend.cli", "serve")
VLLM_SERVE = ("-m", "vllm.entrypoints.openai.api_server")  # the wheel's `vllm` command fails on its metadata


@contextlib.contextmanager
def serve_process(log_path: Path, flags: Sequence[str] = (), env: Optional[Mapping[str, str]] = None,
                  startup_timeout_s: float = 180.0, stop_timeout_s: float = 30.0,
                  program: Sequence[str] = CACHEBLEND_SERVE) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start `cacheblend serve` (or another `program` with --host/--port flags and a /health
    route: vLLM's server) on a free loopback port with `flags` and environment `env`
    (replacing the inherited one), wait until /health answers 200, yield the base URL and the
    process (to send it signals).

    On exit the server gets SIGTERM (then SIGKILL after `stop_timeout_s`); if the body raised
    nothing, an exit other than a clean one (0, or the SIGTERM uvicorn re-raises after its
    shutdown) raises RuntimeError with the end of the server's log (written to `log_path`).
    """
    port = free_port()
    cmd = [sys.executable, *program, "--host", "127.0.0.1", "--port", str(port), *flags]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=dict(env if env is not None else os.environ), stdout=log,
                                stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base_url, proc, log_path, startup_timeout_s)
        yield base_url, proc
    except BaseException:
        _stop(proc, stop_timeout_s)
        raise
    code = _stop(proc, stop_timeout_s)
    if code not in (0, -signal.SIGTERM):  # uvicorn re-raises the signal once it has shut down
        raise RuntimeError(f"the server exited with {code} after SIGTERM:\n{_log_tail(log_path)}")
