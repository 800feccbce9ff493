"""Real backing services for tests: a redis-server process and a moto S3 server, on loopback.

Plain context managers for test fixtures and benchmarks:

    with start_redis() as redis_server:      # redis_server.url, .kill(), .restart()
        ...
    with start_moto() as s3:                 # s3.endpoint, s3.env, s3.create_bucket(name)
        ...
    with start_server_process(state_dir, redis_url=url) as (base_url, proc):   # `cacheblend serve`
        ...

Each picks a free port, waits until the service answers, and stops it on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from config.settings import DEFAULT_DATA_DIR, Settings
from engine.vllm_config import CONNECTOR, vllm_env
from server.launcher import VLLM_SERVE, free_port, serve_process

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _wait_for_port(port: int, timeout_s: float, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"service on port {port} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


def redis_available() -> bool:
    return shutil.which("redis-server") is not None


@dataclass
class RedisServer:
    """A redis-server child process without persistence, in its own temp folder."""

    port: int
    workdir: str
    proc: Optional[subprocess.Popen] = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.workdir, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, 10.0, self.proc)

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        """Start again on the same port (empty: nothing is persisted)."""
        self.kill()
        self.start()


@contextlib.contextmanager
def start_redis() -> Iterator[RedisServer]:
    """A fresh redis-server on a free loopback port, killed on exit."""
    if not redis_available():
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="redis-test-") as workdir:
        for attempt in range(3):  # the free port may be taken before redis binds it
            server = RedisServer(free_port(), workdir)
            try:
                server.start()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        try:
            yield server
        finally:
            server.kill()


@dataclass
class MotoServer:
    endpoint: str
    env: dict[str, str]

    def client(self):  # -> botocore S3 client
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)


@contextlib.contextmanager
def start_moto() -> Iterator[MotoServer]:
    """A moto S3 server (real HTTP) on a free loopback port, in a thread of this process.

    Clients need credentials: apply `server.env` to the environment (any values work).
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        _wait_for_port(port, 10.0)
        yield MotoServer(f"http://127.0.0.1:{port}", dict(AWS_TEST_ENV))
    finally:
        server.stop()


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value if isinstance(value, dict) else list(value))
    return str(value)


def _state_settings(state_dir: Path) -> dict[str, Any]:
    """Everything the server writes under `state_dir`; the already converted embedded model is
    reused through a link (no 15 s conversion per server)."""
    models = Path(os.environ.get("CACHEBLEND_DATA_DIR") or DEFAULT_DATA_DIR) / "models"
    if not models.is_dir():
        return {"state_dir": state_dir}
    data_dir = state_dir / "data"
    data_dir.mkdir(exist_ok=True)
    if not (data_dir / "models").exists():
        (data_dir / "models").symlink_to(models.resolve(), target_is_directory=True)
    return {"data_dir": data_dir, "state_dir": state_dir}


@contextlib.contextmanager
def start_server_process(state_dir: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
                         **settings: Any) -> Iterator[tuple[str, subprocess.Popen]]:
    """The real server (`cacheblend serve`) as a child process with these settings (field names
    of config.Settings, passed as CACHEBLEND_* variables; inherited ones are dropped so the
    developer's environment cannot leak in, `env` is added). Its chunk registry, disk KV and log
    live in `state_dir` (its `state_dir` setting; a temporary folder if None): a server started
    again on the same folder finds what the previous one stored. Yields the base URL and the
    process (to send it signals)."""
    unknown = set(settings) - set(Settings.model_fields)
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cacheblend-server-")))
        settings = {**_state_settings(Path(state_dir)), **settings}
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEBLEND_")}
        child_env.update(env or {})
        child_env.update({f"CACHEBLEND_{name.upper()}": _env_value(v) for name, v in settings.items() if v is not None})
        log_fd, log_path = tempfile.mkstemp(prefix="server-", suffix=".log", dir=state_dir)
        os.close(log_fd)
        with serve_process(Path(log_path), env=child_env) as served:
            yield served


@contextlib.contextmanager
def start_vllm_server(model_dir: Path, log_dir: Path, cacheblend: Optional[Mapping[str, Any]] = None,
                      flags: tuple[str, ...] = (), startup_timeout_s: float = 300.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """vLLM's own OpenAI server (`vllm serve`) on `model_dir`, from this Python environment;
    with `cacheblend` (settings for the connector, {} for the defaults) the CacheBlend KV
    connector is loaded into it. Yields the base URL and the process."""
    if cacheblend is not None:
        config = {**CONNECTOR, "kv_connector_extra_config": dict(cacheblend)}
        flags = (*flags, "--kv-transfer-config", json.dumps(config, default=str))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_fd, log_path = tempfile.mkstemp(prefix="vllm-", suffix=".log", dir=log_dir)
    os.close(log_fd)
    env = {**os.environ, **vllm_env()}
    with serve_process(Path(log_path), ("--model", str(model_dir), *flags), env, startup_timeout_s, program=VLLM_SERVE) as served:
        yield served
