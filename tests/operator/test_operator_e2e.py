"""End to end without a cluster: the files of a rendered ConfigMap, run by `luaq run` exactly as
the rendered Deployment runs them, with the environment its pod would get, on RabbitMQ."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from broker import AMQP_URL, queue_depth
from conftest import eventually
from kube_fixtures import pod
from luaq.operator import render
from processes import Spawner, answers


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
        # (as the kubelet, in its period: the supervisor reads its worker's report every second)
        await eventually(lambda a=address: answers(a), 10)
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.stderr
    assert "email-worker" in worker.stdout  # the summary names the consumer
    assert url.split("@")[0] not in worker.stderr  # no password in the logs
