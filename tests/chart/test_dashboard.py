"""The Grafana dashboard and the Prometheus alert rules of charts/luaq: the dashboard is what
dashboards/luaq_dashboard.py builds, the rules pass promtool's checks and unit tests, and every
panel query and alert expression works on a real Prometheus scraping a real worker on the real
RabbitMQ."""

from __future__ import annotations

import asyncio
import difflib
import importlib.util
import json
import re
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from broker import AMQP_URL, vhost_url
from dead_letters import put_dead_letters
from luaq.operator.metrics import Metrics
from processes import Spawner, answers_now, free_port, wait_until, write_app
from prometheus import Prometheus, QueryError, binary, running_prometheus

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "dashboards" / "luaq_dashboard.py"
DASHBOARD = ROOT / "charts" / "luaq" / "dashboards" / "luaq.json"
RULES = ROOT / "charts" / "luaq" / "rules" / "luaq.rules.yaml"
RULE_TESTS = RULES.with_name("luaq.rules.test.yaml")

# of the operator's replicas, not of a QueueConsumer: its `namespace` is the operator's
OPERATOR_WIDE = {"luaq_operator_leader"}

# what Grafana puts in place of $__rate_interval and the like: wide enough to span the whole test
WINDOW = "5m"
ALL = ".*"  # the "All" value of the variables but the data source


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data, those inside collapsed rows included."""
    found = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in board["templating"]["list"]}


def all_of(board: dict[str, Any]) -> dict[str, str]:
    """Every variable at "All", as the dashboard opens."""
    return {name: ALL for name in variables(board) if name != "datasource"}


def expand(text: str, values: dict[str, str]) -> str:
    """`text` with the dashboard's variables replaced as Grafana would; fails on any other."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name.startswith("__"):
            assert name in ("__rate_interval", "__interval", "__range"), name
            return WINDOW
        assert name in values, f"unknown variable ${name} in {text!r}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def test_the_committed_dashboard_is_what_the_code_builds() -> None:
    spec = importlib.util.spec_from_file_location("luaq_dashboard", GENERATOR)
    assert spec
    assert spec.loader
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)

    built = generator.render()

    committed = DASHBOARD.read_text()
    diff = difflib.unified_diff(
        committed.splitlines(), built.splitlines(), "committed", "built", lineterm=""
    )
    assert committed == built, (
        f"{DASHBOARD.relative_to(ROOT)} is not what {GENERATOR.relative_to(ROOT)} builds: "
        "run `make dashboards` and commit the result\n" + "\n".join(list(diff)[:40])
    )


def test_every_panel_says_what_it_shows_and_in_which_unit() -> None:
    board = dashboard()
    nested = [panel for row in board["panels"] for panel in row.get("panels", [])]
    ids = [panel["id"] for panel in board["panels"] + nested]
    assert len(ids) == len(set(ids)), f"panel ids not unique: {ids}"
    for panel in panels(board):
        title = panel["title"]
        assert panel["description"].strip(), title
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        if panel["type"] != "state-timeline":  # shows states by name, not numbers
            assert panel["fieldConfig"]["defaults"].get("unit"), title
        targets = panel["targets"]
        assert targets, title
        assert len({target["refId"] for target in targets}) == len(targets), title
        for target in targets:
            assert target["legendFormat"].strip(), title
            selectors = re.findall(r"\b(luaq_\w+)(\{[^}]*\})?", target["expr"])
            assert selectors, title
            for metric, matchers in selectors:
                if metric in OPERATOR_WIDE:
                    continue
                for scope in ('namespace=~"$namespace"', 'queueconsumer=~"$queueconsumer"'):
                    assert scope in matchers, f"{title}: {metric} {matchers}"


def test_the_variables_select_a_prometheus_and_default_to_everything() -> None:
    found = variables(dashboard())
    assert list(found) == ["datasource", "namespace", "queueconsumer", "consumer", "queue"]
    assert (found["datasource"]["type"], found["datasource"]["query"]) == (
        "datasource",
        "prometheus",
    )
    for name in ("namespace", "queueconsumer", "consumer", "queue"):
        variable = found[name]
        assert variable["type"] == "query", name
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
        # `.*` also matches a series without the label: a plain Prometheus adds no namespace
        assert (variable["includeAll"], variable["allValue"]) == (True, ALL), name
        assert variable["current"]["value"] == "$__all", name


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = binary("promtool")
    for command in (["check", "rules", RULES.name], ["test", "rules", RULE_TESTS.name]):
        result = subprocess.run(
            [promtool, *command],
            cwd=RULES.parent,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, (
            f"promtool {' '.join(command)}:\n{result.stdout}{result.stderr}"
        )


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_has_a_severity_and_says_what_happened() -> None:
    rules = alert_rules()
    assert rules
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name


# -- on a real Prometheus ---------------------------------------------------------------------

NAMESPACE = "team-a"  # the label the Prometheus Operator would add to the second scrape job

# Each message does what it is asked: `fail` fails (retried once, then dead-lettered);
# otherwise the handler publishes to a queue its policies refuse, publishes a body over the
# driver's max_message_size, and publishes to `out` (acked).
HANDLER = """
function handle(job)
  if job.fail then
    return nil, "failing on purpose"
  end
  queue.publish("secret", job)
  queue.publish("out", string.rep("x", 5000))
  local _, err = queue.publish("out", job)
  if err then
    return nil, err
  end
end
"""

# what Prometheus must have scraped before the queries are evaluated: every outcome
SEEN = {
    "acked": 'luaq_messages_settled_total{outcome="ack"} > 0',
    "retried": 'luaq_messages_settled_total{outcome="retry"} > 0',
    "dead-lettered": 'luaq_messages_settled_total{outcome="dead_letter"} > 0',
    "denied": "luaq_permission_denials_total > 0",
    "a failed publish": "luaq_publish_failures_total > 0",
    "published": 'luaq_messages_published_total{queue="app:out"} > 0',
    "the dead letter in its queue": 'luaq_queue_backlog{queue="app:dlq"} > 0',
}
JOBS = ({"n": 1}, {"n": 2, "fail": True})  # what brings all of SEEN about


def worker_entries(vhost: str, prefix: str = "") -> list[dict[str, Any]]:
    """`prefix` starts the names of its queues on the broker: workers of two namespaces share
    the vhost, but no queue. The holder takes one message and keeps it: the rest wait."""
    queues = {
        "jobs": {
            "retry": {"delay": "10ms", "max_delay": "10ms"},
            "dead_letter": {"queue": "dlq", "max_attempts": 2},
        },
        **{name: {} for name in ("dlq", "out", "secret", "held")},
    }
    return [
        {"name": "broker", "kind": "queue.driver.amqp", "url": AMQP_URL, "vhost": vhost,
         "max_message_size": 4096},
        *({"name": name, "kind": "queue.queue", "driver": "broker", "queue_name": prefix + name}
          | options for name, options in queues.items()),
        {"name": "may_publish", "kind": "security.policy",
         "policy": {"actions": "queue.publish", "effect": "allow"}},
        {"name": "may_publish_out", "kind": "security.policy",
         "policy": {"actions": "queue.publish.queue", "resources": "app:out", "effect": "allow"}},
        {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
         "source": HANDLER, "concurrency": 2,
         "security": {"policies": ["may_publish", "may_publish_out"]}},
        {"id": "holder", "kind": "queue.consumer", "queue": "held", "method": "hold",
         "source": "function hold() time.sleep(3600) end", "modules": ["time"],
         "concurrency": 1, "prefetch": 1},
    ]  # fmt: skip


@pytest.fixture
def spawn(tmp_path: Path, vhost: str) -> Iterator[Spawner]:
    """What it starts is stopped before the vhost goes."""
    spawner = Spawner(tmp_path)
    yield spawner
    spawner.stop_all()


def started(spawn: Spawner, app: Path) -> str:
    """`luaq run --metrics-port` of `app`, ready: the address of its metrics."""
    address = f"127.0.0.1:{free_port()}"
    host, port = address.split(":")
    process = spawn("run", app, "--metrics-port", port, "--metrics-address", host)

    def ready() -> bool:
        assert process.popen.poll() is None, f"the worker exited:\n{process.stderr}"
        return answers_now(f"http://{address}/readyz")

    wait_until(ready, 30, "the worker ready")
    return address


def publish(spawn: Spawner, app: Path, job: dict[str, Any]) -> None:
    process = spawn("publish", "--entries", app, "app:jobs", json.dumps(job))
    assert process.wait(30) == 0, process.stderr


@contextmanager
def operator_metrics(namespaces: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The operator's metrics as its leader serves them, with an autoscaled QueueConsumer
    QUEUECONSUMER in each of `namespaces`: the scrape config of a monitor that keeps their
    labels (`honor_labels`, as the chart's)."""
    metrics = Metrics()
    metrics.leader.set(1)
    for namespace in namespaces:
        replicas = {"desiredReplicas": 1, "readyReplicas": 1}
        metrics.record(namespace, QUEUECONSUMER, "ok", replicas, (3, time.time()), 0)
    port = free_port()
    metrics.serve(port)
    try:
        target = {"targets": [f"127.0.0.1:{port}"]}
        yield {"job_name": "luaq-operator", "honor_labels": True, "static_configs": [target]}
    finally:
        metrics.stop()


def label_values(prometheus: Prometheus, query: str, values: dict[str, str]) -> list[str]:
    """A Grafana `label_values(selector, label)` variable query, as Grafana runs it."""
    match = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", query)
    assert match, f"not a label_values query: {query}"
    selector, label = match.groups()
    params = {"match[]": [expand(selector, values)]} if selector else {}
    return list(prometheus.get(f"/api/v1/label/{label}/values", **params))


def test_every_panel_and_alert_works_on_a_real_prometheus(
    tmp_path: Path, vhost: str, spawn: Spawner
) -> None:
    app = write_app(tmp_path / "app.yaml", worker_entries(vhost))
    target = {"targets": [started(spawn, app)]}
    scrape_configs = [
        {"job_name": "luaq", "static_configs": [target]},  # a plain Prometheus: no namespace
        {"job_name": "luaq-k8s", "static_configs": [target | {"labels": {"namespace": NAMESPACE}}]},
    ]
    with (
        operator_metrics([NAMESPACE]) as operator,
        running_prometheus(
            tmp_path / "prometheus", [*scrape_configs, operator], [RULES]
        ) as prometheus,
    ):
        wait_until(lambda: prometheus.holds("count(luaq_build_info) == 2"), 20, "a first scrape")
        for job in JOBS:
            publish(spawn, app, job)
        for what, expr in SEEN.items():
            wait_until(lambda expr=expr: prometheus.holds(expr), 30, f"{what} in Prometheus")

        board = dashboard()
        everything = all_of(board)
        found = variables(board)
        assert label_values(prometheus, found["namespace"]["query"], everything) == [NAMESPACE]
        assert label_values(prometheus, found["queueconsumer"]["query"], everything) == []
        assert label_values(prometheus, found["consumer"]["query"], everything) == [
            "app:holder",
            "app:worker",
        ]
        assert {"app:jobs", "app:dlq", "app:out"} <= set(
            label_values(prometheus, found["queue"]["query"], everything)
        )

        for panel in panels(board):
            for target in panel["targets"]:
                where, expr = f"{panel['title']} ({target['refId']})", target["expr"]
                for values in (everything, everything | {"namespace": NAMESPACE}):
                    # the two jobs scrape on schedules of their own: a series one of them has
                    # may be a scrape or two behind in the other
                    query = expand(expr, values)
                    wait_until(
                        lambda query=query, where=where: any(
                            is_number(series) for series in evaluate(prometheus, query, where)
                        ),
                        15,
                        f"{where} returning a number with {values}:\n{expr}",
                    )
                # and each variable the query names narrows it down
                for label, variable in set(re.findall(r'(\w+)=~"\$(\w+)"', expr)):
                    assert label == variable, f"{where}: {label} filtered by ${variable}"
                    nowhere = everything | {variable: "nowhere"}
                    assert not evaluate(prometheus, expand(expr, nowhere), where), (
                        f"{where} ignores ${variable}"
                    )

        for rule in alert_rules():
            evaluate(prometheus, rule["expr"], rule["alert"])
        wait_until(lambda: rules_evaluated(prometheus), 20, "every rule evaluated")
        for group in prometheus.get("/api/v1/rules")["groups"]:
            for rule in group["rules"]:
                assert rule["health"] == "ok", rule
        # what this traffic must set off, on both scrape jobs
        expected = {
            ("LuaqDeadLetterQueueNotEmpty", "queue", "app:dlq"),
            ("LuaqPermissionDenied", "action", "queue.publish.queue"),
            ("LuaqErrorRatioHigh", "consumer", "app:worker"),
        }
        try:
            wait_until(lambda: expected <= active_alerts(prometheus, expected), 20)
        except AssertionError:
            missing = expected - active_alerts(prometheus, expected)
            raise AssertionError(f"alerts not pending or firing: {missing}") from None


def evaluate(prometheus: Prometheus, expr: str, where: str) -> list[dict[str, Any]]:
    try:
        return prometheus.query(expr)
    except QueryError as error:
        raise AssertionError(f"{where}: {error}\n{expr}") from None


def is_number(series: dict[str, Any]) -> bool:
    return series["value"][1] not in ("NaN", "+Inf", "-Inf")


def rules_evaluated(prometheus: Prometheus) -> bool:
    groups = prometheus.get("/api/v1/rules")["groups"]
    return all(
        not rule["lastEvaluation"].startswith("0001") for group in groups for rule in group["rules"]
    )


def active_alerts(
    prometheus: Prometheus, wanted: set[tuple[str, str, str]]
) -> set[tuple[str, str, str]]:
    """Which of `wanted` (alert name, label, value) are pending or firing."""
    alerts = prometheus.get("/api/v1/alerts")["alerts"]
    return {
        (name, label, value)
        for name, label, value in wanted
        for alert in alerts
        if alert["labels"]["alertname"] == name and alert["labels"].get(label) == value
    }


# -- one QueueConsumer name in two namespaces -------------------------------------------------

QUEUECONSUMER = "email-worker"
# its pods in each namespace, two replicas in b, each a target labelled as the chart's monitors
# label it: Kubernetes SD's namespace, the pod, and the QueueConsumer's name (also the job)
PODS = {
    "a": ["email-worker-5d8c7-x2k1q"],
    "b": ["email-worker-7f9b4-q4r7m", "email-worker-7f9b4-z8m3p"],
}
HELD = {"a": 100, "b": 50}  # messages waiting in each namespace's `held` queue
# what panels draw, by title and legend, once SEEN: the totals add the namespaces up
DRAWN = {
    "Backlog": {"ready": 150, "delayed": 0},
    "Backlog, by queue": {"a/email-worker app:held": 100, "b/email-worker app:held": 50,
                          "a/email-worker app:held delayed": 0},
    "Dead letters waiting": {"dead letters": 2},
    "Dead letters waiting, by queue": {"a/email-worker app:dlq": 1, "b/email-worker app:dlq": 1},
    "Replicas": {"ready": 3, "running": 3},
    "Replicas, by QueueConsumer": {
        "a/email-worker running": 1, "a/email-worker ready": 1,
        "b/email-worker running": 2, "b/email-worker ready": 2,
    },
}  # fmt: skip


def legend(target: dict[str, Any], series: dict[str, Any]) -> str:
    """The series' name as Grafana draws it: the target's legend with the series' labels."""
    labels = series["metric"]
    return re.sub(
        r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), target["legendFormat"]
    )


def drawn(prometheus: Prometheus, panel: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    """What each of the panel's lines (or values) shows now, by legend; fails on two lines of
    the same name, which Grafana would draw as one."""
    lines: dict[str, Any] = {}
    for target in panel["targets"]:
        for series in evaluate(prometheus, expand(target["expr"], values), panel["title"]):
            name = legend(target, series)
            assert name not in lines, f"{panel['title']}: two lines named {name!r}"
            lines[name] = series
    return lines


def test_one_queueconsumer_name_in_two_namespaces_is_drawn_apart(
    tmp_path: Path, vhost: str, spawn: Spawner
) -> None:
    """Every graph draws a line per namespace and QueueConsumer, the replicas of one added up;
    the totals add the namespaces up (backlog 150, not the 100 of the larger)."""
    apps = {ns: write_app(tmp_path / f"{ns}.yaml", worker_entries(vhost, f"{ns}.")) for ns in PODS}
    targets = [
        {"targets": [started(spawn, apps[ns])],
         "labels": {"namespace": ns, "pod": pod, "queueconsumer": QUEUECONSUMER}}
        for ns, pods in PODS.items() for pod in pods
    ]  # fmt: skip
    scrape_configs = [{"job_name": QUEUECONSUMER, "static_configs": targets}]
    with (
        operator_metrics(PODS) as operator,
        running_prometheus(
            tmp_path / "prometheus", [*scrape_configs, operator], [RULES]
        ) as prometheus,
    ):
        wait_until(lambda: prometheus.holds("count(luaq_build_info) == 3"), 20, "a first scrape")
        for ns, pods in PODS.items():
            # each replica's holder takes one, the rest wait
            asyncio.run(put_dead_letters(vhost_url(vhost), f"{ns}.held", HELD[ns] + len(pods)))
            for job in JOBS:
                publish(spawn, apps[ns], job)
        for what, expr in SEEN.items():
            wait_until(
                lambda expr=expr: prometheus.holds(f"count(count by (namespace) ({expr})) == 2"),
                30,
                f"{what} in both namespaces",
            )

        board = dashboard()
        everything = all_of(board)
        found = variables(board)
        assert label_values(prometheus, found["namespace"]["query"], everything) == list(PODS)
        assert label_values(prometheus, found["queueconsumer"]["query"], everything) == [
            QUEUECONSUMER
        ]
        for panel in panels(board):
            title, lines = panel["title"], drawn(prometheus, panel, everything)
            if panel["type"] == "stat":  # the total of the namespaces: DRAWN checks a few
                continue
            assert {line["metric"].get("namespace") for line in lines.values()} == set(PODS), title
            assert {line["metric"].get("queueconsumer") for line in lines.values()} == {
                QUEUECONSUMER
            }, title
        for title, expected in DRAWN.items():
            (panel,) = [panel for panel in panels(board) if panel["title"] == title]
            wait_until_drawn(prometheus, panel, everything, expected)

        wait_until(lambda: rules_evaluated(prometheus), 20, "every rule evaluated")
        named = {("LuaqDeadLetterQueueNotEmpty", ns, QUEUECONSUMER) for ns in PODS}
        named |= {("LuaqErrorRatioHigh", ns, QUEUECONSUMER) for ns in PODS}
        try:
            wait_until(lambda: named <= alerts_by_queueconsumer(prometheus), 20)
        except AssertionError:
            raise AssertionError(
                f"alerts pending or firing: {alerts_by_queueconsumer(prometheus)}"
            ) from None


def wait_until_drawn(
    prometheus: Prometheus,
    panel: dict[str, Any],
    values: dict[str, str],
    expected: dict[str, float],
) -> None:
    """Until the panel draws the `expected` lines (among others), with these values."""

    def shown() -> dict[str, float]:
        lines = drawn(prometheus, panel, values)
        return {name: float(line["value"][1]) for name, line in lines.items()}

    try:
        wait_until(lambda: expected.items() <= shown().items(), 30)
    except AssertionError:
        raise AssertionError(f"{panel['title']} draws {shown()}, not {expected}") from None


def alerts_by_queueconsumer(prometheus: Prometheus) -> set[tuple[str, str, str]]:
    """The alerts pending or firing, as (name, namespace, queueconsumer)."""
    return {
        (labels["alertname"], labels.get("namespace", ""), labels.get("queueconsumer", ""))
        for labels in (alert["labels"] for alert in prometheus.get("/api/v1/alerts")["alerts"])
    }
