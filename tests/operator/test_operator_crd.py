"""The CRD (generated from the entries models), its CEL rules, and the manifests the operator
renders, checked against the official schemas and the CRD's own."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from broker import AMQP_URL
from kube_fixtures import K8S_VERSION, example
from luaq.operator import crd, render
from luaq.operator.resource import InvalidSpec, parse_spec
from luaq.operator.settings import OperatorSettings
from luaq.runtime.check import check
from luaq.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CRD = crd.crd()
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
SPEC = crd.spec_schema()
CEL = celpy.Environment()


def rules(schema: dict[str, Any], instance: Any, path: str = "") -> Iterator[tuple[str, str, bool]]:
    """Every CEL rule of the schema that applies to `instance`, evaluated: (path, the rule and
    its message, holds)."""
    for rule in schema.get("x-kubernetes-validations", []):
        program = CEL.program(CEL.compile(rule["rule"]))
        said = f"{rule['rule']}: {rule.get('message', '')}"
        yield path, said, bool(program.evaluate({"self": celpy.json_to_cel(instance)}))
    if isinstance(instance, dict):
        for key, value in instance.items():
            if key in schema.get("properties", {}):
                yield from rules(schema["properties"][key], value, f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                yield from rules(schema["additionalProperties"], value, f"{path}.{key}")
    elif isinstance(instance, list) and "items" in schema:
        for index, item in enumerate(instance):
            yield from rules(schema["items"], item, f"{path}[{index}]")


def admit(resource: dict[str, Any]) -> list[str]:
    """What an API server with this CRD would refuse: schema errors and failing CEL rules."""
    validator = jsonschema.Draft7Validator(SCHEMA)
    problems = [
        f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(resource)
    ]
    problems += [f"{path}: {rule}" for path, rule, holds in rules(SCHEMA, resource) if not holds]
    return problems


def queue_consumers() -> list[dict[str, Any]]:
    return [
        doc
        for name in ("email-worker.yaml", "receipt-worker.yaml")
        for doc in example(name)
        if doc["kind"] == "QueueConsumer"
    ]


def owner(resource: dict[str, Any]) -> dict[str, Any]:
    return {**resource, "metadata": {**resource["metadata"], "namespace": "shop", "uid": "u-1"}}


def test_the_committed_crd_is_the_generated_one() -> None:
    committed = (ROOT / "crds" / crd.FILENAME).read_text()
    assert committed == crd.render(), "crds/ is stale: run `make crds`"


def test_the_crd_is_a_valid_structural_crd() -> None:
    kubernetes_validate.validate(CRD, K8S_VERSION, strict=True)

    def walk(node: dict[str, Any], where: str) -> None:
        typed = (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        )
        assert typed, f"{where}: no type"
        assert "$ref" not in node, where
        assert "anyOf" not in node, where
        assert not ("properties" in node and "additionalProperties" in node), where
        for name, child in node.get("properties", {}).items():
            walk(child, f"{where}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{where}.{key}")

    walk(SCHEMA, "")


def unbounded(node: dict[str, Any]) -> bool:
    """A string, list, map or int-or-string whose size only the request's limit caps (a value
    of any type, such as a policy condition's `value`, has no size a schema could bound)."""
    if node.get("x-kubernetes-int-or-string") or node.get("type") == "string":
        return "maxLength" not in node and "enum" not in node
    if node.get("type") == "array":
        return "maxItems" not in node
    is_map = node.get("type") == "object" and "properties" not in node
    return is_map and "maxProperties" not in node


def test_every_string_list_and_map_is_bounded_and_no_cel_rule_is_costly() -> None:
    """The API server estimates each CEL rule's cost from the largest value its field may hold
    and refuses a CRD whose rule runs over an unbounded string, list or int-or-string (on
    Kubernetes <= 1.33 sized as the whole 3 MB request), or sits inside a list without
    `maxItems`. It refused an earlier CRD of luaq's with nine errors such as

        spec.validation.openAPIV3Schema.properties[spec].properties[queues].items
        .properties[retry].properties[delay].x-kubernetes-validations[0].rule: Forbidden:
        estimated rule cost exceeds budget by factor of more than 100x (try simplifying the
        rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings
        are declared)

    So every string, list and map is bounded (as kubebuilder's markers do), and a rule may only
    stand where everything above and below it is."""
    loose: list[str] = []
    costly: list[str] = []
    ruled: list[str] = []

    def walk(node: dict[str, Any], where: str, in_unbounded_list: bool) -> None:
        if node.get("x-kubernetes-validations"):
            ruled.append(where)
        if unbounded(node):
            loose.append(where)
        if node.get("x-kubernetes-validations") and (in_unbounded_list or unbounded(node)):
            costly.append(where)
        inside = in_unbounded_list or (node.get("type") == "array" and unbounded(node))
        for name, child in node.get("properties", {}).items():
            walk(child, f"{where}.{name}", inside)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{where}.{key}", inside)

    for name in ("spec", "status", "metadata"):
        walk(SCHEMA["properties"][name], name, False)
    assert loose == []
    assert costly == []
    # CEL only where a schema cannot say it: exactly one of some fields, one field within
    # another, a name or key the operator's, a path under its own
    assert ruled == [
        "spec",
        "spec.autoscaling",
        "spec.podAnnotations",
        "spec.podLabels",
        "spec.volumes.items",
        "spec.volumes.items.name",
        "spec.volumes.items.projected.sources.items",
        "spec.volumeMounts.items.mountPath",
    ]


def test_the_schema_has_the_ranges_defaults_and_enums_of_the_entries_models() -> None:
    props = SPEC["properties"]
    assert props["concurrency"] == {"type": "integer", "minimum": 1, "maximum": 1000, "default": 1}
    assert props["prefetch"]["minimum"] == 1
    assert props["prefetch"]["maximum"] == 10_000
    assert props["modules"]["items"]["enum"] == ["queue", "logger", "json", "time", "metrics"]
    queue = props["queues"]["items"]["properties"]
    assert queue["codec"]["enum"] == ["json/plain", "application/msgpack"]
    assert queue["deadLetter"]["properties"]["maxAttempts"]["default"] == 5
    retry = props["retry"]["properties"]
    assert retry["delay"]["x-kubernetes-int-or-string"]
    assert retry["delay"]["default"] == 1
    assert set(SPEC["required"]) == {"queue", "method", "broker", "queues"}
    assert props["autoscaling"]["properties"]["minReplicas"]["minimum"] == 0


@pytest.mark.parametrize("resource", queue_consumers(), ids=lambda r: r["metadata"]["name"])
def test_the_examples_pass_the_crd_schema_and_its_cel_rules(resource: dict[str, Any]) -> None:
    assert admit(resource) == []
    parse_spec(resource["spec"], SPEC)  # and the operator's validation


BASE = queue_consumers()[0]


def changed(**spec: Any) -> dict[str, Any]:
    resource = copy.deepcopy(BASE)
    for key, value in spec.items():
        if value is None:
            resource["spec"].pop(key, None)
        else:
            resource["spec"][key] = value
    return resource


@pytest.mark.parametrize(
    ("resource", "problem"),
    [
        (changed(sourceRef={"configMapName": "lua", "key": "a.lua"}), "has(self.source)"),
        (changed(source=None), "has(self.source)"),
        (changed(autoscaling={"minReplicas": 3, "maxReplicas": 2}), "minReplicas <="),
        (changed(retry={"delay": "ten seconds"}), "retry.delay: 'ten seconds' does not match"),
        (changed(retry={"delay": "10 days"}), "retry.delay: '10 days' does not match"),
        (changed(retry={"delay": -1}), "retry.delay: -1 is less than the minimum of 0"),
        (changed(retry={"delay": "1" * 33}), "is too long"),
        ({**BASE, "metadata": {"name": "Email.Worker"}}, "metadata.name"),
        ({**BASE, "metadata": {"name": "w" * 56}}, "metadata.name"),
        (changed(concurrency=0), "concurrency: 0 is less than the minimum"),
        (changed(queues=[]), "queues: [] should be non-empty"),
        (changed(broker={"urlSecretRef": {"name": "../../b/secrets/db", "key": "url"}}),
         "urlSecretRef.name: '../../b/secrets/db' does not match"),
        (changed(sourceRef={"configMapName": "a/b", "key": "x"}, source=None),
         "configMapName: 'a/b' does not match"),
        (changed(resources={"limits": {"memory": "512MB"}}), "memory: '512MB' does not match"),
        (changed(env=[{"name": "A=B", "value": "x"}]), "env.0.name: 'A=B' does not match"),
        (changed(source="x" * (256 * 1024 + 1)), "spec.source: 'xxx"),
    ],
    ids=["both-sources", "no-source", "min-over-max", "bad-duration", "days", "negative-duration",
         "long-duration", "bad-name", "long-name", "range", "no-queues", "secret-path",
         "configmap-path", "quantity", "env-name", "long-source"],
)  # fmt: skip
def test_the_crd_refuses_what_the_entries_refuse(resource: dict[str, Any], problem: str) -> None:
    problems = admit(resource)
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"sourceRef": {"configMapName": "lua", "key": "a.lua"}}, "exactly one of source"),
        ({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}, "spec.autoscaling"),
        ({"retry": {"delay": "soon"}}, "spec.retry.delay"),
        ({"concurrency": 1001}, "spec.concurrency: Input should be less than or equal to 1000"),
        (
            {"queues": [{"name": "app:emails", "deadLetter": {"maxAttempt": 1}}]},
            "maxAttempt: unknown",
        ),
        ({"idNamespace": "not valid!"}, "spec.idNamespace"),
    ],
)
def test_the_operator_validates_the_spec_with_the_same_models(
    spec: dict[str, Any], problem: str
) -> None:
    with pytest.raises(InvalidSpec) as raised:
        parse_spec({**BASE["spec"], **spec}, SPEC)
    assert problem in str(raised.value)


def test_camel_case_fields_reach_the_entries_models_and_free_maps_keep_their_keys() -> None:
    spec = parse_spec(
        {
            **BASE["spec"],
            "actor": {"id": "mailer", "meta": {"teamName": "dev"}},
            "nodeSelector": {"kubernetes.io/arch": "amd64"},
        },
        SPEC,
    )
    assert spec.queues[0].dead_letter is not None
    assert spec.queues[0].dead_letter.max_attempts == 5
    assert spec.actor is not None
    assert spec.actor.meta == {"teamName": "dev"}
    assert spec.node_selector == {"kubernetes.io/arch": "amd64"}


def rendered(resource: dict[str, Any]) -> render.Desired:
    body = owner(resource)
    spec = parse_spec(body["spec"], SPEC)
    source = spec.source or "-- from a ConfigMap"
    return render.desired(body, spec, OperatorSettings(), source, {}, 3)


@pytest.mark.parametrize("resource", queue_consumers(), ids=lambda r: r["metadata"]["name"])
def test_every_rendered_manifest_passes_kubernetes_validate_strict(
    resource: dict[str, Any],
) -> None:
    for manifest in rendered(resource).manifests:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_pod_settings_reach_the_pods() -> None:
    """What a pod would say itself (a private registry's pull secret among them), passed on."""
    settings = {
        "serviceAccountName": "mailer",
        "imagePullSecrets": [{"name": "registry"}],
        "nodeSelector": {"kubernetes.io/arch": "amd64"},
        "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
    }
    deployment = rendered(changed(**settings)).deployment
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    pod = deployment["spec"]["template"]["spec"]
    assert {key: pod[key] for key in settings} == settings
    plain = rendered(BASE).deployment
    assert not set(settings) & set(plain["spec"]["template"]["spec"])


def test_the_pods_follow_the_restricted_pod_security_profile() -> None:
    deployment = rendered(BASE).deployment
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["runAsNonRoot"]
    assert security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["terminationGracePeriodSeconds"] > render.SHUTDOWN_TIMEOUT
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_the_broker_url_stays_in_its_secret() -> None:
    resource = changed(broker={**BASE["spec"]["broker"], "tls": {
        "enabled": True, "caSecretRef": {"name": "rabbitmq-tls", "key": "ca.crt"}}})  # fmt: skip
    desired = rendered(resource)
    config_map, deployment = desired.config_map, desired.deployment
    entries = yaml.safe_load(config_map["data"][render.ENTRIES_FILE])
    driver = entries["entries"][0]
    assert driver["url"] == "${env:LUAQ_BROKER_URL}"
    assert driver["tls"] == {"enabled": True, "ca": "${env:LUAQ_BROKER_TLS_CA}"}
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LUAQ_BROKER_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "rabbitmq", "key": "url"}
    }
    assert env["LUAQ_BROKER_TLS_CA"]["valueFrom"]["secretKeyRef"]["name"] == "rabbitmq-tls"
    assert "amqp://" not in yaml.safe_dump(config_map)


def test_a_queueconsumer_may_publish_only_to_what_it_declares_unless_its_policies_say() -> None:
    config_map = rendered(BASE).config_map
    entries = yaml.safe_load(config_map["data"][render.ENTRIES_FILE])["entries"]
    policies = {e["id"]: e["policy"] for e in entries if e["kind"] == "security.policy"}
    declared = [q["name"] for q in BASE["spec"]["queues"]]
    assert policies["qc:email-worker.publish-declared"]["resources"] == declared
    rule = {"actions": ["queue.publish.queue"], "resources": ["app:receipts"], "effect": "allow"}
    own = changed(policies=[rule])
    config_map = rendered(own).config_map
    entries = yaml.safe_load(config_map["data"][render.ENTRIES_FILE])["entries"]
    assert [e["policy"] for e in entries if e["kind"] == "security.policy"] == [rule]


def test_a_code_change_changes_the_pods_checksum_and_a_replica_change_does_not() -> None:
    before = rendered(BASE).deployment
    after = rendered(changed(source=BASE["spec"]["source"] + "\n-- v2\n")).deployment
    annotation = render.CHECKSUM_ANNOTATION
    checksum = before["spec"]["template"]["metadata"]["annotations"][annotation]
    assert after["spec"]["template"]["metadata"]["annotations"][annotation] != checksum
    scaled = rendered(changed(replicas=7)).deployment
    assert scaled["spec"]["template"]["metadata"]["annotations"][annotation] == checksum


def test_a_queueconsumer_may_bear_the_name_of_its_queue(tmp_path: Path) -> None:
    """`emails` reading `app:emails`: its own entries have ids of their own (qc:emails), and
    the files pass `luaq check`'s code."""
    resource = copy.deepcopy(BASE)
    resource["metadata"]["name"] = "emails"
    config_map = rendered(resource).config_map
    for name, text in config_map["data"].items():
        (tmp_path / name).write_text(text)
    config = check([tmp_path / render.ENTRIES_FILE], Settings(), {"LUAQ_BROKER_URL": AMQP_URL})
    assert config.consumers["qc:emails"].queue == "app:emails"
