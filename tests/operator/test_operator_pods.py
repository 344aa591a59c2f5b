"""What a QueueConsumer says of its pods besides the container (annotations, labels, priority,
spread, volumes) and the PodDisruptionBudget the operator adds: rendered, admitted or refused by
the CRD and by the operator alike, bounded by the admin's policy, still within the restricted
Pod Security profile; through the real operator, the budget follows the replicas and a refused
volume applies nothing."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import kubernetes_validate
import pytest
from conftest import eventually
from kube_fixtures import K8S_VERSION, TEST_SETTINGS, Cluster, apply, reconciles, running
from luaq.operator import policy, render
from luaq.operator.handlers import Operator
from luaq.operator.kube import POD_DISRUPTION_BUDGETS, QUEUE_CONSUMERS
from luaq.operator.resource import InvalidSpec, parse_spec
from luaq.operator.settings import Policy
from test_operator import (
    NAME,
    condition,
    deployment,
    edit,
    email_worker,
    resource,
    settled,
    versions,
)
from test_operator_crd import BASE, SPEC, admit, changed, rendered
from test_operator_tenancy import consumer, degraded, passes

VOLUMES = [
    {"name": "templates", "configMap": {"name": "mail-templates",
                                        "items": [{"key": "welcome.txt", "path": "en/welcome"}]}},
    {"name": "certs", "secret": {"secretName": "mail-certs", "defaultMode": 0o440}},
    {"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "0.5Gi"}},
    {"name": "vault", "projected": {"sources": [
        {"serviceAccountToken": {"audience": "vault", "path": "token"}},
        {"configMap": {"name": "vault-ca", "optional": True}},
    ]}},
]  # fmt: skip
MOUNTS = [
    {"name": "templates", "mountPath": "/etc/mail/templates", "readOnly": True},
    {"name": "certs", "mountPath": "/etc/mail/certs", "readOnly": True},
    {"name": "scratch", "mountPath": "/var/scratch", "readOnly": False},
    {"name": "vault", "mountPath": "/var/run/vault", "subPath": "token"},
]
POD = {
    "podAnnotations": {"sidecar.istio.io/inject": "false", "example.com/cost": "mail"},
    "podLabels": {"team": "mail", "app.kubernetes.io/part-of": "shop"},
    "priorityClassName": "workers",
    "volumes": VOLUMES,
    "volumeMounts": MOUNTS,
}
# How the API server writes what the spec leaves out: `readOnly: false` is no readOnly.
STORED_MOUNTS = [
    {key: value for key, value in mount.items() if value is not False} for mount in MOUNTS
]


def pod_of(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return spec


def test_the_pod_fields_reach_the_pods_beside_the_operators_own() -> None:
    found = rendered(changed(**POD)).deployment
    kubernetes_validate.validate(found, K8S_VERSION, strict=True)
    template = found["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    assert template["metadata"]["annotations"] == {
        **POD["podAnnotations"],
        render.CHECKSUM_ANNOTATION: template["metadata"]["annotations"][render.CHECKSUM_ANNOTATION],
    }
    labels = template["metadata"]["labels"]
    assert labels == {**render.labels(BASE["metadata"]["name"]), **POD["podLabels"]}
    assert found["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["priorityClassName"] == "workers"
    assert pod["volumes"][2:] == VOLUMES
    assert [volume["name"] for volume in pod["volumes"][:2]] == ["config", "tmp"]
    assert container["volumeMounts"][2:] == STORED_MOUNTS
    assert [mount["mountPath"] for mount in container["volumeMounts"][:2]] == ["/etc/luaq", "/tmp"]
    plain = rendered(BASE).deployment
    assert len(pod_of(plain)["volumes"]) == 2
    assert "priorityClassName" not in pod_of(plain)


# The checks of the restricted Pod Security Standard (and so of the baseline), as the
# PodSecurity admission applies them to a pod template.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}  # fmt: skip
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL",
                         "MKNOD", "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID",
                         "SYS_CHROOT"}  # fmt: skip
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.ip_local_reserved_ports", "net.ipv4.tcp_keepalive_time",
                "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(template: dict[str, Any]) -> list[str]:
    """What the restricted Pod Security profile refuses in a pod template."""
    pod, found = template["spec"], []
    context = pod.get("securityContext") or {}
    containers = [c for key in ("initContainers", "containers", "ephemeralContainers")
                  for c in pod.get(key) or []]  # fmt: skip
    settings = [(c["name"], c.get("securityContext") or {}) for c in containers]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(f"{key}")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds)}")
    for container in containers:
        if any(port.get("hostPort") for port in container.get("ports") or []):
            found.append(f"{container['name']}: hostPort")
    for name, security in [("pod", context), *settings]:
        if (security.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{name}: hostProcess")
        selinux = security.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or {"user", "role"} & set(selinux):
            found.append(f"{name}: seLinuxOptions")
        if (security.get("appArmorProfile") or {}).get("type", "RuntimeDefault") not in (
            "RuntimeDefault", "Localhost"):  # fmt: skip
            found.append(f"{name}: appArmorProfile")
        if security.get("runAsUser") == 0:
            found.append(f"{name}: runAsUser 0")
        if security.get("runAsNonRoot") is False:
            found.append(f"{name}: runAsNonRoot false")
        seccomp = (security.get("seccompProfile") or {}).get("type")
        if seccomp not in (None, "RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile {seccomp}")
    for name, security in settings:
        if security.get("privileged"):
            found.append(f"{name}: privileged")
        if security.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount")
        if security.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation")
        if not (context.get("runAsNonRoot") or security.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot")
        if not ((context.get("seccompProfile") or {}).get("type")
                or (security.get("seccompProfile") or {}).get("type")):  # fmt: skip
            found.append(f"{name}: no seccompProfile")
        capabilities = security.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{name}: capabilities not dropped")
        added = set(capabilities.get("add") or [])
        if not added <= {"NET_BIND_SERVICE"} or not added <= BASELINE_CAPABILITIES:
            found.append(f"{name}: capabilities added {sorted(added)}")
    if any(s["name"] not in SAFE_SYSCTLS for s in context.get("sysctls") or []):
        found.append("sysctls")
    for key, value in (template.get("metadata", {}).get("annotations") or {}).items():
        apparmor = key.startswith("container.apparmor.security.beta.kubernetes.io/")
        if apparmor and value != "runtime/default" and not value.startswith("localhost/"):
            found.append(f"annotation {key}")
    return found


def test_the_pods_with_every_pod_field_stay_within_the_restricted_profile() -> None:
    spread = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
               "whenUnsatisfiable": "DoNotSchedule"}]  # fmt: skip
    found = rendered(changed(**POD, topologySpreadConstraints=spread)).deployment
    template = found["spec"]["template"]
    assert restricted_violations(template) == []
    # the checks see what the profile refuses
    loose = copy.deepcopy(template)
    (container,) = loose["spec"]["containers"]
    container["securityContext"]["allowPrivilegeEscalation"] = True
    container["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}
    loose["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    loose["spec"]["securityContext"] = {"runAsUser": 0}
    assert restricted_violations(loose) == [
        "volume host: ['hostPath']",
        "pod: runAsUser 0",
        "worker: allowPrivilegeEscalation",
        "worker: capabilities not dropped",
        "worker: capabilities added ['NET_ADMIN']",
    ]


ZONE_AND_NODE = ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]


def spread(**spec: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = pod_of(rendered(changed(**spec)).deployment).get(
        "topologySpreadConstraints", []
    )
    return found


def test_the_pods_spread_over_zones_and_nodes_unless_the_spec_says_otherwise() -> None:
    own = {"matchLabels": render.selector_labels(BASE["metadata"]["name"])}
    default = spread()
    assert [c["topologyKey"] for c in default] == ZONE_AND_NODE
    for constraint in default:
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert constraint["labelSelector"] == own
        assert constraint["maxSkew"] == 1
    # a scale (kubectl scale, an HPA, KEDA) rolls no pod: the template does not follow replicas
    templates = [rendered(changed(replicas=n)).deployment["spec"]["template"] for n in (0, 1, 7)]
    assert templates[0] == templates[1] == templates[2]
    assert spread(autoscaling={"minReplicas": 0, "maxReplicas": 5}) == default
    assert spread(autoscaling={"minReplicas": 1, "maxReplicas": 1}) == []
    theirs = [
        {"maxSkew": 2, "topologyKey": "topology.kubernetes.io/zone",
         "whenUnsatisfiable": "DoNotSchedule", "minDomains": 3},
        {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
         "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": {"team": "mail"}},
         "matchLabelKeys": ["pod-template-hash"]},
    ]  # fmt: skip
    assert spread(topologySpreadConstraints=theirs) == [{"labelSelector": own, **theirs[0]},
                                                         theirs[1]]  # fmt: skip
    assert spread(topologySpreadConstraints=[]) == []


def test_a_pod_disruption_budget_while_it_keeps_more_than_one_pod() -> None:
    desired = rendered(BASE)  # replicas: 2
    budget = desired.pod_disruption_budget
    assert budget is not None
    kubernetes_validate.validate(budget, K8S_VERSION, strict=True)
    assert budget["spec"] == {
        "maxUnavailable": 1,
        "selector": desired.deployment["spec"]["selector"],
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }
    assert (
        budget["metadata"]["ownerReferences"] == desired.deployment["metadata"]["ownerReferences"]
    )
    assert budget in desired.manifests
    assert desired.unwanted == []
    for spec in ({"replicas": 1}, {"replicas": 0},
                 {"autoscaling": {"minReplicas": 1, "maxReplicas": 9}}):  # fmt: skip
        alone = rendered(changed(**spec))
        assert alone.pod_disruption_budget is None, spec
        assert alone.unwanted == [("PodDisruptionBudget", NAME)]
        assert len(alone.manifests) == 3
    assert rendered(changed(autoscaling={"minReplicas": 2, "maxReplicas": 9})).unwanted == []


def test_the_crd_and_the_operator_take_every_pod_field() -> None:
    resource = changed(**POD, topologySpreadConstraints=[])
    assert admit(resource) == []
    parsed = parse_spec(resource["spec"], SPEC)
    assert parsed.topology_spread_constraints == ()
    assert parse_spec(BASE["spec"], SPEC).topology_spread_constraints is None


def volume(**source: Any) -> dict[str, Any]:
    """The spec with one volume, mounted at /data."""
    return {"volumes": [{"name": "data", **source}],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}  # fmt: skip


def mounted_at(path: str) -> dict[str, Any]:
    return {**volume(emptyDir={}), "volumeMounts": [{"name": "data", "mountPath": path}]}


SHADOWS = "a mount may not be at, inside or above /etc/luaq or /tmp, the worker's own"


@pytest.mark.parametrize(
    ("spec", "crd_says", "operator_says"),
    [
        (volume(hostPath={"path": "/"}), "exactly one of configMap, secret, emptyDir or projected",
         "spec.volumes[0]: hostPath: not allowed; a volume is configMap, secret, emptyDir or "
         "projected"),
        (volume(persistentVolumeClaim={"claimName": "db"}), "a volume has exactly one",
         "spec.volumes[0]: persistentVolumeClaim: not allowed"),
        (volume(), "a volume has exactly one", "spec.volumes[0]: a volume has exactly one"),
        (volume(emptyDir={}, secret={"secretName": "s"}), "a volume has exactly one",
         "spec.volumes[0]: a volume has exactly one"),
        (volume(projected={"sources": [{"downwardAPI": {"items": []}}]}),
         "a projected source has exactly one",
         "spec.volumes[0].projected.sources[0]: downwardAPI: not allowed"),
        ({"volumes": [{"name": "config", "emptyDir": {}}]}, "config and tmp are the worker's own",
         "spec.volumes[0].name: config and tmp are the worker's own volumes"),
        ({"volumes": [{"name": "Data_1", "emptyDir": {}}]}, "volumes.0.name: 'Data_1' does not",
         "spec.volumes[0].name: String should match pattern"),
        (volume(secret={"secretName": "../../x"}), "secretName: '../../x' does not match",
         "spec.volumes[0].secret.secretName: String should match pattern"),
        (volume(configMap={"name": "c", "items": [{"key": "k", "path": "../k"}]}),
         "path: '../k' does not match", "spec.volumes[0].configMap.items[0].path: String should"),
        (volume(configMap={"name": "c", "items": [{"key": "k", "path": "/k"}]}),
         "path: '/k' does not match", "spec.volumes[0].configMap.items[0].path: String should"),
        (volume(emptyDir={"medium": "HugePages"}), "'HugePages' is not one of ['Memory']",
         "spec.volumes[0].emptyDir.medium: Input should be 'Memory'"),
        (mounted_at("/etc/luaq"), SHADOWS, f"spec.volumeMounts[0].mountPath: {SHADOWS}"),
        (mounted_at("/etc/luaq/entries.yaml"), SHADOWS, SHADOWS),
        (mounted_at("/etc"), SHADOWS, SHADOWS),
        (mounted_at("/tmp/x"), SHADOWS, SHADOWS),
        (mounted_at("/"), "mountPath: '/' does not match", "mountPath: String should match"),
        (mounted_at("/etc/../etc/luaq"), "does not match", "mountPath: String should match"),
        (mounted_at("/etc/luaq/"), "does not match", "mountPath: String should match"),
        (mounted_at("data"), "mountPath: 'data' does not match", "String should match"),
        ({"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
         "each of volumeMounts names one of volumes", "spec.volumeMounts: no volume named data"),
        ({"podLabels": {"app.kubernetes.io/name": "other"}},
         "may not set app.kubernetes.io/name or luaq.dev/queueconsumer, the operator's",
         "spec.podLabels: may not set app.kubernetes.io/name or luaq.dev/queueconsumer"),
        ({"podLabels": {"luaq.dev/queueconsumer": "other"}}, "may not set app.kubernetes.io/name",
         "spec.podLabels: may not set"),
        ({"podAnnotations": {"luaq.dev/config-checksum": "0"}},
         "may not set luaq.dev/config-checksum, the operator's",
         "spec.podAnnotations: may not set luaq.dev/config-checksum"),
        ({"podLabels": {"team": "mail & post"}}, "'mail & post' does not match",
         "spec.podLabels.team: String should match pattern"),
        ({"priorityClassName": "High Priority"}, "priorityClassName: 'High Priority' does not",
         "spec.priorityClassName: String should match pattern"),
        ({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone",
                                         "whenUnsatisfiable": "Sometimes"}]},
         "'Sometimes' is not one of", "whenUnsatisfiable: Input should be"),
        ({"topologySpreadConstraints": [{"maxSkew": 0, "topologyKey": "zone",
                                         "whenUnsatisfiable": "ScheduleAnyway"}]},
         "maxSkew: 0 is less than the minimum of 1", "maxSkew: Input should be greater"),
        ({"volumes": [{"name": f"v{n}", "emptyDir": {}} for n in range(33)]},
         "is too long", "spec.volumes: Tuple should have at most 32 items"),
    ],
    ids=["hostPath", "pvc", "no-source", "two-sources", "projected-downward-api", "own-name",
         "name", "secret-path", "item-parent", "item-absolute", "medium", "at-config", "in-config",
         "above-config", "in-tmp", "root", "dots", "trailing-slash", "relative", "no-volume",
         "selector-name", "selector-owner", "checksum", "label-value", "priority-class",
         "spread-when", "spread-skew", "too-many"],
)  # fmt: skip
def test_the_crd_and_the_operator_refuse_what_a_pod_may_not_have(
    spec: dict[str, Any], crd_says: str, operator_says: str
) -> None:
    problems = admit(changed(**spec))
    assert any(crd_says in problem for problem in problems), problems
    with pytest.raises(InvalidSpec) as raised:
        parse_spec(changed(**spec)["spec"], SPEC)
    assert operator_says in str(raised.value)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"podLabels": {"-team": "x"}}, "spec.podLabels: not a label or annotation key: '-team'"),
        ({"podAnnotations": {"a/b/c": "x"}}, "not a label or annotation key: 'a/b/c'"),
        ({"podLabels": {"x" * 254 + "/team": "mail"}}, "not a label or annotation key"),
        ({"volumes": [{"name": "a", "emptyDir": {}}, {"name": "a", "secret": {"secretName": "s"}}]},
         "spec.volumes: more than one volume named a"),
        ({**volume(emptyDir={}), "volumeMounts": [{"name": "data", "mountPath": "/d"}] * 2},
         "spec.volumeMounts: more than one mount at /d"),
    ],
    ids=["label-key", "annotation-key", "long-prefix", "volume-twice", "path-twice"],
)  # fmt: skip
def test_what_a_schema_cannot_say_of_keys_and_lists_the_operator_refuses(
    spec: dict[str, Any], problem: str
) -> None:
    """Map keys are beyond a structural schema, and the uniqueness of a list's names is the
    API server's own check (x-kubernetes-list-type: map): the operator says it first."""
    with pytest.raises(InvalidSpec) as raised:
        parse_spec(changed(**spec)["spec"], SPEC)
    assert problem in str(raised.value)
    listed = SPEC["properties"]
    assert listed["volumes"]["x-kubernetes-list-map-keys"] == ["name"]
    assert listed["volumeMounts"]["x-kubernetes-list-map-keys"] == ["mountPath"]


# An affinity of every common shape: a required and a preferred node affinity, a pod affinity
# (an empty namespaceSelector: every namespace) and a pod anti-affinity.
AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In",
                                   "values": ["amd64", "arm64"]}]},
        ]},
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "preference": {"matchExpressions": [
                {"key": "node-role.example.com/workers", "operator": "Exists"}]}},
        ],
    },
    "podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 10, "podAffinityTerm": {"topologyKey": "topology.kubernetes.io/zone",
                                           "labelSelector": {"matchLabels": {"app": "rabbitmq"}},
                                           "namespaceSelector": {}}},
    ]},
    "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchExpressions": [
            {"key": "app.kubernetes.io/name", "operator": "In", "values": [NAME]}]}},
    ]},
}  # fmt: skip
ANTI = "spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution"
NOT_KEPT = "an API server does not keep it; leave it out"


def anti(**term: Any) -> dict[str, Any]:
    return {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}


def test_an_affinity_reaches_the_pods_as_written() -> None:
    found = rendered(changed(affinity=AFFINITY)).deployment
    kubernetes_validate.validate(found, K8S_VERSION, strict=True)
    assert pod_of(found)["affinity"] == AFFINITY
    assert "affinity" not in pod_of(rendered(changed(affinity={})).deployment)


@pytest.mark.parametrize(
    ("affinity", "problem"),
    [
        ({"podAffinity": None}, f"spec.affinity.podAffinity: null: {NOT_KEPT}"),
        ({"podAfinity": {}}, "spec.affinity.podAfinity: unknown field"),
        ({"pod_affinity": {}}, "spec.affinity.pod_affinity: unknown field"),
        (anti(topologyKey="zone", labelSelecter={}), f"{ANTI}[0].labelSelecter: unknown field"),
        (anti(topologyKey="zone", namespaces=[]), f"{ANTI}[0].namespaces: []: {NOT_KEPT}"),
        (anti(topologyKey="zone", labelSelector={"matchLabels": {}}),
         f"{ANTI}[0].labelSelector.matchLabels: {{}}: {NOT_KEPT}"),
        (anti(labelSelector={}), f"{ANTI}[0].topologyKey: Field required"),
        ({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}},
         f"{ANTI}: Input should be a valid array"),
        ({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": []}}},
         "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution."
         f"nodeSelectorTerms: []: {NOT_KEPT}"),
        ({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": "50", "preference": {}}]}}, "[0].weight: Input should be a valid integer"),
        ({"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 0, "podAffinityTerm": {"topologyKey": "zone"}}]}},
         "[0].weight: Input should be greater than or equal to 1"),
        (anti(topologyKey="zone", labelSelector={"matchExpressions": [
            {"key": "tier", "operator": "Gt", "values": ["1"]}]}),
         "matchExpressions[0].operator: Input should be 'In', 'NotIn', 'Exists' or"),
    ],
    ids=["null", "misspelt", "snake-case", "misspelt-deep", "empty-list", "empty-map",
         "no-topology-key", "object-for-list", "no-terms", "weight-string", "weight-zero",
         "operator"],
)  # fmt: skip
def test_an_affinity_a_deployment_would_not_keep_as_written_is_refused(
    affinity: dict[str, Any], problem: str
) -> None:
    """`affinity` is free-form in the CRD, so the API server takes it as it is; the Deployment
    would not keep it so, and be restored on every pass: the operator refuses it."""
    assert admit(changed(affinity=affinity)) == []
    with pytest.raises(InvalidSpec) as raised:
        parse_spec(changed(affinity=affinity)["spec"], SPEC)
    assert problem in str(raised.value)


def violations(spec: dict[str, Any], bounds: Policy) -> list[str]:
    return policy.violations(parse_spec(changed(**spec)["spec"], SPEC), "luaq:1", bounds)


def test_the_admin_policy_bounds_the_secrets_and_tokens_of_volumes() -> None:
    """With --no-secret-env, a Secret reaches the pods neither in env nor in a volume; a
    projected token is one of the pods' service account, allowed as that account is."""
    secret = {"secretName": "db"}
    token = {"serviceAccountToken": {"path": "token"}}
    spec = {
        "serviceAccountName": "mailer",
        "volumes": [
            {"name": "db", "secret": secret},
            {"name": "all", "projected": {"sources": [{"configMap": {"name": "c"}},
                                                      {"secret": {"name": "db"}}, token]}},
        ],
    }  # fmt: skip
    assert violations(spec, Policy()) == []
    assert violations(spec, Policy(secret_env=False, service_accounts=("default",))) == [
        "spec.serviceAccountName: mailer is not an allowed service account",
        "spec.volumes[1].projected.sources[2].serviceAccountToken: a token of mailer, not an "
        "allowed service account",
        "spec.volumes[0].secret: Secrets are not allowed in volumes",
        "spec.volumes[1].projected.sources[1].secret: Secrets are not allowed in volumes",
    ]
    assert violations(spec, Policy(service_accounts=("mail*",))) == []


# -- through the real operator -----------------------------------------------------------------


def budget(cluster: Cluster, ns: str) -> dict[str, Any] | None:
    return cluster.get("poddisruptionbudgets", ns, NAME)


def stored(cluster: Cluster, ns: str) -> dict[str, Any]:
    found = budget(cluster, ns)
    assert found is not None
    return found


async def test_the_pod_disruption_budget_follows_the_replicas(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    await email_worker(cluster, ns)  # replicas: 2
    found, owned = budget(cluster, ns), deployment(cluster, ns)
    assert found is not None
    assert owned is not None
    assert found["spec"]["selector"] == owned["spec"]["selector"]
    assert found["spec"]["maxUnavailable"] == 1
    (reference,) = found["metadata"]["ownerReferences"]
    assert reference["uid"] == resource(cluster, ns)["metadata"]["uid"]
    await cluster.delete(POD_DISRUPTION_BUDGETS, ns, NAME)  # watched: restored at once
    await eventually(lambda: budget(cluster, ns) is not None, 20)
    await edit(cluster, ns, {"replicas": 1})
    await eventually(lambda: budget(cluster, ns) is None, 20)
    await eventually(lambda: f"deleted PodDisruptionBudget {NAME}" in cluster.messages(
        ns, "Deleted"), 20)  # fmt: skip
    await edit(
        cluster,
        ns,
        {
            "replicas": None,
            "autoscaling": {"minReplicas": 2, "maxReplicas": 3, "activationBacklog": 10**9},
        },
    )
    await eventually(lambda: budget(cluster, ns) is not None, 20)
    await edit(cluster, ns, {"autoscaling": {"minReplicas": 0}})
    await eventually(lambda: budget(cluster, ns) is None, 20)


async def test_a_budget_of_the_same_name_that_is_not_its_own_is_left_alone(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    theirs = {"metadata": {"name": NAME},
              "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "db"}}}}  # fmt: skip
    await cluster.create(POD_DISRUPTION_BUDGETS, ns, theirs)
    await apply(cluster, ns, "broker-secret.yaml")
    await cluster.create(QUEUE_CONSUMERS, ns, consumer(NAME, replicas=1))
    await eventually(lambda: deployment(cluster, ns) is not None, 20)
    await passes(cluster, operator, ns, 2)
    assert stored(cluster, ns)["spec"] == theirs["spec"]
    await edit(cluster, ns, {"replicas": 2})
    found = await degraded(cluster, ns, NAME)
    assert found["reason"] == "NameConflict"
    assert "PodDisruptionBudget email-worker exists" in found["message"]


async def test_a_refused_volume_is_degraded_naming_it_and_nothing_is_applied(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    await apply(cluster, ns, "broker-secret.yaml")
    host = {"volumes": [{"name": "host", "hostPath": {"path": "/var/run"}}]}
    await cluster.create(QUEUE_CONSUMERS, ns, consumer(NAME, **host))
    found = await degraded(cluster, ns, NAME)
    assert found["reason"] == "InvalidSpec"
    assert found["message"].startswith("spec.volumes[0]: hostPath: not allowed")
    assert versions(cluster, ns) == {}
    assert budget(cluster, ns) is None
    assert condition(cluster, ns, "Progressing")["reason"] == "NotCreated"
    await edit(cluster, ns, {"volumes": None})
    await eventually(lambda: len(versions(cluster, ns)) == 3 and budget(cluster, ns), 20)
    before = {**versions(cluster, ns), "budget": stored(cluster, ns)["metadata"]["resourceVersion"]}
    await edit(cluster, ns, {**mounted_at("/etc/luaq"), "replicas": 1})
    await settled(cluster, ns)
    assert condition(cluster, ns, "Degraded")["message"] == (
        f"spec.volumeMounts[0].mountPath: {SHADOWS}"
    )
    after = {**versions(cluster, ns), "budget": stored(cluster, ns)["metadata"]["resourceVersion"]}
    assert after == before  # the running objects, the budget too, as they were


async def test_the_pod_fields_run_as_stored_without_churn(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    """What the API server stores differently (defaultMode, a token's expirationSeconds, a
    canonical sizeLimit, no readOnly: false) is no change to restore."""
    await apply(cluster, ns, "broker-secret.yaml")
    await cluster.create(QUEUE_CONSUMERS, ns, consumer(NAME, **POD))
    await eventually(lambda: len(versions(cluster, ns)) == 3, 20)
    await settled(cluster, ns)
    stored = deployment(cluster, ns)
    assert stored is not None
    assert pod_of(stored)["volumes"][4]["emptyDir"]["sizeLimit"] == "512Mi"
    assert pod_of(stored)["containers"][0]["volumeMounts"][2:] == STORED_MOUNTS
    assert restricted_violations(stored["spec"]["template"]) == []
    before = versions(cluster, ns)
    await passes(cluster, operator, ns, 3)
    assert versions(cluster, ns) == before
    assert cluster.events(ns, "Restored") == []


async def test_an_affinity_runs_as_stored_and_one_that_would_not_be_kept_is_refused(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    """The emulator stores a Deployment's affinity as an API server does (no nulls, empty
    lists or maps, or unknown fields): what the operator takes, it finds stored as rendered."""
    await apply(cluster, ns, "broker-secret.yaml")
    await cluster.create(
        QUEUE_CONSUMERS, ns, consumer(NAME, affinity={**AFFINITY, "podAffinity": None})
    )
    found = await degraded(cluster, ns, NAME)
    assert found["reason"] == "InvalidSpec"
    assert found["message"] == f"spec.affinity.podAffinity: null: {NOT_KEPT}"
    assert versions(cluster, ns) == {}
    await edit(cluster, ns, {"affinity": AFFINITY})
    await eventually(lambda: len(versions(cluster, ns)) == 3, 20)
    await settled(cluster, ns)
    stored = deployment(cluster, ns)
    assert stored is not None
    assert pod_of(stored)["affinity"] == AFFINITY
    before = versions(cluster, ns)
    await passes(cluster, operator, ns, 3)
    assert versions(cluster, ns) == before
    await edit(cluster, ns, {"affinity": anti(topologyKey="zone", labelSelecter={})})
    await settled(cluster, ns)
    assert condition(cluster, ns, "Degraded")["message"] == (
        f"{ANTI}[0].labelSelecter: unknown field"
    )
    assert versions(cluster, ns) == before
    assert cluster.events(ns, "Restored") == []


async def test_a_secret_volume_is_not_allowed_without_secret_env(cluster: Cluster, ns: str) -> None:
    settings = replace(TEST_SETTINGS, policy=Policy(secret_env=False))
    async with running(settings) as operator:
        await apply(cluster, ns, "broker-secret.yaml")
        await cluster.create(
            QUEUE_CONSUMERS, ns, consumer(NAME, **volume(secret={"secretName": "rabbitmq"}))
        )
        found = await degraded(cluster, ns, NAME)
        assert found["reason"] == "NotAllowed"
        assert found["message"] == "spec.volumes[0].secret: Secrets are not allowed in volumes"
        assert versions(cluster, ns) == {}
        await edit(cluster, ns, volume(emptyDir={}))
        await eventually(lambda: deployment(cluster, ns) is not None, 20)
        assert reconciles(operator, "invalid") >= 1
