"""`luaq-operator` and `luaq run` as the image runs them: as uid 65532, which has no passwd
entry, with no HOME, USER or LOGNAME, in a directory they cannot write, with their code not
theirs to write either, and one temporary directory writable (the image's read-only root
filesystem with /tmp mounted writable). The test runs as root and drops to that user with
util-linux's setpriv."""

from __future__ import annotations

import asyncio
import json
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from broker import AMQP_URL, queue_depth
from conftest import eventually
from kube_fixtures import Cluster, apply, namespace, pod
from luaq.operator import render
from processes import answers, free_port, summaries

IMAGE_USER = 65532  # the Dockerfile's USER
BIN = Path(sys.executable).parent
POD_NAME = "luaq-operator-7d9f8-x2x4q"


def as_image_user(*command: str) -> list[str]:
    """`command` run as the image's user. It keeps one capability, CAP_DAC_READ_SEARCH (read
    any file, search any directory): this machine's interpreter may live where that user cannot
    reach it (pyenv's under /root, 0700), where the image's is readable by all. Reading is all
    the capability grants: writing, and the passwd database, stay as in the image."""
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) runs the processes as the image's user"
    return [
        setpriv, f"--reuid={IMAGE_USER}", f"--regid={IMAGE_USER}", "--clear-groups",
        "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--no-new-privs",
        "--", *command,
    ]  # fmt: skip


@dataclass
class Running:
    process: asyncio.subprocess.Process
    out: Path
    err: Path

    def output(self) -> str:
        return f"stdout:\n{self.out.read_text()[-3000:]}\nstderr:\n{self.err.read_text()[-3000:]}"

    async def stop(self) -> int:
        """SIGTERM, as the kubelet stops a pod, and the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 60)

    def alive(self) -> None:
        """Fails at once, with the output, if the process exited (no waiting out a deadline)."""
        code = self.process.returncode
        assert code is None, f"exited with {code}\n{self.output()}"


@dataclass
class Sandbox:
    """Files the test writes for the processes (root's, readable by all, as a ConfigMap mount),
    which is also their working directory, and the one directory they can write."""

    directory: Path
    tmp: Path
    started: list[Running]

    def env(self, **variables: str) -> dict[str, str]:
        """The image's environment (the Dockerfile's ENV) and `variables`, none of the test's."""
        return {
            "PATH": f"{BIN}:/usr/bin:/bin",
            "VIRTUAL_ENV": sys.prefix,
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "TMPDIR": str(self.tmp),
            **variables,
        }

    def write(self, name: str, text: str) -> Path:
        path = self.directory / name
        path.write_text(text)
        path.chmod(0o644)
        return path

    async def start(self, name: str, *command: str, env: dict[str, str]) -> Running:
        out, err = self.directory / f"{name}.out", self.directory / f"{name}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *as_image_user(*command), cwd=self.directory, env=env,
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
            )  # fmt: skip
        running = Running(process, out, err)
        self.started.append(running)
        return running

    def writable(self, *paths: Path) -> list[str]:
        """Which of `paths` the image's user may write, as the kernel answers it."""
        script = 'for p; do test -w "$p" && echo "$p"; done; true'
        done = subprocess.run(
            as_image_user("/bin/sh", "-c", script, "sh", *map(str, paths)),
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return done.stdout.splitlines()


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with pytest.raises(KeyError):  # else the test would not be testing what the image does
        pwd.getpwuid(IMAGE_USER)
    directory = Path(tempfile.mkdtemp(prefix="luaq-nonroot-"))
    directory.chmod(0o755)
    tmp = directory / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)  # as /tmp
    box = Sandbox(directory, tmp, [])
    code = [BIN, Path(sys.prefix), Path(sysconfig.get_paths()["purelib"])]
    assert box.writable(directory, *code, tmp) == [str(tmp)], "only the temporary directory"
    try:
        yield box
    finally:
        for running in box.started:
            if running.process.returncode is None:
                running.process.kill()
        shutil.rmtree(directory)


async def test_the_operator_reconciles_as_the_image_user(
    cluster: Cluster, sandbox: Sandbox
) -> None:
    health, metrics = free_port(), free_port()
    ns = namespace()
    kubeconfig = sandbox.write("kubeconfig", cluster.kubeconfig.read_text())
    env = sandbox.env(KUBECONFIG=str(kubeconfig), POD_NAME=POD_NAME, POD_NAMESPACE=ns)
    operator = await sandbox.start(
        "operator", str(BIN / "luaq-operator"),
        f"--health-port={health}", f"--metrics-port={metrics}", env=env,
    )  # fmt: skip

    async def healthy() -> bool:
        operator.alive()
        return await answers(f"http://127.0.0.1:{health}/healthz")

    await eventually(healthy, 20)
    await apply(cluster, ns, "broker-secret.yaml", "email-worker.yaml")

    async def reconciled() -> bool:  # its Lua is checked first, in a temporary directory
        operator.alive()
        return cluster.get("deployments", ns, "email-worker") is not None

    await eventually(reconciled, 20)
    assert await answers(f"http://127.0.0.1:{metrics}/metrics")
    lease = cluster.get("leases", ns, "luaq-operator")
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == POD_NAME
    assert await operator.stop() == 0, operator.output()
    assert "Permission denied" not in operator.output()


async def test_a_worker_handles_a_message_as_the_image_user(sandbox: Sandbox, vhost: str) -> None:
    url = f"{AMQP_URL}{vhost}"
    mount = sandbox.directory / "etc-luaq"  # the rendered ConfigMap, mounted read-only
    mount.mkdir(mode=0o755)
    args, pod_env, container = pod(mount, {("rabbitmq", "url"): url})
    for file in mount.iterdir():
        file.chmod(0o644)
    # two processes: their metrics meet in a temporary directory
    env = sandbox.env(**{**pod_env, "LUAQ_PROCESSES": "2"})
    worker = await sandbox.start("worker", str(BIN / "luaq"), *args, env=env)
    entries = str(mount / render.ENTRIES_FILE)
    email = json.dumps({"to": "ada@example.com", "template": "welcome"})
    publish = await sandbox.start(
        "publish", str(BIN / "luaq"), "publish", "--entries", entries, "app:emails", email, env=env
    )
    assert await asyncio.wait_for(publish.process.wait(), 30) == 0, publish.output()

    async def one_receipt() -> bool:  # the handler's effect: a receipt nobody consumes
        worker.alive()
        ready, _ = await queue_depth("receipts", url)
        return ready == 1

    await eventually(one_receipt, 20)
    ready = container["readinessProbe"]["httpGet"]["path"]  # each process says it is ready
    await eventually(lambda: answers(f"http://127.0.0.1:{env['LUAQ_METRICS_PORT']}{ready}"), 10)
    assert await worker.stop() == 0, worker.output()
    tables = summaries(worker.out.read_text())
    assert len(tables) == 2, worker.output()
    assert sum(table["qc:email-worker"]["acked"] for table in tables) == 1, worker.output()
    assert "Permission denied" not in worker.output()
