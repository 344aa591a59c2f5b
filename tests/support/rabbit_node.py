"""A RabbitMQ node of a test's own, on free ports, for faults that need the broker reconfigured
(consumer_timeout, channel_max, alarms, policies): never the shared node on 5672. It runs from
the same installation with its own node name, data and log directories, and no plugins, and is
stopped (and its directories removed) when the test is done."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from processes import free_port, wait_until

# RabbitMQ's dead-letter worker sends again what a full queue refused after this long (3 min
# by default): short on the suite's own node (conftest.own_node), so a test sees the message
# arrive once there is room
RESEND = "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 1000}]}].\n"


@dataclass
class RabbitNode:
    name: str  # as rabbitmqctl -n takes it
    port: int
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def vhost_url(self, vhost: str, user: str = "guest:guest") -> str:
        return f"amqp://{user}@127.0.0.1:{self.port}/{quote(vhost, safe='')}"

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """rabbitmqctl against this node; fails the test when it fails."""
        done = subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.name, *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr}"
        return done.stdout

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False


@contextmanager
def rabbit_node(config: str = "", advanced: str = "") -> Iterator[RabbitNode]:
    """A started node; `config` is added to its rabbitmq.conf (new-style `key = value` lines),
    `advanced` (an Erlang term list, such as `[{rabbit, [{key, value}]}].`) is its
    advanced.config, for settings rabbitmq.conf has no key for. Its data lives in a directory
    of its own under /tmp, short enough for Erlang's paths."""
    base = Path(tempfile.mkdtemp(prefix="luaq-rmq-"))
    port, dist = free_port(), free_port()
    name = f"luaq-test-{uuid.uuid4().hex[:8]}@localhost"
    (base / "rabbitmq.conf").write_text(
        f"listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n{config}\n"
    )
    (base / "enabled_plugins").write_text("[].\n")
    (base / "advanced.config").write_text(advanced or "[].\n")
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_PID_FILE": str(base / "pid"),
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        "HOME": "/var/lib/rabbitmq",  # the shared Erlang cookie rabbitmqctl reads
    }
    (base / "rabbitmq-env.conf").write_text("")
    for directory in ("mnesia", "log"):
        (base / directory).mkdir()
    # Debian's rabbitmq-server runs the node as the rabbitmq user: its directories are its own
    for path in (base, *base.rglob("*")):
        shutil.chown(path, "rabbitmq", "rabbitmq")
    node = RabbitNode(name, port, env)
    subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True, timeout=60)
    try:
        # -detached returns at once, and await_startup fails until the node has registered
        deadline = time.monotonic() + 90
        while not node.answers():
            log = "\n".join(p.read_text()[-2000:] for p in (base / "log").glob("*.log"))
            assert time.monotonic() < deadline, f"node {name} did not start:\n{log}"
            time.sleep(0.2)
        node.ctl("await_startup", "--timeout", "60", timeout=90)
        yield node
    finally:
        subprocess.run(
            ["rabbitmqctl", "-q", "-n", name, "stop"], env=env, capture_output=True, timeout=60
        )
        shutil.rmtree(base, ignore_errors=True)


def alarms(node: RabbitNode) -> str:
    return node.ctl("eval", "rabbit_alarm:get_alarms().")


@contextmanager
def memory_alarm(node: RabbitNode) -> Iterator[None]:
    """RabbitMQ's memory alarm, for real: the high watermark set below what the node uses, and
    put back to the default (0.4), so that the node blocks no one after the test."""
    node.ctl("set_vm_memory_high_watermark", "0.0000001")
    try:
        wait_until(lambda: "memory" in alarms(node), 30, "the memory alarm")
        yield
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.4")
        wait_until(lambda: "memory" not in alarms(node), 30, "the memory alarm to clear")
