"""Checks against the running compose stack (docker/compose.test.yml), in order.

Run by tests/deploy/run.sh (`make test-deploy`), which builds and starts the stack first and
tears it down after; not collected by `make test` (the file name does not start with test_).
The last test stops a replica, so the order of this file matters.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from prometheus_service import dashboard_queries, query, wait_for_scrapes  # noqa: E402

DOCKER = os.environ.get("DEPLOY_DOCKER", "/usr/bin/docker")
PROJECT = os.environ.get("DEPLOY_PROJECT", "cacheblend-test")
IMAGE = os.environ.get("DEPLOY_IMAGE", "cacheblend:cpu")
DASHBOARD = TESTS.parent / "docker" / "grafana" / "dashboards" / "cacheblend.json"

LB = "http://127.0.0.1:18000"
REPLICAS = {"cacheblend": "http://127.0.0.1:18001", "cacheblend-2": "http://127.0.0.1:18002"}
PROMETHEUS = "http://127.0.0.1:19090"
STARTUP_LIMIT_S = 15.0
# The server's shutdown log line once its chunk store is flushed and closed (server/app.py).
FLUSH_LOG = re.compile(r"store flushed", re.I)

CHUNKS = [
    {"text": "The Lighthouse of Alexandria was built in the third century BC on the island of Pharos.\n\n"},
    {"text": "It stood over a hundred metres tall and guided ships into the harbour for centuries.\n\n"},
    {"text": "Earthquakes damaged it between 956 and 1323, and its stones were later reused in a fort.\n\n"},
]
QUESTION = "Where was the Lighthouse of Alexandria built?"


def docker(*args: str, timeout: float = 120) -> str:
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
    return result.stdout


def logs(container_id: str) -> str:
    """A container's log: the server logs to stderr, which `docker logs` keeps apart."""
    result = subprocess.run([DOCKER, "logs", container_id], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def container(service: str) -> str:
    ids = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}",
                 "--filter", f"label=com.docker.compose.service={service}").split()
    assert len(ids) == 1, f"{service}: containers {ids}"
    return ids[0]


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def wait_healthy(base_url: str, timeout_s: float) -> float:
    """Seconds until GET /health answers 200; TimeoutError after `timeout_s`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            get(f"{base_url}/health", timeout=2)
            return time.monotonic() - start
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{base_url}/health not 200 within {timeout_s}s")


def wait_idle(base_url: str, container_id: str, timeout_s: float = 60) -> None:
    """Until a replica runs and queues nothing and its container is (nearly) off the CPU.
    Best effort: returns after `timeout_s` anyway."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = json.loads(get(f"{base_url}/health"))
        if health.get("num_running", 0) == 0 and health.get("num_waiting", 0) == 0:
            cpu = docker("stats", "--no-stream", "--format", "{{.CPUPerc}}", container_id).strip().rstrip("%")
            if float(cpu or 0) < 10:
                return
        time.sleep(0.5)


def metric_sum(base_url: str, selector: str) -> float:
    """Sum of the samples on a replica's /metrics that `selector` matches: a name, optionally
    with `{label="value",...}` matchers."""
    name, _, matchers = selector.partition("{")
    wanted = set(re.findall(r'\w+="[^"]*"', matchers))
    total = 0.0
    for labels, value in re.findall(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", get(f"{base_url}/metrics"), re.M):
        if wanted <= set(re.findall(r'\w+="[^"]*"', labels)):
            total += float(value)
    return total


def client(base_url: str = LB, max_retries: int = 0):
    from openai import OpenAI
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=max_retries, timeout=180)


@functools.cache
def model_id() -> str:
    """The served model's name, from replica 1 directly (so that the GET does not take a turn
    in nginx's balancing between the chat requests)."""
    return json.loads(get(f"{REPLICAS['cacheblend']}/v1/models"))["data"][0]["id"]


def chat(openai_client, stream: bool, mode: str = "cacheblend", chunks=CHUNKS, model: str = "") -> str:
    response = openai_client.chat.completions.create(
        model=model or model_id(), messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0,
        stream=stream, extra_body={"chunks": chunks, "cacheblend": {"mode": mode}})
    if stream:
        text = "".join(e.choices[0].delta.content or "" for e in response if e.choices)
    else:
        text = response.choices[0].message.content
    assert text, "empty answer"
    return text


def test_both_replicas_healthy_behind_nginx():
    for service, url in REPLICAS.items():
        state = json.loads(docker("inspect", container(service)))[0]["State"]
        assert state["Health"]["Status"] == "healthy", (service, state["Health"])
        assert json.loads(get(f"{url}/health"))["status"] == "ok"
    assert json.loads(get(f"{LB}/health"))["status"] == "ok"


def test_chat_with_chunks_through_nginx_reaches_both_replicas():
    before = {s: metric_sum(url, "cacheblend:request_success_total") for s, url in REPLICAS.items()}
    c = client()
    for mode in ("cacheblend", "full_prefill"):
        for stream in (False, True):  # the second request finds the chunks in the store
            chat(c, stream=stream, mode=mode)
    after = {s: metric_sum(url, "cacheblend:request_success_total") for s, url in REPLICAS.items()}
    served = {s: after[s] - before[s] for s in REPLICAS}
    assert sum(served.values()) == 4, served
    assert all(n > 0 for n in served.values()), f"nginx sent every request to one replica: {served}"


def test_a_chunk_registered_on_one_replica_is_served_from_redis_by_the_other():
    a, b = REPLICAS["cacheblend"], REPLICAS["cacheblend-2"]
    text = f"The deployment test registered this passage at {time.time():.6f} on replica one.\n\n"
    redis_bytes = 'cacheblend:kv_bytes_stored_total{tier="redis"}'
    before = metric_sum(a, redis_bytes)
    chunk = client(a).post("/chunks", body={"text": text}, cast_to=dict)
    deadline = time.monotonic() + 60
    while metric_sum(a, redis_bytes) <= before:  # shared-tier writes happen in the background
        assert time.monotonic() < deadline, "replica one never wrote the chunk to Redis"
        time.sleep(0.2)
    c = client(b)
    reply = c.chat.completions.create(
        model=c.models.list().data[0].id, messages=[{"role": "user", "content": QUESTION}], max_tokens=4,
        temperature=0, extra_body={"chunks": [chunk["id"]]})
    assert reply.model_extra["cacheblend"]["chunk_hits"] == {"redis": 1}, reply.model_extra["cacheblend"]


def test_prometheus_scrapes_both_replicas_and_every_dashboard_query_has_data():
    deadline = time.monotonic() + 90
    while True:
        up = {r["metric"]["instance"]: r["value"][1] for r in query(PROMETHEUS, 'up{job="cacheblend"}')}
        if up == {"127.0.0.1:18001": "1", "127.0.0.1:18002": "1"}:
            break
        assert time.monotonic() < deadline, f"cacheblend targets not both up: {up}"
        time.sleep(1)
    wait_for_scrapes(PROMETHEUS, scrapes=2, timeout_s=60)
    # Quality samples are re-run in the background: give the last ones time to land.
    deadline = time.monotonic() + 90
    while True:
        empty = [expr for expr in dashboard_queries(DASHBOARD) if not query(PROMETHEUS, expr)]
        if not empty:
            break
        assert time.monotonic() < deadline, "dashboard queries without data:\n" + "\n".join(empty)
        time.sleep(2)


def test_containers_run_as_a_non_root_user():
    assert json.loads(docker("image", "inspect", IMAGE))[0]["Config"]["User"] == "cacheblend"
    for service in REPLICAS:
        uid = docker("exec", container(service), "python", "-c", "import os; print(os.getuid(), os.getgid())")
        assert uid.split()[0] != "0", f"{service} runs as root"


def test_the_model_was_converted_at_build_time():
    listing = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", IMAGE, "-c",
                     "ls /opt/cacheblend/models/*/model.safetensors /opt/cacheblend/models/*/config.json")
    assert "model.safetensors" in listing and "config.json" in listing
    for service in REPLICAS:
        log = logs(container(service))
        assert "Uvicorn running" in log, log[-2000:]
        assert "converting embedded model" not in log, f"{service} converted the model at start-up"


def test_the_decode_kernel_was_built_at_build_time():
    """The image carries the compiled decode attention kernel for each CPU capability, and the
    replicas load it (no compiler in the image: a missing build would fall back to torch ops)."""
    listing = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", IMAGE, "-c",
                     "ls $TORCH_EXTENSIONS_DIR/cacheblend/")
    assert len(re.findall(r"^cacheblend_decode_\w+\.so$", listing, re.M)) == 3, listing
    for service in REPLICAS:
        log = logs(container(service))
        assert "CPU kernels unavailable" not in log, f"{service} runs without the compiled kernels"


def test_docker_stop_of_a_replica_fails_no_request_and_shuts_it_down_gracefully():
    """Requests flow through nginx while one replica is stopped: none fails with one client
    retry (nginx passes refused or draining requests to the other replica itself); the stopped
    replica drains, flushes its store and exits cleanly; started again it is healthy in < 15 s."""
    stopped, other = "cacheblend", "cacheblend-2"
    errors: list[str] = []
    done: list[int] = []
    stop_flag = threading.Event()

    def load() -> None:
        c = client(max_retries=1)
        i = 0
        while not stop_flag.is_set():
            try:
                chat(c, stream=i % 2 == 1)
                done.append(i)
            except Exception as e:  # noqa: BLE001 - every failure is a finding
                errors.append(f"request {i}: {type(e).__name__}: {e}")
            i += 1

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while len(done) < 2:
            assert time.monotonic() < deadline and not errors, f"load did not start: {errors}"
            time.sleep(0.1)
        cid = container(stopped)
        docker("stop", "--time", "30", cid, timeout=90)
        other_before = metric_sum(REPLICAS[other], "cacheblend:request_success_total")
        after_stop = len(done)
        deadline = time.monotonic() + 180
        while len(done) < after_stop + 4:
            assert time.monotonic() < deadline, f"only {len(done) - after_stop} requests after the stop: {errors}"
            time.sleep(0.1)
    finally:
        stop_flag.set()
        thread.join(timeout=200)
    assert not errors, "\n".join(errors)
    assert metric_sum(REPLICAS[other], "cacheblend:request_success_total") - other_before >= 4

    state = json.loads(docker("inspect", cid))[0]["State"]
    assert not state["Running"] and not state["OOMKilled"]
    assert state["ExitCode"] in (0, 143), f"exit code {state['ExitCode']}: killed rather than shut down"
    log = logs(cid)
    assert "Application shutdown complete" in log, log[-3000:]
    assert FLUSH_LOG.search(log), f"no '{FLUSH_LOG.pattern}' line in the stopped replica's log:\n{log[-3000:]}"

    # Start-up of the built image: no conversion, model load only. The best of up to five
    # starts, so slow starts on a loaded machine (other jobs) do not decide it.
    times = []
    for attempt in range(5):
        if attempt:
            docker("stop", "--time", "30", cid, timeout=90)
        # The load's last requests, and their quality re-runs in the background, would slow it.
        wait_idle(REPLICAS[other], container(other))
        start = time.monotonic()
        docker("start", cid)
        wait_healthy(REPLICAS[stopped], timeout_s=120)
        times.append(time.monotonic() - start)
        if times[-1] < STARTUP_LIMIT_S:
            break
    print(f"\nstart-up to healthy: {', '.join(f'{t:.1f}' for t in times)} s")
    Path(os.environ.get("DEPLOY_LOGS", "/tmp"), "startup_s.txt").write_text(" ".join(f"{t:.1f}" for t in times) + "\n")
    assert min(times) < STARTUP_LIMIT_S, f"start-up took {times} s"
    assert "converting embedded model" not in logs(cid)
    assert json.loads(get(f"{LB}/health"))["status"] == "ok"
