"""`luaq manifests`: a local project becomes QueueConsumers that the operator runs unchanged."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import eventually
from kube_fixtures import Cluster
from luaq.operator import crd, render
from luaq.operator.handlers import Operator
from luaq.operator.kube import CONFIG_MAPS, QUEUE_CONSUMERS, SECRETS
from luaq.operator.resource import parse_spec
from luaq.runtime import cli
from luaq.runtime.check import check
from luaq.runtime.errors import QueueError
from luaq.runtime.security import access_for
from luaq.runtime.settings import Settings
from processes import write_app
from test_operator_crd import K8S_VERSION, admit

EMAIL = Path(__file__).resolve().parent.parent / "examples" / "email" / "app.yaml"


def manifests(capsys: pytest.CaptureFixture[str], *args: str | Path) -> list[dict[str, Any]]:
    assert cli.main(["manifests", *map(str, args)]) == 0
    return list(yaml.safe_load_all(capsys.readouterr().out))


def as_files(qc: dict[str, Any], documents: list[dict[str, Any]], directory: Path) -> Path:
    """The files the operator would mount for `qc` (its source from the listed ConfigMaps)."""
    spec = parse_spec(qc["spec"], crd.spec_schema())
    source = spec.source
    if spec.source_ref is not None:
        (config_map,) = [
            d for d in documents if d["metadata"]["name"] == spec.source_ref.config_map_name
        ]
        source = config_map["data"][spec.source_ref.key]
    assert source is not None
    directory.mkdir()
    for name, text in render.config_data(qc["metadata"]["name"], spec, source).items():
        (directory / name).write_text(text)
    return directory / render.ENTRIES_FILE


def test_the_email_example_becomes_queueconsumers_with_the_same_ids(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    documents = manifests(capsys, EMAIL, "--namespace", "shop")
    kinds = [(d["kind"], d["metadata"]["name"]) for d in documents]
    assert kinds == [
        ("ConfigMap", "email-lua"), ("QueueConsumer", "email-worker"),
        ("ConfigMap", "receipts-lua"), ("QueueConsumer", "receipt-worker"),
    ]  # fmt: skip
    assert all(d["metadata"]["namespace"] == "shop" for d in documents)
    consumers = [d for d in documents if d["kind"] == "QueueConsumer"]
    for qc in consumers:
        assert admit(qc) == []
    for config_map in (d for d in documents if d["kind"] == "ConfigMap"):
        kubernetes_validate.validate(config_map, K8S_VERSION, strict=True)
    email = consumers[0]["spec"]
    assert (email["queue"], email["func"], email["concurrency"]) == (
        "app:emails",
        "app:email_handler",
        4,
    )
    assert email["broker"] == {"urlSecretRef": {"name": "luaq-broker", "key": "url"}}
    assert {q["name"] for q in email["queues"]} == {"app:emails", "app:receipts"}
    entries = as_files(consumers[0], documents, tmp_path / "email")
    worker = check([entries], Settings(), {"LUAQ_BROKER_URL": "amqp://localhost/"})
    assert "app:email_handler" in worker.handlers
    assert set(worker.config.queues) == {"app:emails", "app:receipts"}


def test_policies_and_actors_decide_the_same_on_the_cluster(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "h.lua").write_text("function handle(m) end\n")
    dev = {"field": "actor.meta.team", "operator": "eq", "value": "dev"}
    actor = {"id": "mailer", "meta": {"team": "dev"}}
    project = write_app(
        tmp_path / "app.yaml",
        [
            {"name": "broker", "kind": "queue.driver.amqp", "url": "amqp://localhost/",
             "heartbeat": "1.5s"},
            *({"name": name, "kind": "queue.queue", "driver": "broker"}
              for name in ("in", "out", "secret")),
            {"name": "allow", "kind": "security.policy", "groups": ["workers"],
             "policy": {"actions": "queue.publish*", "resources": "*", "effect": "allow"}},
            {"name": "deny", "kind": "security.policy", "groups": ["workers"],
             "policy": {"actions": "queue.publish.queue", "resources": "app:secret",
                        "effect": "deny", "conditions": [dev]}},
            {"id": "w", "kind": "queue.consumer", "queue": "in", "source": "file://h.lua",
             "method": "handle", "security": {"actor": actor, "groups": ["workers"]}},
        ],
    )  # fmt: skip
    documents = manifests(capsys, project)
    qc = next(d for d in documents if d["kind"] == "QueueConsumer")
    assert qc["spec"]["actor"] == {"id": "mailer", "meta": {"team": "dev"}}
    assert qc["spec"]["broker"]["heartbeat"] == "1.5s"
    assert admit(qc) == []
    laptop = check([project], Settings())
    cluster = check(
        [as_files(qc, documents, tmp_path / "pod")], Settings(), {"LUAQ_BROKER_URL": "amqp://x/"}
    )
    for queue in ("app:in", "app:out", "app:secret"):
        outcomes = []
        for config in (laptop.config, cluster.config):
            consumer = next(iter(config.consumers.values()))
            try:
                access_for(consumer, config).check_publish(queue, {})
                outcomes.append("allowed")
            except QueueError:
                outcomes.append("denied")
        assert outcomes[0] == outcomes[1], queue
    assert outcomes == ["denied", "denied"]  # app:secret, for team dev


def test_a_project_that_does_not_check_gives_no_manifests(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "h.lua").write_text("function handle(m) end end\n")
    project = write_app(
        tmp_path / "app.yaml",
        [{"name": "broker", "kind": "queue.driver.memory"},
         {"name": "in", "kind": "queue.queue", "driver": "broker"},
         {"id": "w", "kind": "queue.consumer", "queue": "in", "source": "file://h.lua",
          "method": "handle"}],
    )  # fmt: skip
    assert cli.main(["manifests", str(project)]) == cli.EXIT_CONFIG
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "source:" in captured.err


async def test_the_operator_runs_what_luaq_manifests_prints(
    capsys: pytest.CaptureFixture[str], cluster: Cluster, operator: Operator, ns: str
) -> None:
    documents = manifests(capsys, EMAIL, "--namespace", ns)
    secret = {"metadata": {"name": "luaq-broker"}, "stringData": {"url": "amqp://localhost/"}}
    await cluster.create(SECRETS, ns, secret)
    for document in documents:
        kind = CONFIG_MAPS if document["kind"] == "ConfigMap" else QUEUE_CONSUMERS
        await cluster.create(kind, ns, copy.deepcopy(document))
    for name in ("email-worker", "receipt-worker"):
        await eventually(lambda name=name: cluster.get("deployments", ns, name) is not None, 20)
