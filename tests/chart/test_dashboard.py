"""The Grafana dashboard and the Prometheus alert rules of charts/luaq: the dashboard is what
dashboards/luaq_dashboard.py builds, the rules pass promtool's checks and unit tests, and every
panel query and alert expression works on a real Prometheus scraping a real worker on the real
RabbitMQ."""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from broker import AMQP_URL
from processes import Spawner, wait_until, write_app
from prometheus import Prometheus, QueryError, answers, binary, free_port, running_prometheus

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "dashboards" / "luaq_dashboard.py"
DASHBOARD = ROOT / "charts" / "luaq" / "dashboards" / "luaq.json"
RULES = ROOT / "charts" / "luaq" / "rules" / "luaq.rules.yaml"
RULE_TESTS = RULES.with_name("luaq.rules.test.yaml")

# what Grafana puts in place of $__rate_interval and the like: wide enough to span the whole test
WINDOW = "5m"
ALL = ".*"  # the "All" value of the namespace, consumer and queue variables


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
                assert 'namespace=~"$namespace"' in matchers, f"{title}: {metric} {matchers}"


def test_the_variables_select_a_prometheus_and_default_to_everything() -> None:
    found = variables(dashboard())
    assert list(found) == ["datasource", "namespace", "consumer", "queue"]
    assert (found["datasource"]["type"], found["datasource"]["query"]) == (
        "datasource",
        "prometheus",
    )
    for name in ("namespace", "consumer", "queue"):
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


def worker_entries(vhost: str) -> list[dict[str, Any]]:
    return [
        {"name": "broker", "kind": "queue.driver.amqp", "url": AMQP_URL, "vhost": vhost,
         "max_message_size": 4096},
        {"name": "jobs", "kind": "queue.queue", "driver": "broker",
         "retry": {"delay": "10ms", "max_delay": "10ms"},
         "dead_letter": {"queue": "dlq", "max_attempts": 2}},
        *({"name": name, "kind": "queue.queue", "driver": "broker"}
          for name in ("dlq", "out", "secret")),
        {"name": "may_publish", "kind": "security.policy",
         "policy": {"actions": "queue.publish", "effect": "allow"}},
        {"name": "may_publish_out", "kind": "security.policy",
         "policy": {"actions": "queue.publish.queue", "resources": "app:out", "effect": "allow"}},
        {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
         "source": HANDLER, "concurrency": 2,
         "security": {"policies": ["may_publish", "may_publish_out"]}},
    ]  # fmt: skip


@dataclass
class MetricsWorker:
    app: Path
    address: str
    spawn: Spawner

    def publish(self, job: dict[str, Any]) -> None:
        process = self.spawn("publish", "--entries", self.app, "app:jobs", json.dumps(job))
        assert process.wait(30) == 0, process.stderr


@pytest.fixture
def worker(tmp_path: Path, vhost: str) -> Iterator[MetricsWorker]:
    """`luaq run --metrics-port` on a vhost of its own, ready; stopped before the vhost goes."""
    spawn = Spawner(tmp_path)
    app = write_app(tmp_path / "app.yaml", worker_entries(vhost))
    address = f"127.0.0.1:{free_port()}"
    host, port = address.split(":")
    process = spawn("run", app, "--metrics-port", port, "--metrics-address", host)

    def ready() -> bool:
        assert process.popen.poll() is None, f"the worker exited:\n{process.stderr}"
        return answers(f"http://{address}/readyz")

    try:
        wait_until(ready, 30, "the worker ready")
        yield MetricsWorker(app, address, spawn)
    finally:
        spawn.stop_all()


def label_values(prometheus: Prometheus, query: str, values: dict[str, str]) -> list[str]:
    """A Grafana `label_values(selector, label)` variable query, as Grafana runs it."""
    match = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", query)
    assert match, f"not a label_values query: {query}"
    selector, label = match.groups()
    params = {"match[]": [expand(selector, values)]} if selector else {}
    return list(prometheus.get(f"/api/v1/label/{label}/values", **params))


def test_every_panel_and_alert_works_on_a_real_prometheus(
    tmp_path: Path, worker: MetricsWorker
) -> None:
    target = {"targets": [worker.address]}
    scrape_configs = [
        {"job_name": "luaq", "static_configs": [target]},  # a plain Prometheus: no namespace
        {"job_name": "luaq-k8s", "static_configs": [target | {"labels": {"namespace": NAMESPACE}}]},
    ]
    with running_prometheus(tmp_path / "prometheus", scrape_configs, [RULES]) as prometheus:
        wait_until(lambda: prometheus.holds("count(luaq_build_info) == 2"), 20, "a first scrape")
        for job in ({"n": 1}, {"n": 2, "fail": True}):
            worker.publish(job)
        for what, expr in SEEN.items():
            wait_until(lambda expr=expr: prometheus.holds(expr), 30, f"{what} in Prometheus")

        board = dashboard()
        everything = {"namespace": ALL, "consumer": ALL, "queue": ALL}
        found = variables(board)
        assert label_values(prometheus, found["namespace"]["query"], everything) == [NAMESPACE]
        assert label_values(prometheus, found["consumer"]["query"], everything) == ["app:worker"]
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
        for rule in prometheus.get("/api/v1/rules")["groups"][0]["rules"]:
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
