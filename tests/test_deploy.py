"""Deploy files (deploy/): they parse, name only metrics the server exports, and use real CLI flags.

Static checks only (no Docker, no network, no cluster). The compose file is validated against the
Compose Specification JSON schema vendored at tests/data/compose_spec.json: byte for byte
`compose/config/compose_spec.json` from the docker-compose 1.29.2 wheel on PyPI (Apache-2.0,
sha256 0dc04bd346dcfee1b1419628fff79937bbf076925f298f272a2b490e2b112bac). docker-compose itself is
not a dependency: it pins PyYAML<6 and jsonschema<4, which conflict with this project's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from rollcast.server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "rollcast.json"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
SERVICE = DEPLOY / "kuberay" / "service.yaml"
COMPOSE_SCHEMA = Path(__file__).parent / "data" / "compose_spec.json"
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))

# Series the deploy files may use that the rollcast registry does not hold, and who makes them.
EXTERNAL_METRICS = {
    "up": "Prometheus, per scrape target",
    "probe_success": "blackbox exporter probing /readyz (deploy/docker-compose.yml)",
}

# PromQL functions and aggregation operators (prometheus.io/docs/prometheus/latest/querying/).
PROMQL_FUNCTIONS = frozenset({
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time",
    "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv", "exp", "floor", "histogram_avg",
    "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev", "histogram_stdvar",
    "histogram_sum", "holt_winters", "hour", "idelta", "increase", "irate", "label_join", "label_replace",
    "last_over_time", "ln", "log10", "log2", "mad_over_time", "max_over_time", "min_over_time", "minute",
    "month", "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round",
    "scalar", "sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt",
    "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp", "vector",
    "year", "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio"
})
PROMQL_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
    "atan2", "inf", "nan"
})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# An identifier not inside a number, duration or variable ("1e-3", "5m", "$__rate_interval").
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(\s*\()?")
_BUCKET_LE = re.compile(r'([A-Za-z_:][\w:]*_bucket)\{[^}]*\ble="([^"]*)"')

_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created"), "gauge": ("",)}


@cache
def registry() -> ServerMetrics:
    # A fresh ServerMetrics is exactly what the app builds (one per app, on its own registry).
    return ServerMetrics(lambda: {})


@cache
def exported_names() -> frozenset[str]:
    """Every series name the server's /metrics can expose, labelled families included.

    Labelled families have no samples until a label set is used, so the names come from each
    family's type as well as from the samples present now.
    """
    names: set[str] = set()
    for family in registry().registry.collect():
        names.update(s.name for s in family.samples)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return frozenset(names)


@cache
def bucket_bounds() -> dict[str, frozenset[str]]:
    """`le` label values of the unlabelled histograms, exactly as exposed (PromQL matches strings)."""
    bounds: dict[str, set[str]] = {}
    for family in registry().registry.collect():
        for s in family.samples:
            if s.name.endswith("_bucket"):
                bounds.setdefault(s.name, set()).add(s.labels["le"])
    return {name: frozenset(v) for name, v in bounds.items()}


def promql_identifiers(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, function names) in a PromQL expression.

    Strings, label matchers, ranges and grouping clauses go first (their contents are label names,
    values and durations, not metrics); an identifier followed by "(" is a function.
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    metrics: set[str] = set()
    functions: set[str] = set()
    for m in _IDENT.finditer(text):
        name = m.group(1)
        if m.group(2):
            functions.add(name)
        elif name not in PROMQL_KEYWORDS:
            metrics.add(name)
    return metrics, functions


def unknown_names(expr: str) -> list[str]:
    metrics, functions = promql_identifiers(expr)
    known = exported_names() | EXTERNAL_METRICS.keys()
    return sorted(metrics - known) + sorted(f"{f}()" for f in functions - PROMQL_FUNCTIONS)


def _balanced(expr: str) -> bool:
    text = _STRING.sub('""', expr)
    return all(text.count(a) == text.count(b) for a, b in ("()", "{}", "[]"))


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard_exprs() -> list[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    return list(walk(json.loads(DASHBOARD.read_text())))


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in _load_yaml(ALERTS)["groups"] for rule in group["rules"]]


# -- the extractor itself ------------------------------------------------------------------------


def test_extractor_finds_metrics_and_skips_functions_labels_and_durations() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, stage) (rate(rollcast_stage_seconds_bucket'
            '{stage=~"a|b", le!="+Inf"}[$__rate_interval] offset 1h))) > 1e-3 and on(instance) up == 1')
    metrics, functions = promql_identifiers(expr)
    assert metrics == {"rollcast_stage_seconds_bucket", "up"}
    assert functions == {"histogram_quantile", "sum", "rate"}
    assert unknown_names(expr) == []


def test_extractor_flags_made_up_names() -> None:
    assert unknown_names('sum(rate(rollcast_made_up_total{outcome="x"}[5m]))') == ["rollcast_made_up_total"]
    # A counter is exposed with _total only; its bare family name is not a series.
    assert unknown_names("rate(rollcast_admissions[5m])") == ["rollcast_admissions"]
    assert unknown_names("rate(rollcast_admissions_total[5m])") == []
    assert unknown_names("histogram_quantil(0.9, rollcast_ttff_seconds_bucket)") == ["histogram_quantil()"]


def test_registry_names_cover_every_family_type() -> None:
    names = exported_names()
    assert {"rollcast_sessions", "rollcast_admissions_total", "rollcast_stage_seconds_bucket",
            "rollcast_ttff_seconds_count", "rollcast_kv_cache_bytes"} <= names
    assert "rollcast_admissions" not in names


# -- every file parses ---------------------------------------------------------------------------


def test_deploy_files_exist() -> None:
    for path in (COMPOSE, PROMETHEUS, ALERTS, DASHBOARD, RAYCLUSTER, SERVICE, DEPLOY / "README.md",
                 DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml",
                 DEPLOY / "grafana" / "provisioning" / "dashboards" / "rollcast.yml"):
        assert path.is_file(), path
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("path", sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]),
                         ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.json")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_json_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


# -- metrics in the dashboard and the alerts -----------------------------------------------------


def test_dashboard_queries_use_real_metrics() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    problems = {e: unknown_names(e) for e in exprs if unknown_names(e)}
    assert not problems, problems
    for e in exprs:
        assert _balanced(e), e
        assert promql_identifiers(e)[0], f"no metric found in {e!r}"  # the extractor did not eat it


def test_alert_rules_use_real_metrics() -> None:
    rules = alert_rules()
    assert len(rules) >= 4
    problems = {r["alert"]: unknown_names(r["expr"]) for r in rules if unknown_names(r["expr"])}
    assert not problems, problems
    for r in rules:
        assert _balanced(r["expr"]) and promql_identifiers(r["expr"])[0], r["alert"]


def test_bucket_bounds_in_queries_exist() -> None:
    # `le` matches the exposed string: le="2" would silently select nothing where "2.0" is exposed.
    exprs = dashboard_exprs() + [r["expr"] for r in alert_rules()]
    checked = 0
    for e in exprs:
        for name, le in _BUCKET_LE.findall(e):
            if name in bucket_bounds():
                assert le in bucket_bounds()[name], (name, le, sorted(bucket_bounds()[name]))
                checked += 1
    assert checked


def test_alerts_cover_the_operators_questions() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    used = set().union(*(promql_identifiers(r["expr"])[0] for r in rules))
    # SLO attainment, admission rejections, deadline misses, engine readiness.
    assert {"rollcast_generation_latency_seconds_count", "rollcast_admissions_total",
            "rollcast_deadline_misses_total", "probe_success"} <= used
    for r in rules:
        assert r["labels"]["severity"] in {"critical", "warning", "info"}
        assert r["annotations"]["summary"]


def test_dashboard_shape() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for p in panels:
        assert {"x", "y", "w", "h"} <= p["gridPos"].keys()
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]


# -- Prometheus and Grafana wiring ---------------------------------------------------------------


def test_prometheus_scrapes_rollcast_and_loads_the_alerts() -> None:
    config = _load_yaml(PROMETHEUS)
    assert [(PROMETHEUS.parent / f).resolve() for f in config["rule_files"]] == [ALERTS.resolve()]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    rollcast = jobs["rollcast"]
    assert rollcast.get("metrics_path", "/metrics") == "/metrics"
    assert rollcast["static_configs"][0]["targets"] == ["rollcast:8000"]
    assert jobs["rollcast-readyz"]["static_configs"][0]["targets"] == ["http://rollcast:8000/readyz"]


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path (relative to deploy/) of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (DEPLOY / source).resolve()
    return out


def test_compose_wiring() -> None:
    compose = _load_yaml(COMPOSE)
    services = compose["services"]
    assert {"rollcast", "prometheus", "grafana"} <= services.keys()
    build = services["rollcast"]["build"]
    assert ((DEPLOY / build["context"]) / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile.cpu")
    assert "8000:8000" in services["rollcast"]["ports"]
    for name, service in services.items():
        for target, host in _mounts(service).items():
            assert host.exists(), (name, target, host)
    prom = _mounts(services["prometheus"])
    assert prom["/etc/prometheus/prometheus.yml"] == PROMETHEUS.resolve()
    assert prom["/etc/prometheus/alerts.yml"] == ALERTS.resolve()  # beside it, as rule_files expects
    grafana = _mounts(services["grafana"])
    provider = _load_yaml(DEPLOY / "grafana/provisioning/dashboards/rollcast.yml")["providers"][0]
    assert (grafana[provider["options"]["path"]] / DASHBOARD.name).is_file()
    datasource = _load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"


def _gpu_variant() -> dict[str, Any]:
    """The commented-out GPU service of docker-compose.yml, uncommented."""
    text = COMPOSE.read_text()
    block = text.split("# BEGIN gpu-variant\n", 1)[1].split("# END gpu-variant", 1)[0]
    lines = [re.sub(r"^(\s*)# ?", r"\1", line) for line in block.splitlines()]
    return yaml.safe_load("\n".join(lines))


def _compose_errors(doc: dict[str, Any]) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_matches_the_compose_spec() -> None:
    compose = _load_yaml(COMPOSE)
    assert _compose_errors(compose) == []
    # The validator does reject what the spec forbids.
    broken = {**compose, "services": {**compose["services"], "rollcast": {"imagee": "x"}}}
    assert _compose_errors(broken)


def test_compose_gpu_variant_matches_the_compose_spec() -> None:
    gpu = _gpu_variant()
    compose = _load_yaml(COMPOSE)
    assert _compose_errors({**compose, "services": {**compose["services"], **gpu}}) == []
    (service,) = gpu.values()
    assert service["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


# -- Dockerfiles ---------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = _instructions(path)
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runtime_stage(path: Path) -> None:
    stage = _final_stage(path)
    words = dict(stage)  # the last of each instruction wins, as in Docker
    assert "/readyz" in words["HEALTHCHECK"]
    assert words["USER"] not in {"root", "0", "0:0"} and not words["USER"].startswith("root:")
    assert words["EXPOSE"] == "8000"
    cmd = json.loads(words["CMD"])
    assert cmd[:2] == ["rollcast", "serve"] and "0.0.0.0" in cmd and "8000" in cmd


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_torch_from_an_overridable_index(path: Path) -> None:
    args = dict(a.split("=", 1) for word, a in _instructions(path) if word == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/")
    assert args["TORCH_INDEX_URL"].endswith("/cpu") == path.name.endswith(".cpu")
    assert "${TORCH_INDEX_URL}" in path.read_text()


# -- KubeRay ----------------------------------------------------------------------------------


def _head_container() -> dict[str, Any]:
    cluster = _load_yaml(RAYCLUSTER)
    return cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def test_raycluster_groups() -> None:
    cluster = _load_yaml(RAYCLUSTER)
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    images = {_head_container()["image"]}
    groups = spec["workerGroupSpecs"]
    assert len(groups) >= 2
    products, custom = set(), set()
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] >= 1
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        images.add(container["image"])
        for kind in ("requests", "limits"):
            assert int(container["resources"][kind]["nvidia.com/gpu"]) >= 1, group["groupName"]
        products.add(pod["nodeSelector"]["nvidia.com/gpu.product"])
        # KubeRay wants the JSON quoted once more: '"{\"gpu_l40s\": 1}"'.
        raw = group["rayStartParams"]["resources"]
        assert raw.startswith('"') and raw.endswith('"'), raw
        resources = json.loads(raw[1:-1].replace('\\"', '"'))
        custom.update(resources)
    assert len(products) == len(groups), "one GPU type per worker group"
    assert len(custom) == len(groups), "one custom Ray resource per GPU type"
    assert len(images) == 1, "head and workers need the same Python, Ray and rollcast"


def test_raycluster_head_serves_http_and_probes_readyz() -> None:
    head = _head_container()
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["http"] == 8000
    assert head["readinessProbe"]["httpGet"]["path"] == "/readyz"
    script = " ".join(head["args"])
    assert "$KUBERAY_GEN_RAY_START_CMD" in script
    (argv,) = _rollcast_commands(script)
    assert argv[:2] == ["rollcast", "serve"]
    assert argv[argv.index("--executor"):argv.index("--executor") + 2] == ["--executor", "ray"]
    assert argv[argv.index("--address") + 1] == "auto"


def test_service_selects_the_head() -> None:
    service = _load_yaml(SERVICE)
    cluster = _load_yaml(RAYCLUSTER)
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"],
                                           "ray.io/node-type": "head"}
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8000 and port["targetPort"] == "http"


# -- every rollcast command line parses with the real CLI -----------------------------------------


def _rollcast_commands(script: str) -> list[list[str]]:
    """`rollcast ...` command lines in a shell script (up to ;, &&, || or a newline)."""
    script = script.replace("\\\n", " ")
    return [shlex.split(m.group(0)) for m in re.finditer(r"\brollcast\s+[a-z][^;&|\n]*", script)]


def _command_lines() -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    for path in DOCKERFILES:
        found.append((path.name, json.loads(dict(_final_stage(path))["CMD"])))
    compose = _load_yaml(COMPOSE)
    for name, service in {**compose["services"], **_gpu_variant()}.items():
        if service.get("command", [""])[0] == "rollcast":
            found.append((f"compose:{name}", service["command"]))
    cluster = _load_yaml(RAYCLUSTER)
    groups = [("head", cluster["spec"]["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster["spec"]["workerGroupSpecs"]]
    for group, spec in groups:
        for container in spec["template"]["spec"]["containers"]:
            script = "\n".join([*container.get("command", []), *container.get("args", [])])
            found.extend((f"raycluster:{group}", argv) for argv in _rollcast_commands(script))
    return found


COMMANDS = _command_lines()


@cache
def _parser() -> argparse.ArgumentParser:
    from rollcast.server.cli import build_parser  # imports torch: only when these tests run

    return build_parser()


def _parse_error(argv: list[str]) -> str | None:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            _parser().parse_args(argv)
        except SystemExit:
            return stderr.getvalue().strip().splitlines()[-1]
    return None


def test_commands_found() -> None:
    sources = {source.split(":")[0] for source, _ in COMMANDS}
    assert {"Dockerfile.cpu", "Dockerfile.gpu", "compose", "raycluster"} <= sources


@pytest.mark.parametrize(("source", "argv"), COMMANDS, ids=[s for s, _ in COMMANDS])
def test_command_line_parses(source: str, argv: list[str]) -> None:
    assert argv[0] == "rollcast"
    error = _parse_error(argv[1:])
    assert error is None, f"{source}: {shlex.join(argv)}: {error}"
