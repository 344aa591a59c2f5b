"""The Helm chart through the real helm: lint, template, its values schema, every manifest
against the official schemas, RBAC exactly as the operator uses it; then installed into the
emulated cluster with kubectl, its operator started as the chart's Deployment starts it."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as monitoring
from conftest import eventually
from kube_fixtures import TEST_SETTINGS, Cluster, apply, example, k8s_tool, kubectl, running
from luaq.operator import crd, rbac, render
from luaq.operator.main import _parser, settings_from
from luaq.operator.resource import parse_spec
from luaq.operator.settings import DEFAULT_IMAGE, OperatorSettings
from processes import free_port
from test_operator_cli import answers
from test_operator_crd import K8S_VERSION

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "luaq"
README = (ROOT / "README.md").read_text()
RELEASE, NAMESPACE = "luaq", "luaq-system"
Manifest = dict[str, Any]

# namespaced mode, monitoring on, two replicas, and what else a user may change
CUSTOM: dict[str, Any] = {
    "replicaCount": 2,
    "image": {"repository": "registry.example/luaq", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry"}],
    "operator": {
        "watchNamespaces": ["shop", "mail"],
        "workerImage": "registry.example/luaq-workers:1.2.3",
        "logLevel": "debug",
        "resyncSeconds": 30,
        "autoscaleSeconds": 2.5,
    },
    "serviceAccount": {"name": "queue-operator", "annotations": {"team": "queues"}},
    "podAnnotations": {"example.com/scrape": "no"},
    "nodeSelector": {"kubernetes.io/arch": "amd64"},
    "tolerations": [{"key": "queues", "operator": "Exists", "effect": "NoSchedule"}],
    "metrics": {
        "monitor": "ServiceMonitor",
        "interval": "15s",
        "prometheusRule": {"enabled": True},
        "labels": {"release": "kube-prometheus-stack"},
    },
    "dashboard": {"namespace": "monitoring", "annotations": {"grafana_folder": "luaq"}},
}
VALUES: dict[str, dict[str, Any]] = {
    "default": {},
    "custom": CUSTOM,
    "podmonitor": {"metrics": {"monitor": "PodMonitor"}, "rbac": {"create": True}},
}


def helm(
    *args: str, values: Mapping[str, Any] | None = None, release: str = "current"
) -> subprocess.CompletedProcess[str]:
    """The real helm (`release`: which of kube_fixtures.TOOLS_WHEELS), values given as a file
    on its standard input."""
    return subprocess.run(
        [str(k8s_tool("helm", release)), *args, *(["--values", "-"] if values is not None else [])],
        input=yaml.safe_dump(dict(values or {})),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "HELM_CACHE_HOME": str(Path(sys.prefix) / "helm-cache")},
    )


def template(values: Mapping[str, Any], *args: str, release: str = "current") -> str:
    done = helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args,
        values=values, release=release,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@functools.cache
def manifests(case: str) -> list[Manifest]:
    """Everything a case installs: the CRD, the templates and the `helm test` hook."""
    return [doc for doc in yaml.safe_load_all(template(VALUES[case], "--include-crds")) if doc]


def find(docs: Iterable[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [
        doc
        for doc in docs
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]


def one(docs: Iterable[Manifest], kind: str, name: str | None = None) -> Manifest:
    (found,) = find(docs, kind, name)
    return found


def container(deployment_or_pod: Manifest) -> Manifest:
    spec = deployment_or_pod["spec"]
    (only,) = spec.get("template", {}).get("spec", spec)["containers"]
    return dict(only)


def grants(rules: Iterable[Mapping[str, Any]]) -> set[tuple[str, str, str]]:
    """RBAC rules as (API group, resource, verb) triples."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


CASES = pytest.mark.parametrize("case", list(VALUES))


@CASES
def test_helm_lint_passes_strict(case: str) -> None:
    done = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, values=VALUES[case])
    assert done.returncode == 0, done.stdout + done.stderr  # --strict: warnings fail too


@CASES
def test_helm_3_lints_and_renders_what_helm_4_does(case: str) -> None:
    """Many clusters are still managed with Helm 3: the chart must not depend on Helm 4."""
    version = helm("version", "--short", release="helm3")
    assert version.stdout.startswith("v3."), version.stdout + version.stderr
    done = helm(
        "lint", "--strict", str(CHART), "--namespace", NAMESPACE,
        values=VALUES[case], release="helm3",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    helm3 = [doc for doc in yaml.safe_load_all(template(VALUES[case], release="helm3")) if doc]
    assert helm3 == [doc for doc in yaml.safe_load_all(template(VALUES[case])) if doc]

    refused = helm("template", RELEASE, str(CHART), values={"replicaCount": -1}, release="helm3")
    assert refused.returncode != 0
    assert "- replicaCount: Must be greater than or equal to 1" in refused.stderr, refused.stderr


def validate(manifest: Manifest) -> None:
    """Strictly, against the official schemas; the Prometheus Operator's kinds against its
    API, where a field it does not know or a value of the wrong type does not survive the
    round trip."""
    if manifest["apiVersion"] == "monitoring.coreos.com/v1":
        model = getattr(monitoring, manifest["kind"])
        parsed = model.model_validate(manifest)
        assert parsed.model_dump(mode="json", by_alias=True, exclude_unset=True) == manifest
    else:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


@CASES
def test_every_rendered_manifest_passes_strict_validation(case: str) -> None:
    docs = manifests(case)
    for manifest in docs:
        validate(manifest)
    kinds = {doc["kind"] for doc in docs}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "Pod"} <= kinds
    if case == "custom":
        assert {"ServiceMonitor", "PrometheusRule", "Role"} <= kinds
        assert "ClusterRole" not in kinds
    if case == "podmonitor":
        assert "PodMonitor" in kinds


def test_the_validation_catches_what_the_api_would_refuse() -> None:
    monitor = one(manifests("custom"), "ServiceMonitor", "luaq-workers")
    typo = {**monitor, "spec": {**monitor["spec"], "endpoint": monitor["spec"]["endpoints"]}}
    with pytest.raises(AssertionError):
        validate(typo)
    deployment = one(manifests("default"), "Deployment")
    wrong = {**deployment, "spec": {**deployment["spec"], "replica": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong)


def test_the_charts_crd_is_the_generated_one_and_the_same_as_crds() -> None:
    chart_copy = (CHART / "crds" / crd.FILENAME).read_text()
    assert chart_copy == crd.render(), "charts/luaq/crds is stale: run `make crds`"
    assert chart_copy == (ROOT / "crds" / crd.FILENAME).read_text()
    assert [p.name for p in (CHART / "crds").iterdir()] == [crd.FILENAME]


def test_rbac_cluster_wide_is_exactly_what_the_operator_uses() -> None:
    docs = manifests("default")
    deployment = one(docs, "Deployment")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    role = one(docs, "ClusterRole")
    assert grants(role["rules"]) == grants(rbac.RULES)
    leases = one(docs, "Role")
    assert leases["metadata"]["namespace"] == NAMESPACE
    assert grants(leases["rules"]) == grants(rbac.LEASE_RULES)
    bound = {
        (
            binding["roleRef"]["kind"],
            binding["roleRef"]["name"],
            binding["metadata"].get("namespace"),
        )
        for binding in [*find(docs, "ClusterRoleBinding"), *find(docs, "RoleBinding")]
        if binding["subjects"]
        == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    }
    assert bound == {
        ("ClusterRole", role["metadata"]["name"], None),
        ("Role", leases["metadata"]["name"], NAMESPACE),
    }
    assert one(docs, "ServiceAccount")["metadata"]["name"] == account


def test_rbac_namespaced_is_a_role_per_watched_namespace() -> None:
    docs = manifests("custom")
    assert not find(docs, "ClusterRole")
    assert not find(docs, "ClusterRoleBinding")
    roles = {
        (role["metadata"]["namespace"], role["metadata"]["name"]): grants(role["rules"])
        for role in find(docs, "Role")
    }
    watched = CUSTOM["operator"]["watchNamespaces"]
    assert roles == {
        **{(ns, RELEASE): grants(rbac.RULES) for ns in watched},
        (NAMESPACE, f"{RELEASE}-leader-election"): grants(rbac.LEASE_RULES),
    }
    for binding in find(docs, "RoleBinding"):
        key = (binding["metadata"]["namespace"], binding["roleRef"]["name"])
        assert key in roles
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "queue-operator", "namespace": NAMESPACE}
        ]
    assert len(find(docs, "RoleBinding")) == len(roles)


def test_without_rbac_or_service_account_the_chart_uses_what_exists() -> None:
    docs = [
        doc
        for doc in yaml.safe_load_all(
            template(
                {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}}
            )
        )
        if doc
    ]
    kinds = {doc["kind"] for doc in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    assert "ServiceAccount" not in kinds
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    done = helm("template", str(CHART), values={"serviceAccount": {"create": False}})
    assert done.returncode != 0
    assert "serviceAccount.name" in done.stderr


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("default", OperatorSettings(
            image=DEFAULT_IMAGE, lease_name=RELEASE, lease_namespace=NAMESPACE)),
        ("custom", OperatorSettings(
            image="registry.example/luaq-workers:1.2.3", namespaces=("shop", "mail"),
            resync_seconds=30.0, autoscale_seconds=2.5, lease_name=RELEASE,
            lease_namespace=NAMESPACE)),
    ],
)  # fmt: skip
def test_the_operator_runs_with_the_settings_the_values_say(
    case: str, expected: OperatorSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    operator = container(one(manifests(case), "Deployment"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert operator["command"] == ["luaq-operator"]
    assert scripts["luaq-operator"] == "luaq.operator.main:main"
    env = {variable["name"]: variable for variable in operator["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    monkeypatch.setenv("POD_NAME", "luaq-0")
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    for name in list(os.environ):
        if name.startswith("LUAQ_OPERATOR_"):
            monkeypatch.delenv(name)
    settings = settings_from(_parser().parse_args(operator["args"]))
    assert settings == replace(expected, identity="luaq-0")
    ports = {port["name"]: port["containerPort"] for port in operator["ports"]}
    assert ports == {"metrics": settings.metrics_port, "health": 8081}


def test_the_defaults_are_the_operators_and_the_image_is_this_release() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    assert f"{values['image']['repository']}:{chart['appVersion']}" == DEFAULT_IMAGE
    defaults = OperatorSettings()
    assert values["operator"]["resyncSeconds"] == defaults.resync_seconds
    assert values["operator"]["autoscaleSeconds"] == defaults.autoscale_seconds
    assert values["operator"]["metricsPort"] == defaults.metrics_port
    assert values["operator"]["workerMetricsPort"] == defaults.worker_metrics_port


@CASES
def test_the_operator_pod_is_restricted_probed_and_has_a_writable_tmp(case: str) -> None:
    deployment = one(manifests(case), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    operator = container(deployment)
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert operator["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert {"name": "tmp", "mountPath": "/tmp"} in operator["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert operator[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert operator["resources"]["limits"]["memory"]
    assert deployment["spec"]["replicas"] == VALUES[case].get("replicaCount", 1)
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert not selector.items() <= render.labels("any").items()  # never a worker's pods


def worker(case: str) -> tuple[Manifest, Manifest]:
    """The Deployment and Service the operator renders for a QueueConsumer, as this case's
    operator would (its worker metrics port)."""
    owner = {"metadata": {"name": "email-worker", "namespace": "shop", "uid": "u-1"}}
    args = container(one(manifests(case), "Deployment"))["args"]
    settings = settings_from(_parser().parse_args(args))
    body = next(doc for doc in example("email-worker.yaml") if doc["kind"] == "QueueConsumer")
    parsed = parse_spec(body["spec"], crd.spec_schema())
    desired = render.desired(owner, parsed, settings, parsed.source or "", {}, 1)
    return desired.deployment, desired.service


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    return bool(selector["matchLabels"].items() <= labels.items())


def test_the_service_monitors_select_the_operator_and_every_worker() -> None:
    docs = manifests("custom")
    monitors = {doc["metadata"]["name"]: doc["spec"] for doc in find(docs, "ServiceMonitor")}
    assert set(monitors) == {RELEASE, f"{RELEASE}-workers"}
    service = one(docs, "Service")
    operator = monitors[RELEASE]
    assert selects(operator["selector"], service["metadata"]["labels"])
    assert operator["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert {p["port"] for p in operator["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]
    }
    _, worker_service = worker("custom")
    workers = monitors[f"{RELEASE}-workers"]
    assert selects(workers["selector"], worker_service["metadata"]["labels"])
    assert workers["namespaceSelector"] == {"matchNames": ["shop", "mail"]}
    assert [p["port"] for p in workers["endpoints"]] == [worker_service["spec"]["ports"][0]["name"]]
    assert {p["interval"] for spec in monitors.values() for p in spec["endpoints"]} == {"15s"}
    for monitor in find(docs, "ServiceMonitor"):
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_the_pod_monitors_select_the_operator_and_every_worker() -> None:
    docs = manifests("podmonitor")
    monitors = {doc["metadata"]["name"]: doc["spec"] for doc in find(docs, "PodMonitor")}
    operator = one(docs, "Deployment")
    assert selects(
        monitors[RELEASE]["selector"], operator["spec"]["template"]["metadata"]["labels"]
    )
    assert [p["port"] for p in monitors[RELEASE]["podMetricsEndpoints"]] == ["metrics"]
    assert "metrics" in {p["name"] for p in container(operator)["ports"]}
    deployment, _ = worker("podmonitor")
    workers = monitors[f"{RELEASE}-workers"]
    assert selects(workers["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert workers["namespaceSelector"] == {"any": True}
    ports = [p["name"] for p in container(deployment)["ports"]]
    assert [p["port"] for p in workers["podMetricsEndpoints"]] == ports
    assert not find(docs, "ServiceMonitor")
    assert not find(docs, "PrometheusRule")
    assert not find(manifests("default"), "PodMonitor")


def test_the_dashboard_and_the_alert_rules_ship_as_they_are() -> None:
    docs = manifests("custom")
    dashboard = one(docs, "ConfigMap", f"{RELEASE}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "luaq"}
    shipped = (CHART / "dashboards" / "luaq.json").read_text()
    assert json.loads(dashboard["data"]["luaq.json"]) == json.loads(shipped)
    rules = one(docs, "PrometheusRule")
    assert rules["spec"] == yaml.safe_load((CHART / "rules" / "luaq.rules.yaml").read_text())
    assert one(manifests("default"), "ConfigMap")["metadata"]["namespace"] == NAMESPACE
    assert not find(manifests("default"), "PrometheusRule")
    off = template({"dashboard": {"enabled": False}})
    assert "kind: ConfigMap" not in off


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"replicaCount": 0}, "/replicaCount"),
        ({"operator": {"logLevel": "verbose"}}, "/operator/logLevel"),
        ({"operator": {"watchNamespaces": ["Shop_1"]}}, "/operator/watchNamespaces/0"),
        ({"operator": {"metricPort": 9000}}, "'metricPort' not allowed"),
        ({"operator": {"healthPort": 70000}}, "/operator/healthPort"),
        ({"metrics": {"monitor": "servicemonitor"}}, "/metrics/monitor"),
        ({"metrics": {"interval": "30"}}, "/metrics/interval"),
        ({"image": {"repository": ""}}, "/image/repository"),
        ({"nodeSelector": {"disk": 1}}, "/nodeSelector/disk"),
    ],
)
def test_the_values_schema_refuses_a_bad_value_naming_it(
    values: dict[str, Any], named: str
) -> None:
    done = helm("template", RELEASE, str(CHART), values=values)
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr
    assert named in done.stderr, done.stderr


def test_the_same_port_for_metrics_and_health_is_refused() -> None:
    done = helm("template", str(CHART), values={"operator": {"metricsPort": 8081}})
    assert done.returncode != 0
    assert "operator.metricsPort and operator.healthPort" in done.stderr


# -- installed into the emulated cluster --------------------------------------------------------

INSTALL = f"helm install {RELEASE} charts/luaq --namespace {NAMESPACE} --create-namespace"
APPLY_EXAMPLES = "kubectl apply --namespace shop -f examples/k8s/"
LIST = "kubectl get qc --namespace shop"
EXPORT_DASHBOARD = (
    f"kubectl get configmap {RELEASE}-dashboard --namespace {NAMESPACE}"
    " -o jsonpath='{.data.luaq\\.json}' > luaq.json"
)


DELETE_ALL = "kubectl delete qc --all --all-namespaces"
UNFINALIZE = (
    'kubectl patch qc NAME --namespace NS --type merge -p \'{"metadata":{"finalizers":null}}\''
)


def test_the_readme_shows_the_commands_these_tests_run() -> None:
    for command in (
        INSTALL, APPLY_EXAMPLES, LIST, EXPORT_DASHBOARD, f"helm test {RELEASE}", DELETE_ALL,
        UNFINALIZE,
    ):  # fmt: skip
        assert command in README, command


def readme_helm_commands() -> list[list[str]]:
    """Every `helm install` and `helm upgrade` of the README, as arguments."""
    joined = README.replace("\\\n", " ")
    return [
        shlex.split(line.strip())[1:]
        for line in joined.splitlines()
        if line.strip().startswith(("helm install ", "helm upgrade "))
    ]


def test_every_helm_install_and_upgrade_of_the_readme_renders() -> None:
    """Their values exist and pass the schema: each, rendered as `helm template`."""
    commands = readme_helm_commands()
    assert len(commands) >= 3
    for args in commands:
        kept = [arg for arg in args[1:] if arg not in ("--create-namespace", "--reuse-values")]
        done = helm("template", *kept)
        assert done.returncode == 0, f"{args}: {done.stderr}"


def notes(values: Mapping[str, Any]) -> str:
    """NOTES.txt as `helm install` prints it (a client-side dry run: no cluster)."""
    done = helm(*INSTALL.split()[1:], "--dry-run=client", values=values)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("NOTES:\n", 1)[1]


def notes_commands(text: str) -> str:
    """Step 2 of NOTES.txt, the commands that apply a first QueueConsumer, as a shell script
    (for the emulated API server, which serves no OpenAPI document: --validate=false)."""
    step = text.split("\n2. ", 1)[1].split("\n3. ", 1)[0]
    lines = [line[5:] for line in step.splitlines() if line.startswith("     ")]
    script = "\n".join(lines) + "\n"
    return script.replace("kubectl apply ", "kubectl apply --validate=false ")


@asynccontextmanager
async def operator_pods(
    cluster: Cluster, deployment: Manifest, replicas: int, logs: Path
) -> AsyncIterator[list[str]]:
    """The Deployment's operator container run as processes, as its pods would run it: the
    same command and arguments, the downward API's environment, the cluster's API server."""
    operator = container(deployment)
    fields = {"metadata.namespace": NAMESPACE}
    names = [f"{RELEASE}-{index}" for index in range(replicas)]
    processes = []
    for name in names:
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        for variable in operator["env"]:
            path = variable["valueFrom"]["fieldRef"]["fieldPath"]
            env[variable["name"]] = {**fields, "metadata.name": name}[path]
        processes.append(
            await asyncio.create_subprocess_exec(
                *operator["command"],
                *operator["args"],
                env=env,
                stdout=(logs / f"{name}.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
    try:
        yield names
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            assert await asyncio.wait_for(process.wait(), 60) == 0


def probe_url(deployment: Manifest, probe: str) -> str:
    operator = container(deployment)
    get = operator[probe]["httpGet"]
    ports = {port["name"]: port["containerPort"] for port in operator["ports"]}
    return f"http://127.0.0.1:{ports[get['port']]}{get['path']}"


async def shell(
    cluster: Cluster, kubectl_binary: Path, script: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Commands as a user types them, kubectl on PATH, against the emulated cluster."""
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    env["PATH"] = f"{kubectl_binary.parent}{os.pathsep}{env['PATH']}"
    done = await asyncio.to_thread(
        subprocess.run, ["bash", "-euc", script], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, f"{script}\n{done.stderr}"
    return done


async def run_hook(hook: Manifest) -> subprocess.CompletedProcess[str]:
    """The `helm test` Pod's command, its Service's name resolved to this machine."""
    check = container(hook)
    args = [re.sub(r"^http://[^:/]+", "http://127.0.0.1", arg) for arg in check["args"]]
    command = [sys.executable if part == "python" else part for part in check["command"]]
    return await asyncio.to_thread(
        subprocess.run, [*command, *args], capture_output=True, text=True, timeout=60
    )


IMAGE = "registry.example/luaq:test"


@pytest.mark.parametrize(
    "values",
    [{}, {"replicaCount": 2, "operator": {"watchNamespaces": ["default", "shop"]}}],
    ids=["cluster-wide", "namespaced-two-replicas"],
)
async def test_the_installed_chart_runs_the_examples(
    cluster: Cluster, kubectl_binary: Path, values: dict[str, Any], tmp_path: Path
) -> None:
    ports = {"healthPort": free_port(), "metricsPort": free_port()}
    values = {**values, "operator": {**values.get("operator", {}), **ports, "workerImage": IMAGE}}
    rendered = template(values, "--skip-tests")
    applied = await kubectl(
        kubectl_binary, cluster, "apply", "--validate=false", "-f", "-", stdin=rendered,
    )  # fmt: skip
    assert f"deployment.apps/{RELEASE} created" in applied
    deployment = cluster.get("deployments", NAMESPACE, RELEASE)
    assert deployment is not None
    replicas = deployment["spec"]["replicas"]
    async with operator_pods(cluster, deployment, replicas, tmp_path) as pods:
        for probe in ("livenessProbe", "readinessProbe"):
            await eventually(lambda p=probe: answers(probe_url(deployment, p)), 20)
        await kubectl(kubectl_binary, cluster, *APPLY_EXAMPLES.split()[1:], "--validate=false")
        for name in ("email-worker", "receipt-worker"):
            await eventually(lambda n=name: cluster.get("deployments", "shop", n) is not None, 20)
            workers = cluster.get("deployments", "shop", name)
            assert container(workers)["image"] == IMAGE
        listed = await kubectl(kubectl_binary, cluster, *LIST.split()[1:])
        assert "email-worker" in listed
        assert "receipt-worker" in listed

        lease = cluster.get("leases", NAMESPACE, RELEASE)
        assert lease is not None
        assert lease["spec"]["holderIdentity"] in pods

        hook = yaml.safe_load(
            template(values, "--show-only", "templates/tests/test-connection.yaml")
        )
        assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
        checked = await run_hook(hook)
        assert checked.returncode == 0, checked.stderr

        cluster_wide = set()
        for role in cluster.emulator.read_all("clusterroles"):
            cluster_wide |= grants(role["rules"])
        for namespace, *permission in cluster.scoped_permissions():
            granted = cluster_wide | {
                grant
                for role in (cluster.emulator.read_all("roles", namespace) if namespace else [])
                for grant in grants(role["rules"])
            }
            assert tuple(permission) in granted, f"{permission} in {namespace or 'all'}"

        done = await shell(cluster, kubectl_binary, notes_commands(notes(values)))
        assert "hello-worker" in done.stdout
        first = (values["operator"].get("watchNamespaces") or ["default"])[0]
        await eventually(lambda: cluster.get("deployments", first, "hello-worker") is not None, 20)


async def test_queueconsumers_go_with_the_operator_running_and_need_a_hand_without(
    cluster: Cluster, kubectl_binary: Path, ns: str
) -> None:
    """The uninstall order the README and NOTES.txt give, and their command for a
    QueueConsumer deleted after the operator."""
    async with running(TEST_SETTINGS):
        await apply(cluster, ns, "broker-secret.yaml", "email-worker.yaml")
        await eventually(lambda: cluster.get("deployments", ns, "email-worker") is not None, 20)
        await kubectl(kubectl_binary, cluster, *shlex.split(DELETE_ALL)[1:])  # waits until gone
        assert cluster.get("queueconsumers", ns, "email-worker") is None
        await apply(cluster, ns, "email-worker.yaml")
        await eventually(lambda: cluster.get("deployments", ns, "email-worker") is not None, 20)
    await kubectl(kubectl_binary, cluster, "delete", "qc", "email-worker", "-n", ns, "--wait=false")
    held = cluster.get("queueconsumers", ns, "email-worker")
    assert held is not None
    assert held["metadata"]["deletionTimestamp"]
    assert held["metadata"]["finalizers"]
    unfinalize = shlex.split(UNFINALIZE.replace("NAME", "email-worker").replace("NS", ns))
    await kubectl(kubectl_binary, cluster, *unfinalize[1:])
    await eventually(lambda: cluster.get("queueconsumers", ns, "email-worker") is None, 10)


async def test_the_hook_fails_when_the_operator_does_not_answer() -> None:
    hook = yaml.safe_load(
        template(
            {"operator": {"healthPort": free_port(), "metricsPort": free_port()}},
            "--show-only",
            "templates/tests/test-connection.yaml",
        )
    )
    checked = await run_hook(hook)
    assert checked.returncode != 0
    assert "Connection refused" in checked.stderr


async def test_the_exported_dashboard_is_the_shipped_one(
    cluster: Cluster, kubectl_binary: Path, tmp_path: Path
) -> None:
    await kubectl(
        kubectl_binary, cluster, "apply", "--validate=false", "-f", "-",
        stdin=template({}, "--show-only", "templates/dashboard.yaml"),
    )  # fmt: skip
    await shell(cluster, kubectl_binary, EXPORT_DASHBOARD, cwd=tmp_path)
    exported = json.loads((tmp_path / "luaq.json").read_text())
    assert exported == json.loads((CHART / "dashboards" / "luaq.json").read_text())
