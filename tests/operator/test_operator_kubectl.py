"""The commands a user types, with the real kubectl against the emulated API server (which
serves no OpenAPI document, hence --validate=false)."""

from __future__ import annotations

from pathlib import Path

from conftest import eventually
from kube_fixtures import EXAMPLES, Cluster, kubectl
from luaq.operator.handlers import Operator


async def test_kubectl_apply_the_examples_and_list_them(
    cluster: Cluster, kubectl_binary: Path, ns: str
) -> None:
    out = await kubectl(
        kubectl_binary, cluster, "apply", "-n", ns, "--validate=false", "-f", str(EXAMPLES)
    )
    assert "queueconsumer.luaq.dev/email-worker created" in out
    assert "queueconsumer.luaq.dev/receipt-worker created" in out
    assert "configmap/receipts-lua created" in out
    assert "secret/rabbitmq created" in out
    rows = (await kubectl(kubectl_binary, cluster, "get", "qc", "-n", ns)).splitlines()
    assert rows[0].split() == ["NAME", "QUEUE", "REPLICAS", "READY", "BACKLOG", "AGE"]
    assert [row.split()[:2] for row in rows[1:]] == [
        ["email-worker", "app:emails"], ["receipt-worker", "app:receipts"],
    ]  # fmt: skip
    assert "email-worker" in await kubectl(kubectl_binary, cluster, "get", "luaq", "-n", ns)
    again = await kubectl(
        kubectl_binary, cluster, "apply", "-n", ns, "--validate=false", "-f", str(EXAMPLES)
    )
    assert "queueconsumer.luaq.dev/email-worker unchanged" in again


async def test_kubectl_scale_drives_the_workers(
    cluster: Cluster, operator: Operator, kubectl_binary: Path, ns: str
) -> None:
    for name in ("broker-secret.yaml", "email-worker.yaml"):
        await kubectl(
            kubectl_binary,
            cluster,
            "apply",
            "-n",
            ns,
            "--validate=false",
            "-f",
            str(EXAMPLES / name),
        )
    await eventually(lambda: cluster.get("deployments", ns, "email-worker") is not None, 20)
    out = await kubectl(
        kubectl_binary, cluster, "scale", "qc/email-worker", "--replicas=3", "-n", ns
    )
    assert "scaled" in out
    await eventually(
        lambda: (cluster.get("deployments", ns, "email-worker") or {})["spec"]["replicas"] == 3, 20
    )
    await eventually(
        lambda: (
            ((cluster.get("queueconsumers", ns, "email-worker") or {}).get("status") or {}).get(
                "desiredReplicas"
            )
            == 3
        ),
        20,
    )
    row = (
        await kubectl(kubectl_binary, cluster, "get", "qc", "email-worker", "-n", ns)
    ).splitlines()[1]
    assert row.split()[:4] == ["email-worker", "app:emails", "0", "0"]  # no pods: no controller
