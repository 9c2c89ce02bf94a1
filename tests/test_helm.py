"""The Helm chart, rendered by the real helm and checked against the Kubernetes 1.31 schemas.

``scripts/install-helm`` (run by scripts/test) puts helm 3.17 into ``.tools/bin``; the schemas
come offline from the ``kubernetes-validate`` package, pinned to kubectl's 1.31. Every rendered
gateway config goes through the real ``mirror-gateway check-config``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from geoworld import GeoDBs
from processes import REPO

CHART = REPO / "helm" / "mirror-gateway"
HELM = REPO / ".tools" / "bin" / "helm"
KUBERNETES_VERSION = "1.31.0"
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
#: Where the chart mounts the GeoIP volume the updater CronJob keeps fresh.
GEOIP_VOLUME = "/var/lib/mirror-gateway/geoip"
#: What the pod gets on top of the drain window and the graceful stop before SIGKILL.
STOP_MARGIN_S = 5

Manifest = dict[str, Any]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        pytest.fail(
            f"{HELM} is missing; run scripts/install-helm (scripts/test does)", pytrace=False
        )
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=60, check=False
    )


def render(*args: str) -> list[Manifest]:
    result = helm("template", "gw", str(CHART), "--namespace", "mirror", *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[Manifest], kind: str) -> Manifest:
    found = by_kind(manifests, kind)
    assert len(found) == 1, f"{len(found)} {kind}s rendered"
    return found[0]


def gateway_container(manifests: list[Manifest]) -> Manifest:
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container


def gateway_config(manifests: list[Manifest]) -> dict[str, Any]:
    configmap = next(m for m in by_kind(manifests, "ConfigMap") if "gateway.yaml" in m["data"])
    config = yaml.safe_load(configmap["data"]["gateway.yaml"])
    assert isinstance(config, dict)
    return config


def values_of(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text())
    assert isinstance(values, dict)
    return values


def check_service_monitor(monitor: Manifest, manifests: list[Manifest]) -> None:
    """A CRD the Kubernetes schemas do not know: check it selects our Service and its port."""
    service = one(manifests, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    ports = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports
        assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("values", [None, *VALUES_FILES], ids=lambda p: p.name if p else "default")
def test_chart_lints_renders_and_validates(
    values: Path | None, tmp_path: Path, geo_dbs: GeoDBs
) -> None:
    args = ["-f", str(values)] if values else []
    lint = helm("lint", str(CHART), "--strict", *args)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    manifests = render(*args)
    for manifest in manifests:
        if manifest["kind"] == "ServiceMonitor":
            check_service_monitor(manifest, manifests)
            continue
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            name = f"{manifest['kind']}/{manifest['metadata']['name']}"
            pytest.fail(f"{name}: {exc.message} at {list(exc.path)}")

    # The gateway config the pods read passes the real CLI's validation, which opens the GeoIP
    # databases: those the pod finds on its volume are real mmdb files here too.
    config = gateway_config(manifests)
    pod_files = {"city_db": geo_dbs.city, "asn_db": geo_dbs.asn}
    for key, local in pod_files.items():
        if key in config.get("geoip", {}):
            assert config["geoip"][key].startswith(GEOIP_VOLUME + "/")
            config["geoip"][key] = str(local)
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(config))
    check = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(config_file)],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert ": OK (" in check.stdout


def test_default_deployment_is_non_root_read_only_probed_and_drained() -> None:
    manifests = render()
    deployment = one(manifests, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = gateway_container(manifests)
    values = values_of(CHART / "values.yaml")

    assert container["image"] == f"mirror-gateway:{chart_app_version()}"
    assert container["args"] == [
        "serve", "--config", "/etc/mirror-gateway/gateway.yaml",
        "--workers", str(values["workers"]),
    ]  # fmt: skip
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["terminationGracePeriodSeconds"] == (
        values["drainSeconds"] + values["gracefulStopSeconds"] + STOP_MARGIN_S
    )
    env = {e["name"]: e for e in container["env"]}
    secret = one(manifests, "Secret")
    assert env["MIRROR_GATEWAY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "token",
    }
    config = gateway_config(manifests)
    assert config["server"] == {"host": "0.0.0.0", "port": 8080, "drain_s": values["drainSeconds"]}
    assert "admin" not in config, "the admin token must not land in a ConfigMap"
    assert {"PodDisruptionBudget", "Service", "ConfigMap"} <= {m["kind"] for m in manifests}
    assert not by_kind(manifests, "HorizontalPodAutoscaler")
    assert not by_kind(manifests, "Ingress")


def test_a_config_change_rolls_the_pods() -> None:
    def checksum(*args: str) -> str:
        deployment = one(render(*args), "Deployment")
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum() == checksum()
    assert checksum() != checksum("--set", "config.upstream.url=https://hub.example.org")


def test_connection_limits_reach_the_gateway_config() -> None:
    keys = {"header_timeout_s": 5, "body_timeout_s": 30, "keepalive_timeout_s": 65,
            "max_connections": 20000, "max_connections_per_ip": 64}  # fmt: skip
    args = [arg for key, value in keys.items() for arg in ("--set", f"config.server.{key}={value}")]
    server = gateway_config(render(*args))["server"]
    assert {key: server[key] for key in keys} == keys


def test_drain_window_sets_the_termination_grace_period() -> None:
    manifests = render("--set", "drainSeconds=12", "--set", "gracefulStopSeconds=30")
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 12 + 30 + STOP_MARGIN_S


def test_sentinel_values_reach_the_gateway_config_and_secrets_the_environment() -> None:
    manifests = render("-f", str(CHART / "ci" / "sentinel-values.yaml"))
    config = gateway_config(manifests)
    assert config["redis"] == {
        "key_prefix": "mg:",
        "sentinel": {
            "master_name": "mirror-gateway",
            "addresses": [f"redis-sentinel-{i}.redis-sentinel:26379" for i in range(3)],
            "db": 0,
            "tls": True,
            "tls_ca_file": "/etc/mirror-gateway/redis-ca/ca.crt",
        },
    }
    container = gateway_container(manifests)
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["MIRROR_GATEWAY_REDIS_PASSWORD"]["name"] == "redis-auth"
    assert env["MIRROR_GATEWAY_REDIS_SENTINEL_PASSWORD"]["key"] == "sentinel-password"
    assert container["args"][-1] == "4"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["redis-ca"] == "/etc/mirror-gateway/redis-ca"


def test_ingress_hpa_and_service_monitor() -> None:
    manifests = render("-f", str(CHART / "ci" / "ingress-hpa-values.yaml"))
    assert "replicas" not in one(manifests, "Deployment")["spec"], "the HPA owns replicas"
    hpa = one(manifests, "HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 12)
    rule = one(manifests, "Ingress")["spec"]["rules"][0]
    assert rule["host"] == "hf-mirror.example.org"
    assert rule["http"]["paths"][0]["backend"]["service"]["port"] == {"name": "http"}

    manifests = render("-f", str(CHART / "ci" / "servicemonitor-values.yaml"))
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    config = gateway_config(manifests)
    assert config["metrics"] == {"enabled": True, "host": "0.0.0.0", "port": 9200}
    assert config["geoip"] == {
        "city_db": "/var/lib/mirror-gateway/geoip/GeoLite2-City.mmdb",
        "asn_db": "/var/lib/mirror-gateway/geoip/GeoLite2-ASN.mmdb",
    }
    (updater,) = by_kind(manifests, "CronJob")
    job = updater["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == [
        "/opt/mirror-gateway/geodata/update_geoip.sh", "maxmind", "/var/lib/mirror-gateway/geoip",
    ]  # fmt: skip
    assert job["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "maxmind", "key": "license-key"}


def test_node_agent_cron_jobs_run_the_node_cli() -> None:
    manifests = render("-f", str(CHART / "ci" / "node-agent-values.yaml"))
    jobs = {
        job["metadata"]["name"]: job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        for job in by_kind(manifests, "CronJob")
    }
    sync = jobs["gw-mirror-gateway-node-sync"]["containers"][0]
    verify = jobs["gw-mirror-gateway-node-verify"]["containers"][0]
    assert sync["args"] == ["node", "sync", "--config", "/etc/mirror-node/node.yaml", "--once"]
    assert verify["args"] == ["node", "verify", "--root", "/srv/mirror", "--share", "0.1"]
    node_config = next(m for m in by_kind(manifests, "ConfigMap") if "node.yaml" in m["data"])
    assert yaml.safe_load(node_config["data"]["node.yaml"]) == {
        "root": "/srv/mirror",
        "token_file": "/etc/mirror-node/token/token",
        "upstream": "https://huggingface.co",
        "repos": ["openai-community/gpt2", "datasets/stanfordnlp/imdb"],
    }
    claim = one(manifests, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Ti"
    mounts = {m["name"]: m["mountPath"] for m in sync["volumeMounts"]}
    assert mounts["data"] == "/srv/mirror"


def test_existing_secret_is_used_not_created() -> None:
    manifests = render("-f", str(CHART / "ci" / "existing-secret-values.yaml"))
    assert not by_kind(manifests, "Secret")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in gateway_container(manifests)["env"]}
    assert env["MIRROR_GATEWAY_ADMIN_TOKEN"] == {"name": "gateway-admin", "key": "admin-token"}
    assert env["MIRROR_GATEWAY_REDIS_PASSWORD"]["key"] == "redis-password"
    assert gateway_container(manifests)["image"] == "registry.example.org/mirror-gateway:0.1.0-1"


BAD_VALUES = [
    (["--set", "workers=0"], "workers"),
    (["--set", "replicaCount=-1"], "replicaCount"),
    (["--set", "redis.sentinel.enabled=true"], "redis.sentinel.addresses"),
    (
        ["--set", "redis.url=redis://r:6379", "--set", "redis.sentinel.enabled=true",
         "--set", "redis.sentinel.addresses={s:26379}"],
        "redis.url",
    ),
    (["--set", "redis.url=http://r"], "redis.url"),
    (
        ["--set", "redis.sentinel.enabled=true", "--set", "redis.sentinel.addresses={sentinel}"],
        "redis.sentinel.addresses.0",
    ),
    (["--set", "image.pullPolicy=Sometimes"], "image.pullPolicy"),
    (["--set", "securityContext.readOnlyRootFilesystem=false"], "readOnlyRootFilesystem"),
    (["--set", "podSecurityContext.runAsNonRoot=false"], "runAsNonRoot"),
    (["--set", "adminToken.value=short"], "adminToken.value"),
    (["--set", "metrics.port=8080"], "metrics.port"),
    (["--set", "nodeAgent.verify.share=2"], "nodeAgent.verify.share"),
    (["--set", "nodeAgent.sync.schedule=often"], "nodeAgent.sync.schedule"),
    (["--set", "geoip.updater.source=ftp"], "geoip.updater.source"),
    (["--set", "config.redis.url=redis://r"], "config"),
    (["--set", "typo=1"], "typo"),
    (["--set", "config.server.header_timeout_s=0"], "config.server.header_timeout_s"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "named"), BAD_VALUES, ids=[n for _, n in BAD_VALUES])
def test_invalid_values_are_refused_by_the_schema(args: list[str], named: str) -> None:
    result = helm("template", "gw", str(CHART), *args)
    assert result.returncode != 0, f"{args} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert named in result.stderr, result.stderr


def test_schema_describes_every_default_value() -> None:
    """Every key in values.yaml has its own schema entry with a description."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        properties = node.get("properties", {})
        for key, value in values.items():
            where = f"{path}.{key}" if path else key
            assert key in properties, f"{where} has no schema"
            entry = properties[key]
            assert entry.get("description"), f"{where} has no description"
            # Closed objects are the chart's own; open ones are Kubernetes or gateway objects
            # passed through (resources, securityContext, config sections).
            if isinstance(value, dict) and entry.get("additionalProperties") is False:
                walk(value, entry, where)

    walk(values_of(CHART / "values.yaml"), schema, "")


def render_notes(tmp_path: Path, *args: str) -> str:
    """NOTES.txt as helm renders it (``helm template`` leaves it out, and ``install --dry-run``
    needs a cluster): in a copy of the chart, as the data of a ConfigMap."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text(
        '{{- define "notes" -}}\n' + notes + "\n{{- end }}\n"
    )
    (chart / "templates" / "notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: |\n    {{- include "notes" . | nindent 4 }}\n'
    )
    result = helm("template", "gw", str(chart), "--show-only", "templates/notes.yaml", *args)
    assert result.returncode == 0, result.stderr
    return str(yaml.safe_load(result.stdout)["data"]["notes"])


def test_notes_say_how_to_check_it_and_warn_without_redis(tmp_path: Path) -> None:
    notes = render_notes(tmp_path)
    assert "rollout status deployment/gw-mirror-gateway" in notes
    assert "/readyz" in notes
    assert "mirror-gateway explain" in notes
    assert "WARNING: several workers or pods but no Redis" in notes
    shared = render_notes(tmp_path / "url", "--set", "redis.url=redis://r:6379/0")
    assert "WARNING" not in shared


def chart_app_version() -> str:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return str(chart["appVersion"])


def test_chart_app_version_is_the_gateway_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart_app_version() == project["version"]
