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
from luaq.operator.resource import QUANTITY, parse_spec
from luaq.operator.settings import DEFAULT_IMAGE, OperatorSettings, Policy
from processes import free_port
from test_operator_cli import answers
from test_operator_crd import K8S_VERSION

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "luaq"
README = (ROOT / "README.md").read_text()
RELEASE, NAMESPACE = "luaq", "luaq-system"
Manifest = dict[str, Any]

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
# namespaced mode, monitoring on, two replicas, an admin's policy, and what else a user may
# change
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
        "checkConcurrency": 4,
        "policy": {
            "allowedImages": ["registry.example/luaq-workers:*", "registry.example/luaq:1.[0-9]*"],
            "allowedServiceAccounts": ["queue-*", "default"],
            "secretEnv": False,
            "maxReplicas": 20,
            "maxProcesses": 8,
            "maxCpu": "2",
            "maxMemory": "4Gi",
        },
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
        assert not find(docs, "ClusterRole", RELEASE)  # only the aggregated ones
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
    role = one(docs, "ClusterRole", RELEASE)
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
    assert {role["metadata"]["name"] for role in find(docs, "ClusterRole")} == set(AGGREGATED)
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


QC, STATUS, SCALE = "queueconsumers", "queueconsumers/status", "queueconsumers/scale"
READ = {"get", "list", "watch"}
WRITE = {"create", "update", "patch", "delete", "deletecollection"}
AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"
# The aggregated ClusterRoles: what each grants, and to which of Kubernetes' roles.
AGGREGATED = {
    f"{RELEASE}-view": (
        {("luaq.dev", resource, verb) for resource in (QC, STATUS) for verb in READ},
        {"view"},
    ),
    f"{RELEASE}-edit": (
        {("luaq.dev", QC, verb) for verb in READ | WRITE}
        | {("luaq.dev", STATUS, verb) for verb in READ}
        | {("luaq.dev", SCALE, verb) for verb in ("get", "update", "patch")},
        {"edit", "admin"},
    ),
}


@pytest.mark.parametrize("case", ["default", "custom"])
def test_queueconsumers_join_the_view_edit_and_admin_roles(case: str) -> None:
    """As cert-manager's do: view reads QueueConsumers, edit and admin also write and scale
    them, never their status (the operator's); bound to nobody, aggregated by label."""
    docs = manifests(case)
    roles = {
        role["metadata"]["name"]: role
        for role in find(docs, "ClusterRole")
        if role["metadata"]["name"] in AGGREGATED
    }
    assert roles.keys() == AGGREGATED.keys()
    for name, (granted, aggregated_to) in AGGREGATED.items():
        role = roles[name]
        validate(role)
        assert grants(role["rules"]) == granted, name
        labels = role["metadata"]["labels"]
        assert {key.removeprefix(AGGREGATE) for key in labels if key.startswith(AGGREGATE)} == (
            aggregated_to
        )
        assert all(labels[AGGREGATE + to] == "true" for to in aggregated_to)
        assert "aggregationRule" not in role
    assert grants(roles[f"{RELEASE}-view"]["rules"]) < grants(roles[f"{RELEASE}-edit"]["rules"])
    bound = {
        b["roleRef"]["name"]
        for b in [*find(docs, "ClusterRoleBinding"), *find(docs, "RoleBinding")]
    }
    assert not bound & AGGREGATED.keys()
    # verbs the API server knows: a typo would grant nothing
    assert {verb for role in roles.values() for *_, verb in grants(role["rules"])} <= READ | WRITE


@pytest.mark.parametrize(
    "values",
    [{"rbac": {"aggregateClusterRoles": False}}, {"rbac": {"create": False}}],
    ids=["disabled", "no-rbac"],
)
def test_the_aggregated_roles_are_left_out_when_disabled(values: dict[str, Any]) -> None:
    docs = [doc for doc in yaml.safe_load_all(template(values)) if doc]
    names = {doc["metadata"]["name"] for doc in find(docs, "ClusterRole")}
    assert not names & AGGREGATED.keys()
    if values["rbac"].get("create", True):
        assert names == {RELEASE}  # the operator's own stays


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
            lease_namespace=NAMESPACE, check_concurrency=4, policy=Policy(
                images=("registry.example/luaq-workers:*", "registry.example/luaq:1.[0-9]*"),
                service_accounts=("queue-*", "default"), secret_env=False, max_replicas=20,
                max_processes=8, max_cpu="2", max_memory="4Gi"))),
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


def operator_settings(
    values: Mapping[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    *args: str,
    release: str = "current",
) -> OperatorSettings:
    """The settings the chart's operator runs with, its arguments parsed by its own parser
    (no LUAQ_OPERATOR_* from this environment)."""
    for name in list(os.environ):
        if name.startswith("LUAQ_OPERATOR_"):
            monkeypatch.delenv(name)
    rendered = template(values, "--show-only", "templates/deployment.yaml", *args, release=release)
    return settings_from(_parser().parse_args(container(yaml.safe_load(rendered))["args"]))


@pytest.mark.parametrize("release", ["current", "helm3"])
@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({}, Policy()),
        ({"allowedImages": ["registry.example/*"]}, Policy(images=("registry.example/*",))),
        (
            {"allowedServiceAccounts": ["mail-*", "shop-[ab]?", "default"]},
            Policy(service_accounts=("mail-*", "shop-[ab]?", "default")),
        ),
        ({"secretEnv": False}, Policy(secret_env=False)),
        ({"maxReplicas": 1, "maxProcesses": 1}, Policy(max_replicas=1, max_processes=1)),
        ({"maxCpu": "500m", "maxMemory": "512Mi"}, Policy(max_cpu="500m", max_memory="512Mi")),
        # numbers, as `--set operator.policy.maxCpu=2` gives: cpus and bytes
        ({"maxCpu": 2, "maxMemory": 1073741824}, Policy(max_cpu="2", max_memory="1073741824")),
        ({"maxCpu": 0.5, "maxMemory": 1e20}, Policy(max_cpu="0.5", max_memory="1e+20")),
    ],
)  # fmt: skip
def test_the_policy_values_are_the_operators_policy(
    policy: dict[str, Any], expected: Policy, release: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = operator_settings({"operator": {"policy": policy}}, monkeypatch, release=release)
    assert settings.policy == expected


SET_POLICY = (
    "--set 'operator.policy.allowedImages={registry.example/luaq:*}'"
    " --set 'operator.policy.allowedServiceAccounts={queue-*}'"
    " --set operator.policy.secretEnv=false --set operator.policy.maxReplicas=50"
    " --set operator.policy.maxCpu=2 --set operator.policy.maxMemory=4Gi"
    " --set operator.checkConcurrency=4"
)


@pytest.mark.parametrize("release", ["current", "helm3"])
def test_the_policy_may_be_set_with_set(release: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--set`: lists as {a,b}, booleans and numbers as helm parses them (maxCpu=2 a number)."""
    settings = operator_settings({}, monkeypatch, *shlex.split(SET_POLICY), release=release)
    assert settings.policy == Policy(
        images=("registry.example/luaq:*",), service_accounts=("queue-*",), secret_env=False,
        max_replicas=50, max_cpu="2", max_memory="4Gi",
    )  # fmt: skip
    assert settings.check_concurrency == 4


@pytest.mark.parametrize("release", ["current", "helm3"])
def test_values_from_before_the_policy_run_the_operators_defaults(
    release: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`helm upgrade --reuse-values` keeps an older release's values, without these (null
    removes a value, as they lack it): the flags are left out, never given empty."""
    older = {"operator": {"policy": None, "checkConcurrency": None}}
    settings = operator_settings(older, monkeypatch, release=release)
    assert settings.policy == Policy()
    assert settings.check_concurrency == OperatorSettings.check_concurrency
    partial = {"operator": {"policy": {"secretEnv": None, "maxCpu": None}}}
    assert operator_settings(partial, monkeypatch, release=release).policy == Policy()
    older_rbac = template({"rbac": {"aggregateClusterRoles": None}})
    docs = [doc for doc in yaml.safe_load_all(older_rbac) if doc]
    assert {doc["metadata"]["name"] for doc in find(docs, "ClusterRole")} == {RELEASE}


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
    assert values["operator"]["checkConcurrency"] == defaults.check_concurrency
    policy = values["operator"]["policy"]
    assert (
        Policy(
            images=tuple(policy["allowedImages"]) or ("*",),
            service_accounts=tuple(policy["allowedServiceAccounts"]) or ("*",),
            secret_env=policy["secretEnv"],
            max_replicas=policy["maxReplicas"],
            max_processes=policy["maxProcesses"],
            max_cpu=policy["maxCpu"] or None,
            max_memory=policy["maxMemory"] or None,
        )
        == defaults.policy
    )


def test_the_schemas_bounds_are_the_crds_and_its_quantities_the_operators() -> None:
    """maxReplicas and maxProcesses at most what a QueueConsumer may ask for at all; a
    quantity the schema takes is one the operator takes, and not below zero."""
    policy = SCHEMA["properties"]["operator"]["properties"]["policy"]["properties"]
    spec = crd.spec_schema()["properties"]
    assert policy["maxReplicas"]["maximum"] == spec["replicas"]["maximum"]
    assert policy["maxProcesses"]["maximum"] == spec["processes"]["maximum"]
    assert policy["maxReplicas"]["minimum"] == policy["maxProcesses"]["minimum"] == 1
    pattern = re.compile(policy["maxCpu"]["pattern"])
    assert policy["maxMemory"]["pattern"] == pattern.pattern
    for text in ["2", "500m", "1.5", ".5", "4Gi", "512Mi", "1e3", "1E+09", "128k", "3.",
                 "", "2 cores", "1GB", "1ki", "-1", "+1", "1e", "Gi", "0x10", "1.5.2"]:  # fmt: skip
        expected = text == "" or (bool(QUANTITY.match(text)) and text[0] not in "+-")
        assert bool(pattern.match(text)) == expected, text


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
        ({"rbac": {"aggregateClusterRoles": "yes"}}, "/rbac/aggregateClusterRoles"),
    ],
)
def test_the_values_schema_refuses_a_bad_value_naming_it(
    values: dict[str, Any], named: str
) -> None:
    done = helm("template", RELEASE, str(CHART), values=values)
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr
    assert named in done.stderr, done.stderr


@pytest.mark.parametrize("release", ["current", "helm3"])
@pytest.mark.parametrize(
    ("values", "path", "shown"),
    [
        ({"policy": {"maxCpu": "2 cores"}}, "policy/maxCpu", "'2 cores'"),
        ({"policy": {"maxCpu": "-1"}}, "policy/maxCpu", "'-1'"),
        ({"policy": {"maxMemory": "4GB"}}, "policy/maxMemory", "'4GB'"),
        ({"policy": {"maxMemory": 0}}, "policy/maxMemory", "got 0"),
        ({"policy": {"maxReplicas": 0}}, "policy/maxReplicas", "got 0"),
        ({"policy": {"maxReplicas": 5000}}, "policy/maxReplicas", "got 5,000"),
        ({"policy": {"maxProcesses": 0}}, "policy/maxProcesses", "got 0"),
        ({"policy": {"maxProcesses": "8"}}, "policy/maxProcesses", "got string"),
        ({"policy": {"secretEnv": "no"}}, "policy/secretEnv", "got string"),
        ({"policy": {"allowedImages": "registry.example/*"}}, "policy/allowedImages", "got string"),
        ({"policy": {"allowedImages": ["registry.example/luaq :*"]}}, "policy/allowedImages/0",
         "'registry.example/luaq :*'"),
        ({"policy": {"allowedServiceAccounts": ["Queue_Ops"]}}, "policy/allowedServiceAccounts/0",
         "'Queue_Ops'"),
        ({"policy": {"maxCPU": "2"}}, "policy", "'maxCPU' not allowed"),
        ({"checkConcurrency": 0}, "checkConcurrency", "got 0"),
    ],
)  # fmt: skip
def test_the_values_schema_refuses_a_bad_policy_naming_it(
    values: dict[str, Any], path: str, shown: str, release: str
) -> None:
    """Helm 4 names the value by its JSON pointer and shows it; Helm 3 names it dotted."""
    done = helm("template", RELEASE, str(CHART), values={"operator": values}, release=release)
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr
    if release == "helm3":
        assert f"- operator.{path.replace('/', '.')}: " in done.stderr, done.stderr
    else:
        assert f"- at '/operator/{path}': " in done.stderr, done.stderr
        assert shown in done.stderr, done.stderr


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


def values_table() -> str:
    """The README's table of the chart's values."""
    return README.split("**The chart's values**", 1)[1].split("\n\n", 2)[1]


def test_the_readme_table_names_every_operator_and_rbac_value_and_its_sets_render() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    named = set(re.findall(r"`([\w.]+)`", values_table()))
    paths = (
        [f"operator.{key}" for key in values["operator"] if key != "policy"]
        + [f"operator.policy.{key}" for key in values["operator"]["policy"]]
        + [f"rbac.{key}" for key in values["rbac"]]
    )
    assert [path for path in paths if path not in named] == []
    sets = re.findall(r"`(--set '[^`]+')`", values_table())
    assert len(sets) >= 2
    for option in sets:
        template({}, *shlex.split(option))


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


def operator_grants(
    cluster: Cluster, deployment: Manifest, namespace: str | None
) -> set[tuple[str, str, str]]:
    """What the operator's service account may do in `namespace` (None: across all), by the
    roles bound to it: not by every role there is (the aggregated ones grant nobody)."""
    account = {
        "kind": "ServiceAccount",
        "name": deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "namespace": NAMESPACE,
    }
    bindings = [
        binding
        for binding in [
            *cluster.emulator.read_all("clusterrolebindings"),
            *(cluster.emulator.read_all("rolebindings", namespace) if namespace else []),
        ]
        if account in binding["subjects"]
    ]
    granted = set()
    for binding in bindings:
        ref = binding["roleRef"]
        role = (
            cluster.emulator.read("clusterroles", None, ref["name"])
            if ref["kind"] == "ClusterRole"
            else cluster.get("roles", binding["metadata"]["namespace"], ref["name"])
        )
        assert role is not None, ref
        granted |= grants(role["rules"])
    return granted


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

        for namespace, *permission in cluster.scoped_permissions():
            granted = operator_grants(cluster, deployment, namespace)
            assert tuple(permission) in granted, f"{permission} in {namespace or 'all'}"

        done = await shell(cluster, kubectl_binary, notes_commands(notes(values)))
        assert "hello-worker" in done.stdout
        first = (values["operator"].get("watchNamespaces") or ["default"])[0]
        await eventually(lambda: cluster.get("deployments", first, "hello-worker") is not None, 20)


async def test_the_installed_operator_holds_queueconsumers_to_the_values_policy(
    cluster: Cluster, kubectl_binary: Path, tmp_path: Path
) -> None:
    """The policy reaches the running operator: within it, the email worker runs; the receipt
    worker, autoscaled up to 5 replicas, asks for more than the 2 allowed and gets nothing."""
    values = {
        "operator": {
            "healthPort": free_port(),
            "metricsPort": free_port(),
            "workerImage": IMAGE,
            "policy": {"allowedImages": ["registry.example/*"], "maxReplicas": 2},
        }
    }
    await kubectl(
        kubectl_binary, cluster, "apply", "--validate=false", "-f", "-",
        stdin=template(values, "--skip-tests"),
    )  # fmt: skip
    deployment = cluster.get("deployments", NAMESPACE, RELEASE)
    assert deployment is not None
    async with operator_pods(cluster, deployment, 1, tmp_path):
        await kubectl(kubectl_binary, cluster, *APPLY_EXAMPLES.split()[1:], "--validate=false")
        await eventually(lambda: cluster.get("deployments", "shop", "email-worker") is not None, 20)

        def refused() -> dict[str, Any]:
            body = cluster.get("queueconsumers", "shop", "receipt-worker") or {}
            conditions = (body.get("status") or {}).get("conditions") or []
            found = [c for c in conditions if c["type"] == "Degraded" and c["status"] == "True"]
            return found[0] if found else {}

        await eventually(lambda: bool(refused()), 20)
        assert refused()["reason"] == "NotAllowed"
        assert "spec.replicas: 5 is over the allowed 2" in refused()["message"]
        assert cluster.get("deployments", "shop", "receipt-worker") is None


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
