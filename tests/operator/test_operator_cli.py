"""`luaq-operator` as a pod runs it: its own process, watching one namespace, serving kopf's
liveness probe and its metrics, stopping cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO

import kubernetes_validate
import pytest
from conftest import eventually
from kube_fixtures import K8S_VERSION, Cluster, apply, namespace
from processes import answers, free_port, json_lines, reported

OPERATOR = Path(sys.executable).with_name("luaq-operator")


async def test_the_console_script_runs_the_operator_on_its_namespace(
    cluster: Cluster, ns: str, tmp_path: Path
) -> None:
    health, metrics = free_port(), free_port()
    log = (tmp_path / "operator.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        OPERATOR, "--namespace", ns, "--health-port", str(health),
        "--metrics-port", str(metrics), "--lease-namespace", ns,
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "POD_NAME": "luaq-operator-0"},
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        await eventually(lambda: answers(f"http://127.0.0.1:{health}/healthz"), 20)
        other = namespace()
        await apply(cluster, ns, "broker-secret.yaml", "email-worker.yaml")
        await apply(cluster, other, "broker-secret.yaml", "email-worker.yaml")
        await eventually(lambda: cluster.get("deployments", ns, "email-worker") is not None, 20)
        await eventually(lambda: answers(f"http://127.0.0.1:{metrics}/metrics"), 20)
        lease = cluster.get("leases", ns, "luaq-operator")
        assert lease is not None
        assert lease["spec"]["holderIdentity"] == "luaq-operator-0"
        kubernetes_validate.validate(lease, K8S_VERSION, strict=True)
        assert cluster.get("deployments", other, "email-worker") is None  # not watched
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 60)
        log.close()
    said = (tmp_path / "operator.log").read_text()
    assert code == 0, said[-3000:]
    lines = json_lines(said)  # the workers' schema, every line of it
    assert all(list(line)[:4] == ["ts", "level", "logger", "msg"] for line in lines), said
    about = [line for line in lines if line.get("queueconsumer") == "email-worker"]
    assert about, said[-3000:]
    assert {line["namespace"] for line in about} == {ns}
    assert not any({"k8s_ref", "settings", "message", "severity"} & set(line) for line in lines)
    released = cluster.get("leases", ns, "luaq-operator")
    assert released is not None
    assert released["spec"]["holderIdentity"] == ""  # handed over on the way out


async def start_replica(
    cluster: Cluster, ns: str, identity: str, metrics_port: int, log: IO[bytes]
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        OPERATOR, "--namespace", ns, "--lease-namespace", ns, "--metrics-port", str(metrics_port),
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "POD_NAME": identity},
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


async def test_a_replica_whose_metrics_port_is_taken_exits_before_it_may_lead(
    cluster: Cluster, ns: str, tmp_path: Path
) -> None:
    """Its metrics port taken, a replica says so and exits (the kubelet restarts it, and its
    pod shows why), before it touches the Lease: kopf would try its start-up again each
    minute, a replica that serves nothing, and a healthy replica beside it leads."""
    failing, healthy = tmp_path / "failing.log", tmp_path / "healthy.log"
    with socket.create_server(("127.0.0.1", 0)) as busy, failing.open("wb") as failing_log, \
            healthy.open("wb") as healthy_log:  # fmt: skip
        port = busy.getsockname()[1]
        replica = await start_replica(cluster, ns, "replica-1", port, failing_log)
        assert await asyncio.wait_for(replica.wait(), 60) == 1
        (said,) = reported(failing.read_text())
        assert said == f"--metrics-port {port}: Address already in use"
        assert cluster.get("leases", ns, "luaq-operator") is None
        replica = await start_replica(cluster, ns, "replica-0", free_port(), healthy_log)
        try:

            def holder() -> str | None:
                lease = cluster.get("leases", ns, "luaq-operator")
                return None if lease is None else lease["spec"].get("holderIdentity")

            await eventually(lambda: holder() == "replica-0", 20)
        finally:
            replica.send_signal(signal.SIGTERM)
            await asyncio.wait_for(replica.wait(), 60)


@pytest.mark.parametrize(
    ("args", "env", "error"),
    [
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
        (["--log-format", "xml"], {}, "argument --log-format: invalid choice: 'xml'"),
        ([], {"LUAQ_OPERATOR_LOG_LEVEL": "bogus"}, "argument --log-level: invalid choice"),
    ],
    ids=["unknown-option", "format-flag", "level-env"],
)
def test_a_usage_error_is_a_log_line(args: list[str], env: dict[str, str], error: str) -> None:
    done = subprocess.run(
        [str(OPERATOR), *args], env={**os.environ, **env}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    (said,) = reported(done.stderr)
    assert said.startswith(f"luaq-operator: {error}"), said


def test_the_help_names_every_flag() -> None:
    done = subprocess.run([str(OPERATOR), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for flag in ("--namespace", "--image", "--metrics-port", "--health-port", "--lease-name"):
        assert flag in done.stdout


@pytest.mark.parametrize("missing", ["kopf", "kubernetes"])
def test_without_the_operator_extra_it_says_what_to_install(tmp_path: Path, missing: str) -> None:
    # `pip install luaq` without the extra: the module cannot be imported
    (tmp_path / "sitecustomize.py").write_text(f"import sys\nsys.modules[{missing!r}] = None\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [str(OPERATOR)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert reported(done.stderr) == [  # a log line, as every line it writes
        f"{missing} is not installed; install the operator with pip install 'luaq[operator]'"
    ]
