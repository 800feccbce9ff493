"""A real Prometheus for tests, and helpers to run the Grafana dashboard's queries against it.

Needs the `prometheus` binary (Debian package `prometheus`). Tests call `require_binary` first:
it skips when the binary is missing on a developer machine, but fails under CI (CI=true), so
a CI image without Prometheus cannot pass by skipping.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping, Optional

import pytest
import yaml

from server.launcher import free_port

# Values for Grafana's built-in and dashboard variables when a query runs outside Grafana.
# `.+` matches every model, like the dashboard's "All" (its allValue).
DEFAULT_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "model_name": ".+"}

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "and", "or", "unless", "offset", "inf", "nan"}


def require_binary(name: str) -> str:
    """Path of `name`; skip the test when it is missing, except under CI, where it fails."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@contextlib.contextmanager
def start_prometheus(targets: list[str], scrape_interval: str = "1s", timeout_s: float = 30.0) -> Iterator[str]:
    """Run Prometheus scraping `targets` ("host:port", path /metrics); yield its base URL.

    The config and TSDB live in a temporary folder; the process is stopped on exit.
    """
    binary = require_binary("prometheus")
    with tempfile.TemporaryDirectory(prefix="prometheus-") as tmp:
        config = Path(tmp, "prometheus.yml")
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": [{"job_name": "cacheblend", "metrics_path": "/metrics",
                                "static_configs": [{"targets": list(targets)}]}],
        }))
        port = free_port()
        log_path = Path(tmp, "prometheus.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        base_url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(base_url, proc, log_path, timeout_s)
            yield base_url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(base_url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:  # refused, or 503 while starting
            pass
        time.sleep(0.1)
    raise TimeoutError(f"prometheus not ready after {timeout_s}s:\n{log_path.read_text()[-2000:]}")


def query(base_url: str, expr: str) -> list:
    """Evaluate `expr` now through /api/v1/query; return `data.result` (the series of a
    vector, or [time, value] of a scalar). A PromQL error raises ValueError."""
    url = f"{base_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
    except urllib.error.HTTPError as e:  # 400/422 carry the PromQL error in the body
        body = json.load(e)
    if body.get("status") != "success":
        raise ValueError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def wait_for_scrapes(base_url: str, scrapes: int = 2, timeout_s: float = 30.0) -> None:
    """Wait until every target has been scraped successfully `scrapes` more times from now.

    Each scrape writes one `up` sample per target, so counting them counts scrapes.
    """
    def counts() -> dict[str, float]:
        ok = {r["metric"]["instance"] for r in query(base_url, "up == 1")}
        return {r["metric"]["instance"]: float(r["value"][1])
                for r in query(base_url, "count_over_time(up[1h])") if r["metric"]["instance"] in ok}

    start = counts()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = counts()
        targets = query(base_url, "up")
        if targets and len(now) == len(targets) and all(now[i] - start.get(i, 0) >= scrapes for i in now):
            return
        time.sleep(0.2)
    raise TimeoutError(f"targets not scraped {scrapes} times in {timeout_s}s: {query(base_url, 'up')}")


def dashboard_queries(path: str | os.PathLike, variables: Optional[Mapping[str, str]] = None) -> list[str]:
    """Every panel target's PromQL in a Grafana dashboard JSON (rows included), with `$name`,
    `${name}` and `[[name]]` variables replaced from DEFAULT_VARIABLES updated by `variables`.
    A variable with no value raises KeyError."""
    values = {**DEFAULT_VARIABLES, **(variables or {})}
    dashboard = json.loads(Path(path).read_text())

    def panels(items: list) -> Iterator[dict]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    def substitute(expr: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)|\[\[(\w+)\]\]",
                      lambda m: values[next(g for g in m.groups() if g)], expr)

    return [substitute(target["expr"])
            for panel in panels(dashboard.get("panels", []))
            for target in panel.get("targets", []) if target.get("expr")]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords or label names)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery durations
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([\w\s,]*\)", " ", s)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", s):
        followed_by_call = s[m.end():].lstrip().startswith("(")
        if not followed_by_call and m.group().lower() not in PROMQL_KEYWORDS:
            names.add(m.group())
    return names
