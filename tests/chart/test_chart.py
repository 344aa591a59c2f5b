"""The Helm chart through the real helm: lint, template, its values schema, every manifest
against the official schemas, RBAC exactly as the operator uses it, its NetworkPolicy against
the traffic the operator needs; then installed into the emulated cluster with kubectl, its
operator started as the chart's Deployment starts it."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import typing
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jsonschema
import kmock
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as monitoring
from conftest import eventually
from kube_emulator import Kind
from kube_fixtures import (
    K8S_VERSION,
    TEST_SETTINGS,
    Cluster,
    apply,
    example,
    k8s_tool,
    kubectl,
    running,
)
from luaq.operator import crd, rbac, render
from luaq.operator.main import _parser, settings_from
from luaq.operator.resource import QUANTITY, parse_spec
from luaq.operator.settings import DEFAULT_IMAGE, OperatorSettings, Policy
from processes import answers, free_port

ROOT = Path(__file__).resolve().parents[2]
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
DIGEST = "sha256:" + "0123456789abcdef" * 4
# what a platform team sets: a mirror and a pinned image, spread, priority, a disruption
# budget, a NetworkPolicy, the operator's own arguments, environment and volumes, extra
# objects, probe timings, and monitors tuned
PLATFORM: dict[str, Any] = {
    "global": {"imageRegistry": "registry.example:5000/mirror"},
    "image": {"digest": DIGEST},
    "replicaCount": 2,
    "priorityClassName": "system-cluster-critical",
    "topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
         "whenUnsatisfiable": "ScheduleAnyway"},
        {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
         "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"team": "q"}}},
    ],
    "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
    "networkPolicy": {
        "enabled": True,
        "apiServer": {"cidrs": ["172.18.0.2/32"]},
        "metrics": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        },
        "kubelet": {"cidrs": ["172.18.0.0/16"]},
        "extraEgress": [
            {"to": [{"ipBlock": {"cidr": "10.1.0.0/16"}}], "ports": [{"port": 4317}]}
        ],
    },
    "extraArgs": ["--log-level=warning", "--resync-seconds=45"],
    "extraEnv": [{"name": "TZ", "value": "UTC"}],
    "volumes": [{"name": "ca", "configMap": {"name": "corporate-ca"}}],
    "volumeMounts": [{"name": "ca", "mountPath": "/etc/ssl/corporate", "readOnly": True}],
    "livenessProbe": {"initialDelaySeconds": 5, "periodSeconds": 20, "timeoutSeconds": 3,
                      "failureThreshold": 6},
    "readinessProbe": {"periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 2,
                       "successThreshold": 1},
    "podLabels": {"team": "q"},
    "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                  "limits": {"memory": "1Gi", "ephemeral-storage": "1Gi"}},
    "metrics": {
        "monitor": "PodMonitor",
        "interval": "1m",
        "scrapeTimeout": "45s",
        "relabelings": [{"sourceLabels": ["__meta_kubernetes_pod_node_name"],
                         "targetLabel": "node", "action": "replace"}],
        "metricRelabelings": [{"sourceLabels": ["__name__"], "regex": "go_.*",
                               "action": "drop"}],
    },
    "extraObjects": [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": '{{ include "luaq.fullname" . }}-extra'},
         "data": {"release": "{{ .Release.Name }}"}},
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {{ .Release.Name }}-templated\n"
        "stringData:\n  namespace: {{ .Release.Namespace }}\n",
    ],
}  # fmt: skip
VALUES: dict[str, dict[str, Any]] = {
    "default": {},
    "custom": CUSTOM,
    "podmonitor": {"metrics": {"monitor": "PodMonitor"}, "rbac": {"create": True}},
    "platform": PLATFORM,
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
    return _template(json.dumps(values, sort_keys=True), args, release)


@functools.cache
def _template(values: str, args: tuple[str, ...], release: str) -> str:
    """`helm template` of the chart, once for the same values, arguments and helm."""
    done = helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args,
        values=json.loads(values), release=release,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


class _StrictLoader(yaml.SafeLoader):
    """YAML as the API server's decoder reads it: a key twice in a map is an error (PyYAML
    would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = sorted({str(key) for key in keys if keys.count(key) > 1})
        if twice:
            raise yaml.constructor.ConstructorError(
                None, None, f"keys given twice: {twice}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


def parse(text: str) -> list[Manifest]:
    return [doc for doc in yaml.load_all(text, Loader=_StrictLoader) if doc]


def rendered(values: Mapping[str, Any], *args: str, release: str = "current") -> list[Manifest]:
    return parse(template(values, *args, release=release))


@functools.cache
def manifests(case: str) -> list[Manifest]:
    """Everything a case installs: the CRD (a template), the rest of the templates and the
    `helm test` hook."""
    return rendered(VALUES[case])


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
    assert rendered(VALUES[case], release="helm3") == rendered(VALUES[case])

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
    if case == "platform":
        assert {"PodDisruptionBudget", "NetworkPolicy", "PodMonitor", "Secret"} <= kinds


def test_the_validation_catches_what_the_api_would_refuse() -> None:
    monitor = one(manifests("custom"), "ServiceMonitor", "luaq-workers")
    typo = {**monitor, "spec": {**monitor["spec"], "endpoint": monitor["spec"]["endpoints"]}}
    with pytest.raises(AssertionError):
        validate(typo)
    deployment = one(manifests("default"), "Deployment")
    wrong = {**deployment, "spec": {**deployment["spec"], "replica": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong)


CRD_TEMPLATE = f"templates/{crd.CHART_TEMPLATE}"


def test_the_charts_crd_is_a_generated_template_of_the_crd_in_crds() -> None:
    """One source: `make crds` writes crds/ and the chart's template from the models. The
    chart has no crds/ directory, which Helm would install beside the template."""
    template_text = (CHART / CRD_TEMPLATE).read_text()
    assert template_text == crd.chart_template(), f"{CRD_TEMPLATE} is stale: run `make crds`"
    assert not (CHART / "crds").exists()
    plain = yaml.safe_load((ROOT / "crds" / crd.FILENAME).read_text())
    (installed,) = find(manifests("default"), "CustomResourceDefinition")
    assert installed["spec"] == plain["spec"] == crd.crd()["spec"]
    assert installed["metadata"]["name"] == plain["metadata"]["name"]
    assert plain["metadata"]["labels"].items() <= installed["metadata"]["labels"].items()
    assert installed["metadata"]["labels"]["app.kubernetes.io/component"] == "crds"
    assert installed["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


@pytest.mark.parametrize(
    ("values", "installed", "kept", "release"),
    [
        ({}, True, True, "current"),
        ({}, True, True, "helm3"),
        ({"crds": {"keep": False}}, True, False, "current"),
        ({"crds": {"install": False}}, False, False, "current"),
        ({"crds": {"install": False}}, False, False, "helm3"),
        # a release's values from before crds.* (--reuse-values)
        ({"crds": None}, True, True, "current"),
        ({"crds": None}, True, True, "helm3"),
    ],
)
def test_an_upgrade_applies_the_crd_and_keep_leaves_it(
    values: dict[str, Any], installed: bool, kept: bool, release: str
) -> None:
    """What `helm upgrade` applies: the CRD with the templates, even where Helm skips a
    chart's crds/ (--skip-crds, as every upgrade does), unless crds.install is false; keep
    makes uninstall, or an upgrade without it, leave it."""
    docs = rendered(values, "--is-upgrade", "--skip-crds", release=release)
    found = find(docs, "CustomResourceDefinition", f"{crd.PLURAL}.{crd.GROUP}")
    assert bool(found) == installed
    if found:
        annotations = found[0]["metadata"].get("annotations", {})
        assert (annotations.get("helm.sh/resource-policy") == "keep") == kept


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


# -- what platform teams set ------------------------------------------------------------------


def deployment_of(values: Mapping[str, Any], release: str = "current") -> Manifest:
    return one(rendered(values, "--show-only", "templates/deployment.yaml", release=release),
               "Deployment")  # fmt: skip


IMAGES: list[tuple[dict[str, Any], str]] = [
    ({}, DEFAULT_IMAGE),
    ({"image": {"tag": "1.2.3"}}, "ghcr.io/luaq/luaq:1.2.3"),
    ({"image": {"tag": "1.2.3", "digest": DIGEST}}, f"ghcr.io/luaq/luaq@{DIGEST}"),
    ({"global": {"imageRegistry": "mirror.example"}}, "mirror.example/luaq/luaq:0.1.0"),
    ({"global": {"imageRegistry": "mirror.example:5000/hub/"}, "image": {"digest": DIGEST}},
     f"mirror.example:5000/hub/luaq/luaq@{DIGEST}"),
    # a repository without a registry gets one; localhost and host:port are registries
    ({"global": {"imageRegistry": "mirror.example"}, "image": {"repository": "luaq/luaq"}},
     "mirror.example/luaq/luaq:0.1.0"),
    ({"global": {"imageRegistry": "mirror.example"}, "image": {"repository": "luaq"}},
     "mirror.example/luaq:0.1.0"),
    ({"global": {"imageRegistry": "mirror.example"},
      "image": {"repository": "localhost/luaq"}}, "mirror.example/luaq:0.1.0"),
    ({"global": {"imageRegistry": "mirror.example"},
      "image": {"repository": "registry:5000/luaq"}}, "mirror.example/luaq:0.1.0"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("values", "image", "release"),
    [(values, image, "current") for values, image in IMAGES]
    + [(values, image, "helm3") for values, image in IMAGES[4:6]],
)
def test_the_image_takes_a_digest_and_a_global_registry_for_the_workers_too(
    values: dict[str, Any], image: str, release: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered(values, release=release)
    operator = container(one(docs, "Deployment"))
    assert operator["image"] == image
    assert container(one(docs, "Pod"))["image"] == image  # helm test's
    for name in list(os.environ):
        if name.startswith("LUAQ_OPERATOR_"):
            monkeypatch.delenv(name)
    assert settings_from(_parser().parse_args(operator["args"])).image == image  # --image


def test_a_worker_image_of_its_own_is_taken_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "global": {"imageRegistry": "mirror.example"},
        "image": {"digest": DIGEST},
        "operator": {"workerImage": "registry.example/workers:2"},
    }
    assert operator_settings(values, monkeypatch).image == "registry.example/workers:2"
    assert container(deployment_of(values))["image"] == f"mirror.example/luaq/luaq@{DIGEST}"


@pytest.mark.parametrize(
    ("budget", "spec"),
    [
        ({"enabled": True}, {"maxUnavailable": 1}),
        ({"enabled": True, "minAvailable": 1}, {"minAvailable": 1}),
        ({"enabled": True, "minAvailable": 0}, {"minAvailable": 0}),
        ({"enabled": True, "minAvailable": "50%"}, {"minAvailable": "50%"}),
        ({"enabled": True, "maxUnavailable": "25%"}, {"maxUnavailable": "25%"}),
        ({"enabled": False, "minAvailable": 1}, None),
    ],
)
def test_the_disruption_budget_covers_the_operators_pods(
    budget: dict[str, Any], spec: dict[str, Any] | None
) -> None:
    docs = rendered({"replicaCount": 2, "podDisruptionBudget": budget})
    found = find(docs, "PodDisruptionBudget")
    if spec is None:
        assert not found
        return
    (pdb,) = found
    validate(pdb)
    pod = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(pdb["spec"]["selector"], pod)
    assert {k: v for k, v in pdb["spec"].items() if k != "selector"} == spec


def test_the_notes_warn_of_a_budget_that_blocks_every_drain() -> None:
    budget = {"podDisruptionBudget": {"enabled": True, "minAvailable": 2}}
    assert "every drain of their nodes blocks" in notes({**budget, "replicaCount": 2})
    assert "every drain" not in notes({**budget, "replicaCount": 3})


def test_spread_priority_arguments_environment_volumes_and_probes_reach_the_pod(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deployment = one(manifests("platform"), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    operator = container(deployment)
    own = deployment["spec"]["selector"]["matchLabels"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    zone, host = pod["topologySpreadConstraints"]
    spread = PLATFORM["topologySpreadConstraints"]
    assert zone == {**spread[0], "labelSelector": {"matchLabels": own}}
    assert host == PLATFORM["topologySpreadConstraints"][1]  # its own labelSelector, as it is
    assert selects(zone["labelSelector"], deployment["spec"]["template"]["metadata"]["labels"])
    # extraArgs come last and win: the operator parses them as it would on the pod
    assert operator["args"][-2:] == PLATFORM["extraArgs"]
    settings = settings_from(_parser().parse_args(operator["args"]))
    assert settings.resync_seconds == 45
    assert {"name": "TZ", "value": "UTC"} in operator["env"]
    assert {v["name"] for v in operator["env"]} == {"POD_NAME", "POD_NAMESPACE", "TZ"}
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}, *PLATFORM["volumes"]]
    assert operator["volumeMounts"] == [
        {"name": "tmp", "mountPath": "/tmp"},
        *PLATFORM["volumeMounts"],
    ]
    for probe in ("livenessProbe", "readinessProbe"):
        assert operator[probe] == {
            "httpGet": {"path": "/healthz", "port": "health"},
            **PLATFORM[probe],
        }
    assert operator["resources"] == PLATFORM["resources"]
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "q"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"volumes": [{"name": "tmp", "emptyDir": {}}]}, 'volumes: "tmp" is there twice'),
        ({"volumes": [{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}]},
         'volumes: "a" is there twice'),
        ({"volumeMounts": [{"name": "ca", "mountPath": "/ca"}]},
         'volumeMounts: "ca" is not one of volumes (none)'),
        ({"volumes": [{"name": "scratch", "emptyDir": {}}],
          "volumeMounts": [{"name": "scratch", "mountPath": "/tmp/"}]},
         'volumeMounts: "scratch" mounts at /tmp, the chart'),
    ],
)  # fmt: skip
def test_volumes_that_the_api_server_would_refuse_are_refused_naming_them(
    values: dict[str, Any], message: str
) -> None:
    done = helm("template", RELEASE, str(CHART), values=values)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_extra_objects_are_rendered_with_the_charts_values_and_helpers() -> None:
    docs = manifests("platform")
    assert one(docs, "ConfigMap", f"{RELEASE}-extra")["data"] == {"release": RELEASE}
    secret = one(docs, "Secret", f"{RELEASE}-templated")
    assert secret["stringData"] == {"namespace": NAMESPACE}
    assert not find(manifests("default"), "Secret")


# The NetworkPolicy, evaluated as a network plugin evaluates it (the rules of
# networking.k8s.io/v1: a peer matches by ipBlock, or as a pod by its labels and its
# namespace's), against the traffic the operator makes and takes.


@dataclass(frozen=True)
class Peer:
    """A party to a connection: an address, and for a pod its namespace and labels."""

    ip: str
    namespace: str | None = None  # None: not a pod (a node, the API server, the world)
    labels: Mapping[str, str] = field(default_factory=dict)


def _selected(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        present = key in labels
        if not {
            "In": present and labels.get(key) in (values or []),
            "NotIn": not present or labels[key] not in (values or []),
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def _peer_matches(spec: Mapping[str, Any], peer: Peer, namespace: str) -> bool:
    if "ipBlock" in spec:
        address = ipaddress.ip_address(peer.ip)
        block = spec["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(other) for other in block.get("except", [])
        )
    if peer.namespace is None:
        return False
    if "namespaceSelector" in spec:
        in_namespace = _selected(
            spec["namespaceSelector"], {"kubernetes.io/metadata.name": peer.namespace}
        )
    else:
        in_namespace = peer.namespace == namespace
    return in_namespace and _selected(spec.get("podSelector", {}), peer.labels)


def _port_matches(ports: list[Mapping[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for rule in ports:
        assert not isinstance(rule.get("port"), str), "named ports: not evaluated here"
        if rule.get("protocol", "TCP") != protocol:
            continue
        low = rule.get("port")
        if low is None or low <= port <= rule.get("endPort", low):
            return True
    return False


def allows(policy: Manifest, direction: str, peer: Peer, port: int, protocol: str = "TCP") -> bool:
    """Whether `policy` lets the connection through: `direction` ingress (from `peer` to a
    selected pod's `port`) or egress (from a selected pod to `peer`'s `port`)."""
    spec = policy["spec"]
    if direction.capitalize() not in spec["policyTypes"]:
        return True
    key = "from" if direction == "ingress" else "to"
    namespace = policy["metadata"]["namespace"]
    return any(
        _port_matches(rule.get("ports"), port, protocol)
        and (not rule.get(key) or any(_peer_matches(p, peer, namespace) for p in rule[key]))
        for rule in spec.get(direction) or []
    )


KUBERNETES_SERVICE = Peer("10.96.0.1")  # the `kubernetes` Service, before translation
API_SERVER = Peer("172.18.0.2")  # kind's control plane node: 6443
NODE = Peer("172.18.0.3")  # a node: the kubelet's probes come from it
CLUSTER_DNS = Peer("10.96.0.10")
NODE_LOCAL_DNS = Peer("169.254.20.10")
BROKER = Peer("10.244.1.7", "default", {"app.kubernetes.io/name": "rabbitmq"})
PROMETHEUS = Peer("10.244.2.9", "monitoring", {"app.kubernetes.io/name": "prometheus"})
ELSEWHERE = Peer("10.244.3.4", "shop", {"app": "shop"})
WORLD = Peer("93.184.216.34")


def network_policy(case: str) -> tuple[Manifest, Manifest, dict[str, int]]:
    """The case's NetworkPolicy, its operator Deployment, and the container's ports."""
    docs = manifests(case) if case != "enabled" else rendered({"networkPolicy": {"enabled": True}})
    deployment = one(docs, "Deployment")
    ports = {port["name"]: port["containerPort"] for port in container(deployment)["ports"]}
    return one(docs, "NetworkPolicy"), deployment, ports


def broker_port() -> int:
    """The port of the examples' broker URL, as a QueueConsumer names it."""
    secret = next(doc for doc in example("broker-secret.yaml") if doc["kind"] == "Secret")
    return urllib.parse.urlsplit(secret["stringData"]["url"]).port or 5672


@pytest.mark.parametrize("case", ["enabled", "platform"])
def test_the_network_policy_lets_through_what_the_operator_needs(case: str) -> None:
    policy, deployment, ports = network_policy(case)
    validate(policy)
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    pod = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selected(policy["spec"]["podSelector"], pod)
    worker_deployment, _ = worker("default")
    assert not _selected(
        policy["spec"]["podSelector"], worker_deployment["spec"]["template"]["metadata"]["labels"]
    )
    # out: the API server (as a network plugin sees it, on 6443 or 443), the brokers, DNS
    assert allows(policy, "egress", API_SERVER, 6443)
    assert allows(policy, "egress", API_SERVER, 443)
    assert allows(policy, "egress", BROKER, broker_port())
    assert allows(policy, "egress", BROKER, 5671)  # amqps
    for resolver in (CLUSTER_DNS, NODE_LOCAL_DNS):
        assert allows(policy, "egress", resolver, 53, "UDP")
        assert allows(policy, "egress", resolver, 53, "TCP")
    # in: Prometheus, `helm test`'s pod on both ports, the kubelet on the probes' port
    hook = one(manifests(case if case != "enabled" else "default"), "Pod")
    tester = Peer("10.244.0.5", NAMESPACE, hook["metadata"]["labels"])
    for port in ports.values():
        assert allows(policy, "ingress", PROMETHEUS, port)
        assert allows(policy, "ingress", tester, port)
    probed = {
        container(deployment)[p]["httpGet"]["port"] for p in ("livenessProbe", "readinessProbe")
    }
    assert probed == {"health"}
    assert allows(policy, "ingress", NODE, ports["health"])
    # nothing else
    assert not allows(policy, "ingress", NODE, ports["metrics"])
    assert not allows(policy, "ingress", PROMETHEUS, 9999)
    assert not allows(policy, "egress", WORLD, 80)
    assert not allows(policy, "egress", ELSEWHERE, 8080)
    assert not allows(policy, "egress", BROKER, 5672, "UDP")
    assert not allows(policy, "egress", WORLD, 22)


def test_the_network_policy_narrows_to_the_addresses_and_namespaces_given() -> None:
    policy, _, ports = network_policy("platform")
    assert not allows(policy, "egress", Peer("172.18.0.9"), 6443)
    assert not allows(policy, "egress", KUBERNETES_SERVICE, 443)  # not in apiServer.cidrs
    assert not allows(policy, "ingress", ELSEWHERE, ports["metrics"])
    assert not allows(policy, "ingress", Peer("10.244.2.10", "monitoring", {}), ports["metrics"])
    assert not allows(policy, "ingress", WORLD, ports["health"])  # not a node
    assert allows(policy, "egress", Peer("10.1.2.3"), 4317)  # extraEgress
    enabled, _, _ = network_policy("enabled")
    assert allows(enabled, "ingress", ELSEWHERE, ports["metrics"])  # {}: every namespace
    assert allows(enabled, "egress", KUBERNETES_SERVICE, 443)
    assert not find(manifests("default"), "NetworkPolicy")


def test_the_evaluation_can_refuse() -> None:
    """The evaluator itself: a policy without rules lets nothing through, one without
    policyTypes' direction lets all."""
    policy: Manifest = {"metadata": {"namespace": NAMESPACE},
              "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}}  # fmt: skip
    assert not allows(policy, "ingress", PROMETHEUS, 8080)
    assert allows(policy, "egress", WORLD, 80)
    policy["spec"]["ingress"] = [{"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["shop"]}]}}],
        "ports": [{"port": 8000, "endPort": 8100}]}]  # fmt: skip
    assert allows(policy, "ingress", PROMETHEUS, 8080)
    assert not allows(policy, "ingress", ELSEWHERE, 8080)
    assert not allows(policy, "ingress", PROMETHEUS, 8101)
    assert not allows(policy, "ingress", WORLD, 8080)


# -- the monitors -----------------------------------------------------------------------------


def endpoints(monitor: Manifest) -> list[Manifest]:
    spec = monitor["spec"]
    return list(spec.get("endpoints") or spec["podMetricsEndpoints"])


def meta_label(kind: str, label: str) -> str:
    """The meta label Prometheus gives a pod's or a Service's label (Kubernetes SD)."""
    return f"__meta_kubernetes_{kind}_label_{re.sub('[^a-zA-Z0-9_]', '_', label)}"


def copied(source: str, target: str) -> Manifest:
    """The relabeling that sets `target` to a target's `source` label, when it has one."""
    return {"sourceLabels": [source], "regex": "(.+)", "targetLabel": target, "action": "replace"}


@pytest.mark.parametrize("case", ["custom", "podmonitor", "platform"])
def test_the_monitors_keep_the_targets_labels_and_name_each_workers_queueconsumer(
    case: str,
) -> None:
    """honorLabels: the operator's per-QueueConsumer `namespace` stays `namespace` (not
    exported_namespace); a worker's job and its `queueconsumer` label are its QueueConsumer's
    name, taken from the label the operator puts on its pods and Service: not one job for
    every consumer, and the dashboard and alerts tell QueueConsumers apart."""
    docs = manifests(case)
    kind = "PodMonitor" if case != "custom" else "ServiceMonitor"
    monitors = {doc["metadata"]["name"]: doc for doc in find(docs, kind)}
    assert set(monitors) == {RELEASE, f"{RELEASE}-workers"}
    for monitor in monitors.values():
        validate(monitor)
        assert [endpoint["honorLabels"] for endpoint in endpoints(monitor)] == [True]
    deployment, service = worker(case)
    labels = (deployment["spec"]["template"]["metadata"] if kind == "PodMonitor" else service[
        "metadata"])["labels"]  # fmt: skip
    (workers,) = endpoints(monitors[f"{RELEASE}-workers"])
    source = meta_label("pod" if kind == "PodMonitor" else "service", render.OWNER_LABEL)
    own = VALUES[case]["metrics"].get("relabelings", [])
    assert workers["relabelings"] == [copied(source, "job"), copied(source, "queueconsumer"), *own]
    assert labels[render.OWNER_LABEL] == "email-worker"
    (operator,) = endpoints(monitors[RELEASE])
    assert operator.get("relabelings", []) == own


@pytest.mark.parametrize("release", ["current", "helm3"])
@pytest.mark.parametrize("kind", ["ServiceMonitor", "PodMonitor"])
def test_a_job_label_leaves_the_workers_queueconsumer_label(kind: str, release: str) -> None:
    """metrics.jobLabel takes the job over, not the `queueconsumer` label the dashboard and
    the alerts group by."""
    values = {"metrics": {"monitor": kind, "jobLabel": "team"}}
    docs = rendered(values, release=release)
    monitors = {doc["metadata"]["name"]: doc for doc in find(docs, kind)}
    assert set(monitors) == {RELEASE, f"{RELEASE}-workers"}
    for monitor in monitors.values():
        validate(monitor)
        assert monitor["spec"]["jobLabel"] == "team"
    assert "relabelings" not in endpoints(monitors[RELEASE])[0]
    (workers,) = endpoints(monitors[f"{RELEASE}-workers"])
    source = meta_label("pod" if kind == "PodMonitor" else "service", render.OWNER_LABEL)
    assert workers["relabelings"] == [copied(source, "queueconsumer")]


def test_the_monitors_take_timeouts_job_labels_and_metric_relabelings() -> None:
    docs = manifests("platform")
    for monitor in find(docs, "PodMonitor"):
        (endpoint,) = endpoints(monitor)
        assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("1m", "45s")
        assert endpoint["metricRelabelings"] == PLATFORM["metrics"]["metricRelabelings"]
        assert "jobLabel" not in monitor["spec"]
    for monitor in find(manifests("custom"), "ServiceMonitor"):
        assert "scrapeTimeout" not in endpoints(monitor)[0]


@pytest.mark.parametrize(
    ("interval", "timeout", "refused", "release"),
    [("30s", "30s", False, "current"), ("1m30s", "1m", False, "helm3"),
     ("1h", "500ms", False, "current"), ("30s", "31s", True, "current"),
     ("1m", "1m1s", True, "helm3"), ("500ms", "1s", True, "current"),
     ("1d", "1w", True, "current")],
)  # fmt: skip
def test_a_scrape_timeout_longer_than_the_interval_is_refused(
    interval: str, timeout: str, refused: bool, release: str
) -> None:
    values = {"metrics": {"monitor": "PodMonitor", "interval": interval, "scrapeTimeout": timeout}}
    done = helm("template", RELEASE, str(CHART), values=values, release=release)
    assert (done.returncode != 0) == refused, done.stderr
    if refused:
        assert f"metrics.scrapeTimeout ({timeout}) must not be longer than metrics.interval" in (
            done.stderr
        )


def test_the_schemas_durations_and_relabel_actions_are_the_prometheus_operators() -> None:
    metrics = SCHEMA["properties"]["metrics"]["properties"]
    (pattern,) = [
        item.pattern
        for item in monitoring.Endpoint.model_fields["scrape_timeout"].metadata
        if hasattr(item, "pattern")
    ]
    assert metrics["interval"]["pattern"] == metrics["scrapeTimeout"]["pattern"] == pattern
    relabeling = SCHEMA["definitions"]["relabelings"]["items"]["properties"]
    (actions, _) = typing.get_args(monitoring.RelabelingConfig.model_fields["action"].annotation)
    assert relabeling["action"]["enum"] == list(typing.get_args(actions))
    fields = {f.alias or name for name, f in monitoring.RelabelingConfig.model_fields.items()}
    assert set(relabeling) == fields


# -- the chart's metadata ---------------------------------------------------------------------

CHART_YAML = yaml.safe_load((CHART / "Chart.yaml").read_text())


def test_the_chart_says_where_it_comes_from_for_artifact_hub() -> None:
    annotations = CHART_YAML["annotations"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert annotations["artifacthub.io/license"] == project["license"]
    assert CHART_YAML["home"] in CHART_YAML["sources"]
    assert CHART_YAML["maintainers"]
    assert all(maintainer["name"] for maintainer in CHART_YAML["maintainers"])
    links = yaml.safe_load(annotations["artifacthub.io/links"])
    assert all(link["url"].startswith(CHART_YAML["home"]) for link in links)
    (image,) = yaml.safe_load(annotations["artifacthub.io/images"])
    assert image["image"] == DEFAULT_IMAGE == container(one(manifests("default"), "Deployment"))[
        "image"]  # fmt: skip
    definition = crd.crd()
    (described,) = yaml.safe_load(annotations["artifacthub.io/crds"])
    assert described["kind"] == definition["spec"]["names"]["kind"]
    assert described["version"] == definition["spec"]["versions"][0]["name"]
    assert described["name"] == definition["metadata"]["name"]
    (sample,) = yaml.safe_load(annotations["artifacthub.io/crdsExamples"])
    assert sample["apiVersion"] == f"{crd.GROUP}/{crd.CRD_VERSION}"
    parse_spec(sample["spec"], crd.spec_schema())  # a QueueConsumer the CRD takes
    assert annotations["artifacthub.io/operator"] == "true"


@pytest.mark.parametrize("release", ["current", "helm3"])
def test_the_chart_refuses_a_kubernetes_older_than_its_kube_version(release: str) -> None:
    assert CHART_YAML["kubeVersion"] == ">=1.30.0-0"
    older = helm("template", RELEASE, str(CHART), "--kube-version", "1.29.9", release=release)
    assert older.returncode != 0
    assert "kubeVersion" in older.stderr or "incompatible" in older.stderr, older.stderr
    assert helm("template", str(CHART), "--kube-version", "1.30.0", release=release).returncode == 0


# -- values from an older release (--reuse-values) --------------------------------------------

# The values this chart added after its first release, as the paths of values.yaml: an upgrade
# with --reuse-values keeps the release's values without them (null removes a value).
ADDED = [
    "global.imageRegistry", "image.digest", "crds", "extraArgs", "extraEnv", "livenessProbe",
    "readinessProbe", "volumes", "volumeMounts", "topologySpreadConstraints",
    "priorityClassName", "podDisruptionBudget", "networkPolicy", "metrics.scrapeTimeout",
    "metrics.jobLabel", "metrics.relabelings", "metrics.metricRelabelings", "extraObjects",
]  # fmt: skip


def without(paths: Iterable[str]) -> dict[str, Any]:
    """Values that remove each of `paths` (null), as an older release's values lack them."""
    values: dict[str, Any] = {}
    for path in paths:
        *parents, last = path.split(".")
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = None
    return values


@pytest.mark.parametrize("release", ["current", "helm3"])
@pytest.mark.parametrize("monitor", ["ServiceMonitor", "PodMonitor"])
def test_values_from_before_these_options_render_what_their_defaults_do(
    monitor: str, release: str
) -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in ADDED:
        node = defaults
        for part in path.split("."):
            assert part in node, f"{path} is not in values.yaml"
            node = node[part]
    values = {"metrics": {"monitor": monitor}}
    older = without(ADDED)
    older["metrics"] = {**older["metrics"], "monitor": monitor}
    assert rendered(older, release=release) == rendered(values, release=release)


# -- the schema: a wrong value is refused, named, and what was expected said ------------------

OWN_LABEL = "(the chart's own selector label: leave it out of podLabels)"


# A wrong value, and what each Helm says of it: Helm 4 (santhosh-tekuri/jsonschema) by JSON
# pointer, Helm 3.17 (gojsonschema) dotted.
REFUSED: list[tuple[dict[str, Any], str, str]] = [
    # one pattern, not an anyOf whose message says only that no branch matched
    ({"dashboard": {"namespace": "Monitoring"}},
     "at '/dashboard/namespace': 'Monitoring' does not match pattern",
     "dashboard.namespace: Does not match pattern"),
    ({"fullnameOverride": "9lives"}, "at '/fullnameOverride': '9lives' does not match",
     "fullnameOverride: Does not match pattern"),
    ({"fullnameOverride": "a" * 64}, "at '/fullnameOverride': maxLength: got 64, want 63",
     "fullnameOverride: String length must be less than or equal to 63"),
    ({"nameOverride": "Luaq"}, "at '/nameOverride': 'Luaq' does not match",
     "nameOverride: Does not match pattern"),
    ({"nameOverride": "a" * 53}, "at '/nameOverride': maxLength: got 53, want 52",
     "nameOverride: String length must be less than or equal to 52"),
    ({"podLabels": {"app.kubernetes.io/instance": "x"}},
     f"at '/podLabels/app.kubernetes.io~1instance': value must be '{OWN_LABEL}'".replace(
         "'s", "\\'s"),
     f'podLabels.app.kubernetes.io/instance does not match: "{OWN_LABEL}"'),
    ({"podLabels": {"bad key!": "x"}}, "at '/podLabels': additional properties 'bad key!'",
     "podLabels: Additional property bad key! is not allowed"),
    ({"podLabels": {"team": "a b"}}, "at '/podLabels/team': 'a b' does not match",
     "podLabels.team: Does not match pattern"),
    ({"resources": {"requests": {"memroy": "1Gi"}}},
     "at '/resources/requests': additional properties 'memroy' not allowed",
     "resources.requests: Additional property memroy is not allowed"),
    ({"resources": {"limit": {"memory": "1Gi"}}},
     "at '/resources': additional properties 'limit' not allowed",
     "resources: Additional property limit is not allowed"),
    ({"resources": {"limits": {"memory": "1GB"}}},
     "at '/resources/limits/memory': '1GB' does not match pattern",
     "resources.limits.memory: Does not match pattern"),
    ({"image": {"digest": "sha256:abc"}}, "at '/image/digest': 'sha256:abc' does not match",
     "image.digest: Does not match pattern '^(sha256:[a-f0-9]{64})?$'"),
    ({"global": {"imageRegistry": "https://mirror.example"}},
     "at '/global/imageRegistry': 'https://mirror.example' does not match",
     "global.imageRegistry: Does not match pattern"),
    ({"crds": {"install": "yes"}}, "at '/crds/install': got string, want boolean",
     "crds.install: Invalid type. Expected: boolean, given: string"),
    ({"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}},
     "at '/podDisruptionBudget/maxUnavailable': value must be ''",
     'podDisruptionBudget.maxUnavailable does not match: ""'),
    ({"podDisruptionBudget": {"minAvailable": "50"}},
     "at '/podDisruptionBudget/minAvailable': '50' does not match pattern",
     "podDisruptionBudget.minAvailable: Does not match pattern '^((100|[1-9]?[0-9])%)?$'"),
    ({"podDisruptionBudget": {"maxUnavailable": -1}},
     "at '/podDisruptionBudget/maxUnavailable': minimum: got -1, want 0",
     "podDisruptionBudget.maxUnavailable: Must be greater than or equal to 0"),
    ({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone"}]},
     "at '/topologySpreadConstraints/0': missing property 'whenUnsatisfiable'",
     "topologySpreadConstraints.0: whenUnsatisfiable is required"),
    ({"priorityClassName": "High_Priority"}, "at '/priorityClassName': 'High_Priority'",
     "priorityClassName: Does not match pattern"),
    ({"networkPolicy": {"apiServer": {"cidrs": ["10.0.0.1"]}}},
     "at '/networkPolicy/apiServer/cidrs/0': '10.0.0.1' does not match",
     "networkPolicy.apiServer.cidrs.0: Does not match pattern"),
    ({"networkPolicy": {"brokers": {"ports": [0]}}},
     "at '/networkPolicy/brokers/ports/0': minimum: got 0, want 1",
     "networkPolicy.brokers.ports.0: Must be greater than or equal to 1"),
    ({"networkPolicy": {"metrics": {"namespaceSelector": {"matchLabel": {"a": "b"}}}}},
     "at '/networkPolicy/metrics/namespaceSelector': additional properties 'matchLabel'",
     "networkPolicy.metrics.namespaceSelector: Additional property matchLabel is not"),
    ({"livenessProbe": {"successThreshold": 2}},
     "at '/livenessProbe': additional properties 'successThreshold' not allowed",
     "livenessProbe: Additional property successThreshold is not allowed"),
    ({"readinessProbe": {"periodSeconds": 0}},
     "at '/readinessProbe/periodSeconds': minimum: got 0, want 1",
     "readinessProbe.periodSeconds: Must be greater than or equal to 1"),
    ({"extraArgs": "--log-level=debug"}, "at '/extraArgs': got string, want array",
     "extraArgs: Invalid type. Expected: array, given: string"),
    ({"extraEnv": [{"name": "X", "value": 1}]}, "at '/extraEnv/0/value': got number, want",
     "extraEnv.0.value: Invalid type. Expected: string, given: integer"),
    ({"volumes": [{"emptyDir": {}}]}, "at '/volumes/0': missing property 'name'",
     "volumes.0: name is required"),
    ({"volumeMounts": [{"name": "ca", "mountPath": "etc"}]},
     "at '/volumeMounts/0/mountPath': 'etc' does not match",
     "volumeMounts.0.mountPath: Does not match pattern"),
    ({"extraObjects": [1]}, "at '/extraObjects/0': got number, want string or object",
     "extraObjects.0: Invalid type. Expected: [object,string], given: integer"),
    ({"metrics": {"relabelings": [{"action": "rename"}]}},
     "at '/metrics/relabelings/0/action': value must be one of 'replace'",
     "metrics.relabelings.0.action must be one of the following: \"replace\""),
    ({"metrics": {"metricRelabelings": [{"source_labels": ["__name__"]}]}},
     "at '/metrics/metricRelabelings/0': additional properties 'source_labels' not allowed",
     "metrics.metricRelabelings.0: Additional property source_labels is not allowed"),
    ({"metrics": {"scrapeTimeout": "10"}}, "at '/metrics/scrapeTimeout': '10' does not match",
     "metrics.scrapeTimeout: Does not match pattern"),
    ({"metrics": {"interval": ""}}, "at '/metrics/interval': minLength: got 0, want 1",
     "metrics.interval: String length must be greater than or equal to 1"),
    ({"metrics": {"jobLabel": "a b"}}, "at '/metrics/jobLabel': 'a b' does not match",
     "metrics.jobLabel: Does not match pattern"),
]  # fmt: skip


def _paths(values: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()
    for key, value in values.items():
        if isinstance(value, dict) and value:
            found |= _paths(value, (*prefix, key))
        else:
            found.add((*prefix, key))
    return found


def _merge(into: dict[str, Any], values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and value and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def batches(cases: list[tuple[dict[str, Any], str, str]]) -> list[tuple[dict[str, Any], list[Any]]]:
    """The cases packed into as few values files as can hold them, no value set twice: helm
    reports every value the schema refuses at once, and each run costs a second."""
    packed: list[tuple[dict[str, Any], list[Any], set[tuple[str, ...]]]] = []
    for case in cases:
        paths = _paths(case[0])
        for values, members, used in packed:
            if not any(p[: len(q)] == q or q[: len(p)] == p for p in paths for q in used):
                _merge(values, json.loads(json.dumps(case[0])))
                members.append(case)
                used |= paths
                break
        else:
            packed.append((json.loads(json.dumps(case[0])), [case], set(paths)))
    return [(values, members) for values, members, _ in packed]


@pytest.mark.parametrize("release", ["current", "helm3"])
def test_the_values_schema_says_what_was_expected_of_a_new_value(release: str) -> None:
    """Both Helms' validators name each wrong value and what it should have been; none answers
    with a bare `anyOf`/`oneOf` failure."""
    for values, members in batches(REFUSED):
        done = helm("template", RELEASE, str(CHART), values=values, release=release)
        assert done.returncode != 0
        assert "values don't meet the specifications of the schema" in done.stderr
        for case, helm4, helm3 in members:
            assert (helm3 if release == "helm3" else helm4) in done.stderr, (case, done.stderr)
        assert "anyOf" not in done.stderr
        assert "oneOf" not in done.stderr


def test_each_refused_value_alone_is_refused() -> None:
    """The packing hides no case behind another's error: each alone fails the schema too (by
    a Python validator of the same draft, a millisecond each)."""
    validator = jsonschema.Draft7Validator(SCHEMA)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert not list(validator.iter_errors(defaults))
    for values, _, _ in REFUSED:
        merged = json.loads(json.dumps(defaults))
        _merge(merged, values)
        assert list(validator.iter_errors(merged)), values
    assert len(batches(REFUSED)) < len(REFUSED) / 3


def test_the_schema_has_no_any_of_or_one_of() -> None:
    text = (CHART / "values.schema.json").read_text()
    assert '"anyOf"' not in text
    assert '"oneOf"' not in text


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
    same command and arguments, the downward API's environment, the cluster's API server. Pods
    have a network each: on this one host, a pod after the first listens on ports of its own
    (else it exits: its metrics port is taken)."""
    operator = container(deployment)
    fields = {"metadata.namespace": NAMESPACE}
    names = [f"{RELEASE}-{index}" for index in range(replicas)]
    processes = []
    for index, name in enumerate(names):
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        for variable in operator["env"]:
            path = variable["valueFrom"]["fieldRef"]["fieldPath"]
            env[variable["name"]] = {**fields, "metadata.name": name}[path]
        args = [
            f"{arg.partition('=')[0]}={free_port()}"
            if index and arg.startswith(("--metrics-port=", "--health-port="))
            else arg
            for arg in operator["args"]
        ]
        processes.append(
            await asyncio.create_subprocess_exec(
                *operator["command"],
                *args,
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


# What the chart installs beyond the emulator's own kinds: stored, and nothing more (no network
# plugin enforces a NetworkPolicy there, no eviction asks a PodDisruptionBudget, and the
# QueueConsumer kind is served from the models' CRD whatever CRD object is stored).
CHART_KINDS = (
    Kind(
        kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions"),
        "CustomResourceDefinition",
        namespaced=False,
    ),
    Kind(kmock.resource("policy", "v1", "poddisruptionbudgets"), "PodDisruptionBudget"),
    Kind(kmock.resource("networking.k8s.io", "v1", "networkpolicies"), "NetworkPolicy"),
)
CRD_NAME = f"{crd.PLURAL}.{crd.GROUP}"


@pytest.fixture
def cluster(cluster: Cluster) -> Cluster:
    """The emulated cluster, serving the chart's other kinds too."""
    for kind in CHART_KINDS:
        cluster.emulator.register(kind)
    return cluster


@pytest.mark.parametrize(
    "values",
    [
        {},
        {
            "replicaCount": 2,
            "operator": {"watchNamespaces": ["default", "shop"]},
            "podDisruptionBudget": {"enabled": True},
            "networkPolicy": {"enabled": True},
        },
    ],
    ids=["cluster-wide", "namespaced-two-replicas"],
)
async def test_the_installed_chart_runs_the_examples(
    cluster: Cluster, kubectl_binary: Path, values: dict[str, Any], tmp_path: Path
) -> None:
    ports = {"healthPort": free_port(), "metricsPort": free_port()}
    values = {**values, "operator": {**values.get("operator", {}), **ports, "workerImage": IMAGE}}
    applied = await kubectl(
        kubectl_binary, cluster, "apply", "--validate=false", "-f", "-",
        stdin=template(values, "--skip-tests"),
    )  # fmt: skip
    assert f"deployment.apps/{RELEASE} created" in applied
    assert f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME} created" in applied
    if values.get("networkPolicy"):
        assert cluster.get("poddisruptionbudgets", NAMESPACE, RELEASE) is not None
        assert cluster.get("networkpolicies", NAMESPACE, RELEASE) is not None
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


async def test_an_upgrade_updates_the_crd_the_release_installed(
    cluster: Cluster, kubectl_binary: Path, tmp_path: Path
) -> None:
    """Installed, then upgraded to a chart whose CRD changed (as `make crds` writes it after a
    change of the models): what the upgrade applies replaces the CRD in the cluster, which a
    chart's crds/ directory never would."""
    installed = await kubectl(
        kubectl_binary, cluster, "apply", "--validate=false", "-f", "-",
        stdin=template({}, "--skip-tests"),
    )  # fmt: skip
    assert f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME} created" in installed
    stored = cluster.emulator.read("customresourcedefinitions", None, CRD_NAME)
    assert stored is not None
    assert stored["spec"] == crd.crd()["spec"]
    assert stored["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    following = crd.crd()
    column = {"name": "Processes", "type": "integer", "jsonPath": ".spec.processes"}
    following["spec"]["versions"][0]["additionalPrinterColumns"].append(column)
    chart = tmp_path / "luaq"
    shutil.copytree(CHART, chart)
    (chart / CRD_TEMPLATE).write_text(crd.chart_template(following))
    upgrade = helm(
        "template", RELEASE, str(chart), "--namespace", NAMESPACE, "--is-upgrade",
        "--skip-crds", "--skip-tests",
    )  # fmt: skip
    assert upgrade.returncode == 0, upgrade.stderr
    upgraded = await kubectl(
        kubectl_binary, cluster, "apply", "--validate=false", "-f", "-", stdin=upgrade.stdout
    )
    assert f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME} configured" in upgraded
    stored = cluster.emulator.read("customresourcedefinitions", None, CRD_NAME)
    assert stored is not None
    assert stored["spec"]["versions"][0]["additionalPrinterColumns"][-1] == column


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
