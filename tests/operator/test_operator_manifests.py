"""`luaq manifests`: a local project becomes QueueConsumers that the operator runs unchanged."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import eventually
from kube_fixtures import K8S_VERSION, Cluster
from luaq.operator import crd, render
from luaq.operator import manifests as manifests_module
from luaq.operator.handlers import Operator
from luaq.operator.kube import CONFIG_MAPS, QUEUE_CONSUMERS, SECRETS
from luaq.operator.resource import parse_spec
from luaq.runtime import cli
from luaq.runtime.check import check
from luaq.runtime.errors import QueueError
from luaq.runtime.security import access_for
from luaq.runtime.settings import Settings
from processes import write_app
from test_operator_crd import admit

EMAIL = Path(__file__).resolve().parents[2] / "examples" / "email" / "app.yaml"


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
    config = check([entries], Settings(), {"LUAQ_BROKER_URL": "amqp://localhost/"})
    assert "app:email_handler" in config.functions
    assert set(config.queues) == {"app:emails", "app:receipts"}


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
             "connection_timeout": "1.5s"},
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
    assert qc["spec"]["broker"]["connectionTimeout"] == "1.5s"
    assert admit(qc) == []
    laptop = check([project], Settings())
    pod = as_files(qc, documents, tmp_path / "pod")
    cluster = check([pod], Settings(), {"LUAQ_BROKER_URL": "amqp://x/"})
    for queue in ("app:in", "app:out", "app:secret"):
        outcomes = []
        for config in (laptop, cluster):
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


def lua(consumer_id: str) -> str:
    return f"function handle(m) return {consumer_id!r} end\n"


def project(path: Path, namespace: str, consumers: dict[str, str]) -> Path:
    """An entries file: consumer name -> its Lua file (relative to the entries file), whose
    handler returns the consumer's id, so what a pod runs shows whose code it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = [
        {"name": "broker", "kind": "queue.driver.memory"},
        {"name": "in", "kind": "queue.queue", "driver": "broker"},
    ]
    for name, source in consumers.items():
        (path.parent / source).parent.mkdir(parents=True, exist_ok=True)
        (path.parent / source).write_text(lua(f"{namespace}:{name}"))
        entries.append(
            {"id": name, "kind": "queue.consumer", "queue": "in", "source": f"file://{source}",
             "method": "handle"}
        )  # fmt: skip
    document = {"version": "1.0", "namespace": namespace, "entries": entries}
    path.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    return path


DNS_1123_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
CONFIG_MAP_KEY = r"[-._a-zA-Z0-9]+"


def valid(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The documents by `Kind/name`, after checking what an API server would: no two objects
    of a kind share a name, QueueConsumers pass the CRD, ConfigMaps the official schema and
    Kubernetes' rules for their names and keys (which that schema leaves out)."""
    by_name: dict[str, dict[str, Any]] = {}
    for document in documents:
        name = document["metadata"]["name"]
        assert f"{document['kind']}/{name}" not in by_name, f"{document['kind']} {name} twice"
        by_name[f"{document['kind']}/{name}"] = document
        if document["kind"] == "QueueConsumer":
            assert admit(document) == []
            continue
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
        assert len(name) <= 253
        assert re.fullmatch(DNS_1123_SUBDOMAIN, name), name
        for key in document["data"]:
            assert len(key) <= 253
            assert re.fullmatch(CONFIG_MAP_KEY, key), key
            assert not key.startswith(".."), key
    return by_name


def run_by(documents: list[dict[str, Any]], directory: Path) -> dict[str, str]:
    """QueueConsumer name -> the Lua its pods would run."""
    directory.mkdir()
    return {
        qc["metadata"]["name"]: (
            as_files(qc, documents, directory / qc["metadata"]["name"]).parent / render.SOURCE_FILE
        ).read_text()
        for qc in documents
        if qc["kind"] == "QueueConsumer"
    }


def test_consumers_and_files_that_share_a_name_get_their_own_objects(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Once, `mail:worker` on mail/handler.lua and `billing:worker` on billing/handler.lua
    were both QueueConsumer `worker` and ConfigMap `handler-lua`: once applied, mail-worker ran
    the billing code."""
    mail = project(tmp_path / "mail" / "app.yaml", "mail", {"worker": "handler.lua"})
    billing = project(tmp_path / "billing" / "app.yaml", "billing", {"worker": "handler.lua"})
    documents = manifests(capsys, mail, billing)
    assert [(d["kind"], d["metadata"]["name"]) for d in documents] == [
        ("ConfigMap", "mail-handler-lua"), ("QueueConsumer", "mail-worker"),
        ("ConfigMap", "billing-handler-lua"), ("QueueConsumer", "billing-worker"),
    ]  # fmt: skip
    by_name = valid(documents)
    assert run_by(documents, tmp_path / "pods") == {
        "mail-worker": lua("mail:worker"),
        "billing-worker": lua("billing:worker"),
    }
    for namespace in ("mail", "billing"):
        spec = by_name[f"QueueConsumer/{namespace}-worker"]["spec"]
        assert spec["idNamespace"] == namespace  # the same ids as on the laptop
        assert spec["sourceRef"] == {
            "configMapName": f"{namespace}-handler-lua",
            "key": "handler.lua",
        }
    # Alone, each keeps the names it had.
    assert [d["metadata"]["name"] for d in manifests(capsys, mail)] == ["handler-lua", "worker"]


def test_files_with_one_base_name_in_two_directories_keep_their_own_code(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    app = project(
        tmp_path / "app.yaml",
        "app",
        {"mail_worker": "mail/handler.lua", "billing_worker": "billing/handler.lua",
         "other": "other.lua"},
    )  # fmt: skip
    assert cli.main(["manifests", str(app)]) == 0
    captured = capsys.readouterr()
    documents = list(yaml.safe_load_all(captured.out))
    assert sorted(valid(documents)) == [
        "ConfigMap/billing-handler-lua", "ConfigMap/mail-handler-lua", "ConfigMap/other-lua",
        "QueueConsumer/billing-worker", "QueueConsumer/mail-worker", "QueueConsumer/other",
    ]  # fmt: skip
    assert run_by(documents, tmp_path / "pods") == {
        "mail-worker": lua("app:mail_worker"),
        "billing-worker": lua("app:billing_worker"),
        "other": lua("app:other"),
    }
    assert "note: mail/handler.lua is ConfigMap mail-handler-lua" in captured.err


def test_a_qualified_name_never_takes_another_objects_own_name(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`app:mail-worker` keeps `mail-worker`; `mail:worker` (a `worker`, as billing's is) takes
    a hashed name instead, and which one does not depend on the order of the files."""
    mail = project(tmp_path / "mail" / "app.yaml", "mail", {"worker": "handler.lua"})
    billing = project(tmp_path / "billing" / "app.yaml", "billing", {"worker": "handler.lua"})
    app = project(tmp_path / "app" / "app.yaml", "app", {"mail-worker": "mail-worker.lua"})
    documents = manifests(capsys, mail, billing, app)
    assert sorted(valid(documents)) == sorted(valid(manifests(capsys, app, billing, mail)))
    ran = run_by(documents, tmp_path / "pods")
    assert (ran["mail-worker"], ran["billing-worker"]) == (
        lua("app:mail-worker"),
        lua("billing:worker"),
    )
    (hashed,) = set(ran) - {"mail-worker", "billing-worker"}
    assert re.fullmatch(r"mail-worker-[0-9a-f]{8}", hashed)
    assert ran[hashed] == lua("mail:worker")


def test_names_kubernetes_would_refuse_are_made_valid_and_kept_apart(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    long_name = "a_consumer_named_at_far_greater_length_than_kubernetes_allows_" * 3
    long_file = "f" * 250 + ".lua"  # its ConfigMap (`<stem>-lua`) and key: 254 characters
    consumers = {
        "Email_Worker": "Mail Handler.lua",  # both `email-worker`, in one namespace,
        "email.worker": "mail_handler.lua",  # and both `mail-handler-lua`, in one directory
        "___": "9.lua",  # no letter or digit left
        "_9lives": "é.lua",  # a digit first; no character a ConfigMap's name or key may have
        f"{long_name}1": long_file,
        f"{long_name}2": "x.lua",
    }
    first = manifests(capsys, project(tmp_path / "app" / "app.yaml", "app", consumers))
    assert len(valid(first)) == 12
    ran = run_by(first, tmp_path / "pods")
    assert sorted(ran.values()) == sorted(lua(f"app:{name}") for name in consumers)
    for name in ran:
        assert len(name) <= 55
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
        assert len(render.Names(name).service) <= 63
    assert (ran["luaq"], ran["luaq-9lives"]) == (lua("app:___"), lua("app:_9lives"))
    assert "email-worker" not in ran
    config_maps = {d["metadata"]["name"]: d["data"] for d in first if d["kind"] == "ConfigMap"}
    assert config_maps["luaq-9-lua"] == {"9.lua": lua("app:___")}
    assert config_maps["lua"] == {"_.lua": lua("app:_9lives")}
    assert "mail-handler-lua" not in config_maps
    # The same project elsewhere gives the same objects: the hashes are of ids, and of paths
    # from the entries files' directory.
    shutil.copytree(tmp_path / "app", tmp_path / "elsewhere")
    assert manifests(capsys, tmp_path / "elsewhere" / "app.yaml") == first


@pytest.mark.parametrize("clash", ["consumers", "files"])
def test_a_clash_that_cannot_be_resolved_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clash: str
) -> None:
    """Only hashes that collide leave two objects one name; then nothing is printed."""
    monkeypatch.setattr(manifests_module, "_digest", lambda text: "0" * 8, raising=False)
    if clash == "consumers":
        app = project(tmp_path / "app.yaml", "app", {"Worker": "a.lua", "worker": "b.lua"})
        named = ["app:Worker", "app:worker", "QueueConsumer app-worker-00000000"]
    else:
        app = project(tmp_path / "app.yaml", "app", {"a": "mail/h.lua", "b": "mail_/h.lua"})
        named = [str(tmp_path / "mail" / "h.lua"), str(tmp_path / "mail_" / "h.lua"), "ConfigMap"]
    assert cli.main(["manifests", str(app)]) == cli.EXIT_CONFIG
    captured = capsys.readouterr()
    assert captured.out == ""
    problem = captured.err.splitlines()[0]
    assert all(part in problem for part in named), problem
    assert "would both be" in problem


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
