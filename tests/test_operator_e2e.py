"""End to end without a cluster: the files of a rendered ConfigMap, run by `luaq run` exactly as
the rendered Deployment runs them, with the environment its pod would get, on RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import AMQP_URL, queue_depth
from conftest import eventually
from kube_fixtures import example
from luaq.operator import crd, render
from luaq.operator.resource import parse_spec
from luaq.operator.settings import OperatorSettings
from processes import Spawner, free_port


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(tmp_path)
    yield spawner
    spawner.stop_all()


def pod(
    directory: Path, secrets: dict[tuple[str, str], str]
) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """The email-worker example rendered, its ConfigMap written to `directory`: the container's
    command (with `directory` as the mount), environment (Secrets resolved), and the container
    itself."""
    resource = next(d for d in example("email-worker.yaml") if d["kind"] == "QueueConsumer")
    owner = {**resource, "metadata": {**resource["metadata"], "namespace": "shop", "uid": "u1"}}
    spec = parse_spec(owner["spec"], crd.spec_schema())
    settings = OperatorSettings(worker_metrics_port=free_port())
    desired = render.desired(owner, spec, settings, spec.source or "", {}, 1)
    for name, text in desired.config_map["data"].items():
        (directory / name).write_text(text)
    deployment = desired.deployment
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for variable in container["env"]:
        if "valueFrom" in variable:
            ref: dict[str, Any] = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = secrets[ref["name"], ref["key"]]
        else:
            env[variable["name"]] = variable["value"]
    command = [arg.replace(render.CONFIG_DIR, str(directory)) for arg in container["command"]]
    assert command[:2] == ["luaq", "run"]
    return command[1:], env, container


async def test_the_rendered_configmap_runs_with_the_pods_environment(
    tmp_path: Path, spawn: Spawner, vhost: str
) -> None:
    url = f"{AMQP_URL}{vhost}"
    mount = tmp_path / "etc-luaq"
    mount.mkdir()
    args, env, container = pod(mount, {("rabbitmq", "url"): url})
    assert url not in "".join(path.read_text() for path in mount.iterdir())
    worker = spawn(*args, env=env)
    entries = mount / render.ENTRIES_FILE
    email = json.dumps({"to": "ada@example.com", "template": "welcome"})
    published = spawn("publish", "--entries", entries, "app:emails", email, env=env)
    assert published.wait(30) == 0, published.stderr

    async def one_receipt() -> bool:  # the handler's effect: a receipt nobody consumes
        ready, _ = await queue_depth("receipts", url)
        return ready == 1

    await eventually(one_receipt, 20)
    for probe in ("livenessProbe", "readinessProbe"):  # what the kubelet would ask, answered
        path = container[probe]["httpGet"]["path"]
        address = f"http://127.0.0.1:{env['LUAQ_METRICS_PORT']}{path}"
        assert await asyncio.to_thread(status, address) == 200, probe
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.stderr
    assert "email-worker" in worker.stdout  # the summary names the consumer
    assert url.split("@")[0] not in worker.stderr  # no password in the logs


def status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return int(answer.status)
