"""The README's shell blocks, run top to bottom in one shell as a reader types them: luaq on the
in-memory driver and on RabbitMQ, then kubectl against the emulated API server with the real
operator running. Commands that need what this machine lacks (a cluster for Helm, the chart's
objects) are each listed with the reason; a new command must be run here or listed."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from broker import delete_queues
from conftest import eventually
from kube_fixtures import Cluster
from luaq.operator.handlers import Operator

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Commands run elsewhere, by their first words; everything else in a ```sh block runs here.
ELSEWHERE = {
    "make test": "the suite itself",
    "helm": "needs a cluster; tests/chart/test_chart.py renders and lints the chart",
    "kubectl get configmap luaq-dashboard": "the chart's object (helm install)",
    "kubectl delete crd": "the emulator serves no CRD API; the CRD is checked in test_operator_crd",
}
# The queues the RabbitMQ walk uses, on the default vhost, as the README's commands name them.
WALK_QUEUES = ("emails", "receipts")


@dataclass
class Block:
    line: int
    commands: list[str]
    output: list[str]  # the ```text block right after it, if any


def blocks(text: str) -> list[Block]:
    """Every ```sh block: continuation lines joined, one command per item."""
    found: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        if lines[index].strip() != "```sh":
            index += 1
            continue
        start = index + 1
        end = lines.index("```", start)
        joined = "\n".join(lines[start:end]).replace("\\\n", " ")
        commands = [line for line in joined.splitlines() if line.strip()]
        output: list[str] = []
        after = end + 1
        while after < len(lines) and not lines[after].strip():
            after += 1
        if after < len(lines) and lines[after].strip() == "```text":
            output = lines[after + 1 : lines.index("```", after + 1)]
        found.append(Block(start, commands, output))
        index = end + 1
    return found


def elsewhere(command: str) -> str | None:
    words = shlex.split(command, comments=True)
    for prefix, reason in ELSEWHERE.items():
        if words[: len(prefix.split())] == prefix.split():
            return reason
    return None


class Shell:
    """One bash, fed block after block, as a reader's terminal: `cd`, the activated venv and
    exported variables carry over from one block to the next."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def run(self, command: str, timeout: float = 120) -> str:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        marker = "__luaq_readme_done__"
        script = f"{command}\nstatus=$?; echo; echo {marker} $status\n"
        self.process.stdin.write(script.encode())
        await self.process.stdin.drain()
        out: list[str] = []
        while True:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
            assert line, "the shell exited:\n" + "".join(out)
            text = line.decode()
            if text.startswith(marker):
                code = int(text.split()[1])
                assert code == 0, f"`{command}` exited {code}:\n{''.join(out)}"
                return "".join(out)
            out.append(text)


def test_every_command_runs_here_or_says_why_not() -> None:
    found = blocks(README.read_text())
    assert len(found) >= 6
    reasons = {elsewhere(command) for block in found for command in block.commands}
    assert reasons - {None} == set(ELSEWHERE.values()), "an ELSEWHERE entry matches nothing"


@pytest.fixture
async def walk_queues() -> None:
    await delete_queues(*WALK_QUEUES)
    yield
    await delete_queues(*WALK_QUEUES)


async def test_the_readme_walks_top_to_bottom(
    cluster: Cluster,
    operator: Operator,
    kubectl_binary: Path,
    tmp_path: Path,
    walk_queues: None,
) -> None:
    cluster.emulator.namespace_lifecycle = True  # `kubectl apply -n shop` needs namespace shop
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")},
        "PATH": f"{kubectl_binary.parent}{os.pathsep}{os.environ['PATH']}",
        "KUBECONFIG": str(cluster.kubeconfig),
        "KUBECACHEDIR": str(tmp_path / "kube-cache"),
        "HOME": str(tmp_path),
    }
    process = await asyncio.create_subprocess_exec(
        "bash", "--noprofile", "--norc", "-o", "pipefail",
        cwd=ROOT, env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    shell = Shell(process)
    outputs: dict[str, str] = {}
    try:
        for block in blocks(README.read_text()):
            for command in block.commands:
                if elsewhere(command):
                    continue
                # the walk's scratch files go to the test's own directory, not the machine's /tmp
                typed = re.sub(r"(?<![\w.])/tmp/", f"{scratch}/", command)
                outputs[command] = await shell.run(typed)
            if any(c.startswith("kubectl get qc") for c in block.commands):
                await check_the_queueconsumers(cluster, block, outputs)
            if any("luaq manifests" in c for c in block.commands):
                await eventually(lambda: deployments(cluster, "staging") == WORKERS, 30)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        await asyncio.wait_for(process.wait(), 30)

    summaries = [
        out for command, out in outputs.items() if command.startswith(("make demo", "luaq run"))
    ]
    assert len(summaries) == 3, "make demo, the example, the example on RabbitMQ"
    for summary in summaries:
        assert re.search(r"^app:email_worker\s+\d+\s+\d+", summary, re.MULTILINE), summary
    on_rabbitmq = summaries[-1]
    row = next(line for line in on_rabbitmq.splitlines() if line.startswith("app:email_worker"))
    assert row.split()[1:3] == ["1", "1"], on_rabbitmq  # the message published, handled, acked
    # the last block deleted every QueueConsumer; the operator let them go
    await eventually(lambda: not cluster.emulator.read_all("queueconsumers"), 30)


WORKERS = {"email-worker", "receipt-worker"}


def deployments(cluster: Cluster, namespace: str) -> set[str]:
    return {d["metadata"]["name"] for d in cluster.emulator.read_all("deployments", namespace)}


async def check_the_queueconsumers(cluster: Cluster, block: Block, outputs: dict[str, str]) -> None:
    """`kubectl get qc` lists what the README shows, and the operator made their Deployments."""
    await eventually(lambda: deployments(cluster, "shop") == WORKERS, 30)
    listed = next(out for command, out in outputs.items() if command.startswith("kubectl get qc"))
    rows = [line.split() for line in listed.strip().splitlines()]
    shown = [line.split() for line in block.output]
    assert rows[0] == shown[0]
    assert [row[:2] for row in rows[1:]] == [row[:2] for row in shown[1:]]
