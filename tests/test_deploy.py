"""docker/: compose files, Dockerfiles, Prometheus, Grafana and nginx configs agree with each
other and with the code (settings fields, metric names). No Docker engine is needed."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from config.settings import Settings
from server.metrics import Metrics
from prometheus_service import dashboard_queries, metric_names, require_binary

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
COMPOSE_GPU = DOCKER / "docker-compose.gpu.yml"
COMPOSE_TEST = DOCKER / "compose.test.yml"  # offline override used by `make test-deploy`
DASHBOARD = DOCKER / "grafana" / "dashboards" / "cacheblend.json"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
REPLICAS = ("cacheblend", "cacheblend-2")
SERVER_PORT = "8000"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())  # resolves the x-cacheblend merge keys


def compose_env(path: Path) -> dict[str, str | None]:
    """CACHEBLEND_* variables across services, `${VAR:-default}` resolved to its default;
    None for pass-through entries (no value in the file)."""
    env = {}
    for service in load(path)["services"].values():
        for key, raw in (service.get("environment") or {}).items():
            if key.startswith("CACHEBLEND_"):
                env[key] = None if raw is None else re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(raw))
    return env


def dockerfile_env(path: Path) -> dict[str, str]:
    return dict(re.findall(r"\b(CACHEBLEND_[A-Z0-9_]+)=(\S+)", path.read_text()))


def exposed_names() -> set[str]:
    """Every sample name server/metrics.py can expose."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {family.name + suffix for family in Metrics("m").registry.collect() for suffix in suffixes[family.type]}


def test_compose_services_builds_and_volumes():
    compose = load(COMPOSE)
    services = compose["services"]
    assert set(services) == {*REPLICAS, "lb", "redis", "prometheus", "grafana"}
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert service.get("image") or service.get("build"), name
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert context == ROOT, name
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):  # bind mount of a file in docker/
                assert (DOCKER / source).exists(), f"{name}: {source}"
            else:
                assert source in declared_volumes, f"{name}: {source}"
            assert target.startswith("/"), f"{name}: {target}"
        for port in service.get("ports", []):
            assert re.fullmatch(r"\d+:\d+", str(port)), f"{name}: {port}"
    assert services["lb"]["ports"] == ["8000:80"]


def test_replicas_share_redis_and_keep_their_own_state_on_a_volume():
    services = load(COMPOSE)["services"]
    disks = set()
    for name in REPLICAS:
        env = services[name]["environment"]
        assert env["CACHEBLEND_REDIS_URL"] == "redis://redis:6379/0"
        assert SERVER_PORT in services[name]["expose"]
        state_dir = env["CACHEBLEND_STATE_DIR"]  # registry, documents and disk KV: kept across re-creation
        mounts = [v.split(":") for v in services[name]["volumes"]]
        volume = next(src for src, dst, *_ in mounts if state_dir == dst or state_dir.startswith(dst + "/"))
        disks.add(volume)
    assert len(disks) == len(REPLICAS)  # a state folder is written by one process only


def test_replicas_can_read_a_keys_file_that_never_enters_the_image():
    services = load(COMPOSE)["services"]
    for name in REPLICAS:
        assert "./secrets:/etc/cacheblend:ro" in services[name]["volumes"]
        assert services[name]["environment"]["CACHEBLEND_API_KEYS_FILE"] is None  # passed through from the shell
    assert (ROOT / "docker" / "secrets" / ".gitignore").read_text().splitlines()[1:] == ["*", "!.gitignore"]
    ignored = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "docker" in ignored and "!docker/secrets" not in ignored  # the build context leaves docker/ out


def test_gpu_override_reserves_a_gpu_per_replica_with_the_cuda_image():
    base, gpu = load(COMPOSE)["services"], load(COMPOSE_GPU)["services"]
    assert set(gpu) == set(REPLICAS) <= set(base)
    for service in gpu.values():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert (ROOT / service["build"]["dockerfile"]).name == "Dockerfile.cuda"


@pytest.mark.parametrize("source", [COMPOSE, COMPOSE_GPU, COMPOSE_TEST, *DOCKERFILES], ids=lambda p: p.name)
def test_every_cacheblend_env_var_is_a_setting_with_a_valid_value(source):
    env = compose_env(source) if source.suffix == ".yml" else dockerfile_env(source)
    assert env or source == COMPOSE_GPU
    fields = Settings.model_fields
    unknown = [key for key in env if key.removeprefix("CACHEBLEND_").lower() not in fields]
    assert not unknown
    # The values themselves must pass the settings' validation.
    Settings(**{key.removeprefix("CACHEBLEND_").lower(): value for key, value in env.items() if value is not None})


def test_dockerfiles_serve_on_the_port_compose_and_prometheus_use():
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
        assert entrypoint == ["cacheblend", "serve", "--host", "0.0.0.0", "--port", SERVER_PORT]
        assert "cacheblend convert-embedded" in text
        assert (DOCKER / f"{dockerfile.name}.dockerignore").is_file()
    assert "download.pytorch.org/whl/cpu" in DOCKERFILES[0].read_text()


def test_compose_config_with_the_compose_cli():
    """Full schema check; only where a compose CLI is installed (none is needed otherwise)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        cli = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        cli = ["docker-compose"]
    else:
        pytest.skip("no docker compose CLI")
    for files in ([COMPOSE], [COMPOSE, COMPOSE_GPU], [COMPOSE, COMPOSE_TEST]):
        args = [a for f in files for a in ("-f", str(f))]
        result = subprocess.run([*cli, *args, "config", "-q"], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr


def test_prometheus_config_is_valid_and_scrapes_both_replicas():
    promtool = require_binary("promtool")
    config = DOCKER / "prometheus" / "prometheus.yml"
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    job = next(j for j in load(config)["scrape_configs"] if j["job_name"] == "cacheblend")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"{r}:{SERVER_PORT}" for r in REPLICAS]


def test_nginx_balances_over_both_replicas():
    conf = (DOCKER / "nginx.conf").read_text()
    assert re.findall(r"^\s*server\s+([\w.-]+:\d+)", conf, re.M) == [f"{r}:{SERVER_PORT}" for r in REPLICAS]
    assert re.search(r"^\s*listen\s+80;", conf, re.M)
    assert "proxy_buffering off;" in conf  # streamed responses


def test_grafana_provisioning_matches_compose_mounts_and_dashboard():
    datasource = load(DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    provider = load(DOCKER / "grafana" / "provisioning" / "dashboards" / "cacheblend.yml")["providers"][0]
    mounts = dict(v.split(":")[:2] for v in load(COMPOSE)["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if p["type"] != "row"}
    assert uids == {datasource["uid"]}


def test_dashboard_queries_use_only_metrics_the_server_exposes():
    known = exposed_names()
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # Grafana's label_values(SELECTOR, LABEL): the selector is PromQL, the label is not.
    variable_queries = [re.fullmatch(r"label_values\((.+),\s*\w+\)", v["definition"]).group(1)
                        for v in dashboard["templating"]["list"]]
    queries = dashboard_queries(DASHBOARD)
    assert len(queries) >= 20
    for expr in queries + variable_queries:
        names = metric_names(expr)
        assert names, expr
        assert names <= known, f"{expr}: unknown {names - known}"


def test_metric_names_parses_promql():
    expr = ('sum by (tier) (rate(cacheblend:a_total{x=~"$m", y="b c"}[5m])) / ignoring(tier) group_left() '
            '(sum(rate(cacheblend:b_total[1m:10s])) + scalar(up offset 5m)) > bool 0.5e3')
    assert metric_names(expr) == {"cacheblend:a_total", "cacheblend:b_total", "up"}


def render_rules(command: list[str]) -> tuple[str, dict[str, str]]:
    """The source file and FROM=TO rules of a `render-config SRC DST FROM=TO...` command line."""
    words = shlex.split(command[-1].split("&&")[0])
    assert words[0] == "render-config", command
    return words[1], dict(rule.split("=", 1) for rule in words[3:])


def test_offline_override_runs_the_real_services_on_loopback_with_the_real_configs():
    base, test = load(COMPOSE)["services"], load(COMPOSE_TEST)["services"]
    # Published ports are impossible on the host network and cannot be removed by an override:
    # lb and prometheus are replaced by *-host twins; Grafana (no Debian package) is left out.
    twins = {"lb": "lb-host", "prometheus": "prometheus-host"}
    for name in (*twins, "grafana"):
        assert test[name] == {"profiles": ["grafana" if name == "grafana" else "bridge-network"]}, name
    running = {name: s for name, s in test.items() if "profiles" not in s}
    assert set(running) == (set(base) - {"grafana", *twins}) | set(twins.values())
    assert all(s["network_mode"] == "host" for s in running.values())
    for name, twin in twins.items():
        assert running[twin]["volumes"] == base[name]["volumes"]  # the same config files, same paths
        assert set(running[twin]["depends_on"]) == set(base[name]["depends_on"])
        assert running[twin]["restart"] == base[name]["restart"]
    ports = {}
    for name in REPLICAS:
        host, port = running[name]["command"][1], running[name]["command"][3]
        assert running[name]["command"] == ["--host", host, "--port", port] and host == "127.0.0.1"
        assert f"127.0.0.1:{port}/health" in running[name]["healthcheck"]["test"][-1]
        ports[name] = port
    # The real nginx.conf and prometheus.yml, addresses rewritten.
    for name, config in (("lb", DOCKER / "nginx.conf"), ("prometheus", DOCKER / "prometheus" / "prometheus.yml")):
        mounts = dict(v.split(":")[:2] for v in base[name]["volumes"])
        source, rules = render_rules(running[twins[name]]["command"])
        assert mounts[f"./{config.relative_to(DOCKER)}"] == source
        text = config.read_text()
        for old, new in rules.items():
            assert old in text, f"{config.name}: {old}"
            assert "127.0.0.1:" in new
        for replica in REPLICAS:
            assert rules[f"{replica}:{SERVER_PORT}"] == f"127.0.0.1:{ports[replica]}"
    lb_port = render_rules(running["lb-host"]["command"])[1]["listen 80;"].split(":")[1].rstrip(";")
    redis = running["redis"]["command"]
    assert redis[1:5] == ["--bind", "127.0.0.1", "--port", redis[4]]
    assert [redis[0], *redis[5:]] == base["redis"]["command"]  # the real flags otherwise
    assert running["cacheblend"]["environment"]["CACHEBLEND_REDIS_URL"] == f"redis://127.0.0.1:{redis[4]}/0"
    listen = re.search(r"--web.listen-address=127.0.0.1:(\d+)", running["prometheus-host"]["command"][-1])
    all_ports = [*ports.values(), lb_port, redis[4], listen.group(1)]
    assert len(set(all_ports)) == len(all_ports), all_ports


def test_cpu_dockerfile_builds_offline_from_a_wheelhouse():
    text = DOCKERFILES[0].read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS app$", text, re.M)  # the final image and the kernels stage build on it
    assert "--no-index --find-links" in text and "ARG WHEELHOUSE=0" in text
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert ignore.index("!docker/wheelhouse") > ignore.index("docker")  # the exception comes after
    assert (DOCKER / "wheelhouse" / "README.md").is_file()  # the folder exists in a fresh clone
