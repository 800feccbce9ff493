"""Real backing services for tests: a redis-server process and a moto S3 server, on loopback.

Plain context managers for test fixtures and benchmarks:

    with start_redis() as redis_server:      # redis_server.url, .kill(), .restart()
        ...
    with start_moto() as s3:                 # s3.endpoint, s3.env, s3.create_bucket(name)
        ...

Each picks a free port, waits until the service answers, and stops it on exit.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

from server.launcher import free_port

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
