"""Security policies: docs/lua-api.md's "Permissions", and PERMISSION_DENIED from queue.publish.

Three layers, all with real components: a table of allow/deny decisions made by `Access` over
policies validated exactly as the entries loader validates them; Lua handlers publishing through
a running worker (the `apps` harness: real entries file, Lua runtime and memory driver); and
`luaq check` rejecting malformed policies with `file: entry: field: message` lines.
"""

from __future__ import annotations

import logging
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import AppFactory
from luaq.runtime.cli import main
from luaq.runtime.entries import Operator, PolicyEntry, load
from luaq.runtime.errors import ErrorKind, QueueError
from luaq.runtime.security import Access, access_for

OPERATORS: tuple[str, ...] = typing.get_args(Operator)
CONTEXT = {"namespace": "app", "base_dir": Path(".")}

# The actor and the publish headers (the `meta.*` fields) every table case is evaluated with.
ACTOR: dict[str, Any] = {
    "id": "svc-mailer",
    "meta": {"team": "mail", "level": 3, "roles": ["sender", "reader"], "region": "eu-west"},
}
HEADERS: dict[str, Any] = {
    "priority": "high",
    "size": 10,
    "tenant": "acme",
    "owner": "svc-mailer",
    "role": "sender",
}

GENERAL = ("queue.publish", None)  # the general check: no resource
TO_OUT = ("queue.publish.queue", "app:out")  # the queue-specific check for queue app:out


# -- building policies ---------------------------------------------------------------------------

_NO_VALUE: Any = object()


def cond(
    field: str, operator: str, value: Any = _NO_VALUE, *, value_from: str | None = None
) -> dict[str, Any]:
    """A condition as written in an entries file (`value` left out when not given)."""
    condition: dict[str, Any] = {"field": field, "operator": operator}
    if value is not _NO_VALUE:
        condition["value"] = value
    if value_from is not None:
        condition["value_from"] = value_from
    return condition


def rule(
    actions: str | list[str],
    effect: str = "allow",
    resources: str | list[str] | None = None,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"actions": actions, "effect": effect}
    if resources is not None:
        body["resources"] = resources
    if conditions is not None:
        body["conditions"] = conditions
    return body


def allow_if(*conditions: dict[str, Any]) -> list[dict[str, Any]]:
    """One policy allowing everything, but only when all `conditions` hold."""
    return [rule("*", resources="*", conditions=list(conditions))]


def policy(name: str, body: dict[str, Any], groups: list[str] | None = None) -> PolicyEntry:
    """A security.policy entry validated as the loader validates one."""
    data: dict[str, Any] = {
        "id": f"app:{name}",
        "kind": "security.policy",
        "file": Path("policies.yaml"),
        "policy": body,
    }
    if groups is not None:
        data["groups"] = groups
    return PolicyEntry.model_validate(data, context=CONTEXT)


def access(rules: list[dict[str, Any]], actor: dict[str, Any] | None = None) -> Access:
    entries = [policy(f"p{index}", body) for index, body in enumerate(rules)]
    return Access(actor or ACTOR, entries, open_=False)


# -- 1. the decision table -----------------------------------------------------------------------

# operator -> (a condition that holds, one that does not), for the actor and headers above
OPERATOR_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "eq": (cond("actor.id", "eq", "svc-mailer"), cond("actor.id", "eq", "svc-other")),
    "ne": (cond("actor.meta.team", "ne", "billing"), cond("actor.meta.team", "ne", "mail")),
    "lt": (cond("meta.size", "lt", 11), cond("meta.size", "lt", 10)),
    "gt": (cond("actor.meta.level", "gt", 2), cond("actor.meta.level", "gt", 3)),
    "lte": (cond("meta.size", "lte", 10), cond("meta.size", "lte", 9)),
    "gte": (cond("actor.meta.level", "gte", 3), cond("actor.meta.level", "gte", 4)),
    "in": (
        cond("meta.priority", "in", ["high", "urgent"]),
        cond("meta.priority", "in", ["low", "normal"]),
    ),
    "nin": (
        cond("resource", "nin", ["app:other", "app:in"]),
        cond("resource", "nin", ["app:out", "app:other"]),
    ),
    "exists": (cond("meta.tenant", "exists"), cond("meta.missing", "exists")),
    "nexists": (cond("actor.meta.banned", "nexists"), cond("actor.meta.team", "nexists")),
    "contains": (
        cond("actor.meta.roles", "contains", "sender"),
        cond("actor.meta.roles", "contains", "admin"),
    ),
    "ncontains": (
        cond("meta.tenant", "ncontains", "evil"),
        cond("actor.meta.roles", "ncontains", "reader"),
    ),
    "matches": (
        cond("action", "matches", r"^queue\.publish\."),
        cond("resource", "matches", "^billing:"),
    ),
    "nmatches": (
        cond("actor.id", "nmatches", "^admin-"),
        cond("actor.meta.region", "nmatches", "^eu-"),
    ),
}

# (id, condition, holds) beyond one literal value per operator
FIELD_CASES: list[tuple[str, dict[str, Any], bool]] = [
    # value_from: compared with another field of the same request
    ("value_from-eq-holds", cond("meta.owner", "eq", value_from="actor.id"), True),
    ("value_from-eq-fails", cond("meta.tenant", "eq", value_from="actor.meta.team"), False),
    ("value_from-contains", cond("actor.meta.roles", "contains", value_from="meta.role"), True),
    ("value_from-in-fails", cond("meta.priority", "in", value_from="actor.meta.roles"), False),
    ("value_from-lt-holds", cond("actor.meta.level", "lt", value_from="meta.size"), True),
    ("value_from-lt-fails", cond("meta.size", "lt", value_from="actor.meta.level"), False),
    ("value_from-missing", cond("meta.owner", "eq", value_from="actor.meta.nobody"), False),
    # every field the conditions may name
    ("actor.id", cond("actor.id", "eq", "svc-mailer"), True),
    ("actor.meta", cond("actor.meta.region", "eq", "eu-west"), True),
    ("actor.meta-other", cond("actor.meta.region", "eq", "us-east"), False),
    ("action-holds", cond("action", "eq", "queue.publish.queue"), True),
    ("action-fails", cond("action", "eq", "queue.publish"), False),
    ("resource-holds", cond("resource", "eq", "app:out"), True),
    ("resource-fails", cond("resource", "eq", "app:other"), False),
    ("meta-is-the-headers", cond("meta.priority", "eq", "high"), True),
    ("meta-other-value", cond("meta.priority", "eq", "low"), False),
    ("meta-number", cond("meta.size", "eq", 10), True),
    # absent fields and values that cannot be compared never satisfy a positive test
    ("missing-header-eq", cond("meta.absent", "eq", "x"), False),
    ("missing-header-lt", cond("meta.absent", "lt", 5), False),
    ("missing-actor-meta", cond("actor.meta.absent", "in", ["x"]), False),
    ("text-against-number", cond("meta.size", "lt", "11"), False),
]

CASES: list[Any] = []
for operator, (holding, failing) in OPERATOR_CASES.items():
    CASES.append(pytest.param(allow_if(holding), TO_OUT, True, id=f"{operator}-holds"))
    CASES.append(pytest.param(allow_if(failing), TO_OUT, False, id=f"{operator}-fails"))
for case_id, condition, holds_ in FIELD_CASES:
    CASES.append(pytest.param(allow_if(condition), TO_OUT, holds_, id=case_id))
CASES += [
    # conditions are all required
    pytest.param(
        allow_if(cond("actor.id", "eq", "svc-mailer"), cond("meta.priority", "eq", "high")),
        TO_OUT,
        True,
        id="all-conditions-hold",
    ),
    pytest.param(
        allow_if(cond("actor.id", "eq", "svc-mailer"), cond("meta.priority", "eq", "low")),
        TO_OUT,
        False,
        id="one-condition-fails",
    ),
    # globs in actions
    pytest.param([rule("queue.*")], GENERAL, True, id="actions-queue.*-general"),
    pytest.param([rule("queue.*")], TO_OUT, True, id="actions-queue.*-queue"),
    pytest.param([rule("*")], GENERAL, True, id="actions-*-general"),
    pytest.param([rule("*")], TO_OUT, True, id="actions-*-queue"),
    pytest.param([rule("queue.publish")], TO_OUT, False, id="actions-exact-not-a-prefix"),
    pytest.param([rule("queue.publish.*")], TO_OUT, True, id="actions-publish.*-queue"),
    pytest.param([rule("queue.publish.*")], GENERAL, False, id="actions-publish.*-general"),
    pytest.param([rule("queue.info")], TO_OUT, False, id="actions-other-action"),
    pytest.param(
        [rule(["queue.info", "queue.publish.queue"])], TO_OUT, True, id="actions-list-listed"
    ),
    pytest.param(
        [rule(["queue.info", "queue.publish.queue"])], GENERAL, False, id="actions-list-unlisted"
    ),
    # globs in resources
    pytest.param([rule("*", resources="app:*")], TO_OUT, True, id="resources-app:*"),
    pytest.param(
        [rule("*", resources="app:*")],
        ("queue.publish.queue", "billing:out"),
        False,
        id="resources-app:*-other-namespace",
    ),
    pytest.param([rule("*", resources="app:o*")], TO_OUT, True, id="resources-app:o*"),
    pytest.param(
        [rule("*", resources="app:o*")],
        ("queue.publish.queue", "app:in"),
        False,
        id="resources-app:o*-unmatched",
    ),
    pytest.param(
        [rule("*", resources=["app:out", "app:other"])],
        ("queue.publish.queue", "app:other"),
        True,
        id="resources-list-listed",
    ),
    pytest.param(
        [rule("*", resources=["app:out", "app:other"])],
        ("queue.publish.queue", "app:in"),
        False,
        id="resources-list-unlisted",
    ),
    pytest.param([rule("*", resources="out")], TO_OUT, False, id="resources-are-full-ids"),
    # the general check has no resource: only policies for "*" apply to it
    pytest.param([rule("queue.publish", resources="*")], GENERAL, True, id="general-*"),
    pytest.param([rule("queue.publish")], GENERAL, True, id="general-default-resources"),
    pytest.param(
        [rule("queue.publish", resources=["app:out", "*"])], GENERAL, True, id="general-list-*"
    ),
    pytest.param(
        [rule("queue.publish", resources="app:*")], GENERAL, False, id="general-glob-not-*"
    ),
    pytest.param(
        [rule("queue.publish", resources="app:out")], GENERAL, False, id="general-named-queue"
    ),
    pytest.param(
        [rule("*"), rule("*", "deny", resources="app:*")],
        GENERAL,
        True,
        id="general-deny-for-queues-only",
    ),
    pytest.param(
        allow_if(cond("resource", "nexists")), GENERAL, True, id="general-resource-nexists"
    ),
    pytest.param(
        allow_if(cond("resource", "exists")), GENERAL, False, id="general-resource-not-exists"
    ),
    # deny beats allow, whatever the order of the policies
    pytest.param(
        [rule("*"), rule("queue.publish.queue", "deny", resources="app:out")],
        TO_OUT,
        False,
        id="deny-after-allow",
    ),
    pytest.param(
        [rule("queue.publish.queue", "deny", resources="app:out"), rule("*")],
        TO_OUT,
        False,
        id="deny-before-allow",
    ),
    pytest.param(
        [rule("*"), rule("queue.publish.queue", "deny", resources="app:out")],
        ("queue.publish.queue", "app:other"),
        True,
        id="deny-elsewhere-allow-here",
    ),
    pytest.param(
        [rule("queue.publish.queue", resources="app:out"), rule("queue.*", "deny", "app:*")],
        TO_OUT,
        False,
        id="deny-glob-over-exact-allow",
    ),
    pytest.param(
        [rule("*"), rule("queue.publish", "deny")], GENERAL, False, id="deny-general-check"
    ),
    pytest.param(
        [rule("*"), rule("queue.publish", "deny")], TO_OUT, True, id="deny-general-not-queue"
    ),
    pytest.param(
        [rule("*"), rule("*", "deny", conditions=[cond("meta.priority", "eq", "high")])],
        TO_OUT,
        False,
        id="deny-condition-holds",
    ),
    pytest.param(
        [rule("*"), rule("*", "deny", conditions=[cond("meta.priority", "eq", "low")])],
        TO_OUT,
        True,
        id="deny-condition-fails",
    ),
    # once a policy applies, what nothing allows is denied
    pytest.param([rule("queue.info")], GENERAL, False, id="nothing-allows-general"),
    pytest.param(
        [rule("queue.publish.queue", "deny", resources="app:other")],
        TO_OUT,
        False,
        id="only-unrelated-deny",
    ),
    pytest.param(
        [rule("queue.publish.queue", resources="app:other")],
        TO_OUT,
        False,
        id="allow-for-another-queue",
    ),
]


def test_table_covers_every_operator() -> None:
    assert set(OPERATOR_CASES) == set(OPERATORS)
    assert len(OPERATORS) == 14


@pytest.mark.parametrize(("rules", "request_", "allowed"), CASES)
def test_decision(
    rules: list[dict[str, Any]], request_: tuple[str, str | None], allowed: bool
) -> None:
    action, resource = request_
    decision = access(rules).check(action, resource, HEADERS)
    assert decision.allowed is allowed, decision.reason


def test_a_deny_names_the_denying_policy_and_no_allow_says_so() -> None:
    denied = access([rule("*"), rule("*", "deny", resources="app:out")]).check(*TO_OUT, HEADERS)
    assert (denied.allowed, "app:p1" in denied.reason) == (False, True), denied.reason
    nothing = access([rule("queue.info")]).check(*TO_OUT, HEADERS)
    assert nothing.allowed is False
    assert "app:p0" not in nothing.reason
    allowed = access([rule("queue.info"), rule("queue.*")]).check(*TO_OUT, HEADERS)
    assert (allowed.allowed, "app:p1" in allowed.reason) == (True, True), allowed.reason


def test_matches_against_a_field_that_is_not_a_regex_does_not_hold() -> None:
    """`value_from` regexes are only known at check time: a bad one must not crash the check."""
    rules = allow_if(cond("actor.id", "matches", value_from="meta.pattern"))
    decision = access(rules).check(*TO_OUT, {**HEADERS, "pattern": "("})
    assert decision.allowed is False


class RecordingHeaders(dict[str, Any]):
    """Publish headers that remember which of them a policy condition looked at."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[str] = []

    def __contains__(self, key: object) -> bool:
        self.asked.append(str(key))
        return super().__contains__(key)

    def __getitem__(self, key: str) -> Any:
        self.asked.append(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("general", ["allow", "deny", "missing"])
def test_check_publish_consults_the_queue_check_only_after_the_general_one_allows(
    general: str,
) -> None:
    queue_rule = rule(
        "queue.publish.queue", resources="app:out", conditions=[cond("meta.queue_probe", "exists")]
    )
    rules = [queue_rule]
    if general != "missing":
        rules.append(rule("queue.publish", general))
    headers = RecordingHeaders(queue_probe="yes")
    checks = access(rules)
    if general == "allow":
        checks.check_publish("app:out", headers)
        assert "queue_probe" in headers.asked  # the probe does see the queue check
        return
    with pytest.raises(QueueError) as raised:
        checks.check_publish("app:out", headers)
    assert raised.value.kind is ErrorKind.PERMISSION_DENIED
    assert raised.value.retryable is False
    assert "queue.publish.queue" not in raised.value.message
    assert re.search(r"\bqueue\.publish\b", raised.value.message), raised.value.message
    assert headers.asked == []


def test_check_publish_denied_by_the_queue_check_names_it_the_queue_and_the_actor() -> None:
    checks = access([rule("queue.publish"), rule("queue.publish.queue", resources="app:other")])
    checks.check_publish("app:other", HEADERS)
    with pytest.raises(QueueError) as raised:
        checks.check_publish("app:out", HEADERS)
    error = raised.value
    assert (error.kind, error.retryable) == (ErrorKind.PERMISSION_DENIED, False)
    assert "queue.publish.queue" in error.message
    assert "app:out" in error.message
    assert "svc-mailer" in error.message


def test_access_for_selects_policies_by_id_and_by_group(tmp_path: Path) -> None:
    def consumer(name: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "kind": "queue.consumer", "queue": "jobs", "func": "handler", **extra}

    document = {
        "version": "1.0",
        "namespace": "app",
        "entries": [
            {"name": "broker", "kind": "queue.driver.memory"},
            {"name": "jobs", "kind": "queue.queue", "driver": "broker"},
            {"name": "handler", "kind": "function.lua", "source": "x = 1", "method": "handle"},
            {"name": "named", "kind": "security.policy", "policy": rule("queue.publish")},
            {
                "name": "grouped",
                "kind": "security.policy",
                "policy": rule("queue.*", "deny"),
                "groups": ["senders", "admins"],
            },
            {
                "name": "other_group",
                "kind": "security.policy",
                "policy": rule("*"),
                "groups": ["x"],
            },
            consumer("by_id", security={"policies": ["named"]}),
            consumer("by_full_id", security={"policies": ["app:named"]}),
            consumer("by_group", security={"groups": ["senders"]}),
            consumer(
                "both",
                security={
                    "actor": {"id": "mailer", "meta": {"team": "mail"}},
                    "policies": ["named"],
                    "groups": ["admins"],
                },
            ),
            consumer("unguarded"),
            consumer("unknown_group", security={"groups": ["nobody"]}),
        ],
    }
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    config = load([path])
    assert config.problems == []
    found = {
        name: access_for(config.consumers[f"app:{name}"], config)
        for name in ("by_id", "by_full_id", "by_group", "both", "unguarded", "unknown_group")
    }
    chosen = {name: sorted(p.id for p in a.policies) for name, a in found.items()}
    assert chosen == {
        "by_id": ["app:named"],
        "by_full_id": ["app:named"],
        "by_group": ["app:grouped"],
        "both": ["app:grouped", "app:named"],
        "unguarded": [],
        "unknown_group": [],
    }
    assert {name: a.open for name, a in found.items()} == {
        "by_id": False,
        "by_full_id": False,
        "by_group": False,
        "both": False,
        "unguarded": True,
        "unknown_group": True,
    }
    assert found["both"].actor == {"id": "mailer", "meta": {"team": "mail"}}
    assert found["unguarded"].check(*TO_OUT).allowed is True
    assert found["by_group"].check(*GENERAL).allowed is False  # its only policy denies


# -- 2. through Lua handlers ---------------------------------------------------------------------

# `report(label, queue.publish(...))` logs what a publish returned, naming an error's kind by the
# `errors` constant it equals; the log is the handler's only channel that policies cannot deny.
PRELUDE = r"""
local KIND_NAMES = {}
for _, name in ipairs({"INVALID", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
    "UNAVAILABLE", "INTERNAL", "CANCELED", "CONFLICT", "TIMEOUT", "RATE_LIMITED", "UNKNOWN"}) do
  if errors[name] ~= nil then KIND_NAMES[errors[name]] = name end
end

function report(label, ok, err)
  local fields = {label = label, ok = tostring(ok), ok_type = type(ok)}
  if err ~= nil then
    fields.kind = KIND_NAMES[err:kind()] or ("not a constant: " .. tostring(err:kind()))
    fields.retryable = err:retryable()
    fields.message = err:message()
  end
  logger:info("publish outcome", fields)
end
"""


def policy_entry(
    name: str, body: dict[str, Any], groups: list[str] | None = None
) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "kind": "security.policy", "policy": body}
    if groups is not None:
        entry["groups"] = groups
    return entry


POLICIES = [
    policy_entry("may_publish", rule("queue.publish", "allow", "*")),
    policy_entry("may_out", rule("queue.publish.queue", "allow", "app:out")),
]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="luaq.lua")
    caplog.set_level(logging.INFO, logger="luaq.worker")
    return caplog


def outcomes(caplog: pytest.LogCaptureFixture) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for record in caplog.records:
        if record.name == "luaq.lua" and record.getMessage() == "publish outcome":
            fields: dict[str, Any] = record.fields  # type: ignore[attr-defined]
            assert fields["label"] not in found, f"reported twice: {fields}"
            found[fields["label"]] = fields
    return found


def worker_records(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "luaq.worker" and r.getMessage() == message]


def assert_published(outcome: dict[str, Any]) -> None:
    assert (outcome["ok_type"], outcome.get("kind")) == ("boolean", None), outcome


def assert_denied(outcome: dict[str, Any]) -> str:
    """`nil, err` with kind PERMISSION_DENIED, not retryable; returns the error's message."""
    assert outcome["ok_type"] == "nil", outcome
    assert outcome["kind"] == "PERMISSION_DENIED", outcome
    assert outcome["retryable"] is False, outcome
    message: str = outcome["message"]
    assert message, outcome
    return message


def names_general_check(message: str) -> bool:
    return "queue.publish.queue" not in message and bool(re.search(r"\bqueue\.publish\b", message))


async def test_publish_allowed_by_both_checks_reaches_out(
    apps: AppFactory, logs: pytest.LogCaptureFixture
) -> None:
    app, out = await apps.run(
        PRELUDE + 'function handle(p) report("out-" .. p, queue.publish("out", {n = p})) end',
        [1, 2],
        security={"policies": ["may_publish", "may_out"]},
        extra_entries=POLICIES,
    )
    assert sorted(m.data["n"] for m in out) == [1, 2]
    found = outcomes(logs)
    assert sorted(found) == ["out-1", "out-2"]
    for outcome in found.values():
        assert_published(outcome)
    assert app.consumer.stats.denied == 0
    assert app.consumer.stats.acked == 2
    assert worker_records(logs, "publish denied") == []


DENIALS = [
    pytest.param(
        [
            policy_entry("no_publish", rule("queue.publish", "deny")),
            policy_entry("may_out", rule("queue.publish.queue", "allow", "app:out")),
        ],
        "general",
        id="general-denied",
    ),
    pytest.param(
        [policy_entry("may_out", rule("queue.publish.queue", "allow", "app:out"))],
        "general",
        id="general-not-allowed",
    ),
    pytest.param(
        [
            policy_entry("app_queues", rule("queue.publish", "allow", "app:*")),
            policy_entry("may_out", rule("queue.publish.queue", "allow", "app:out")),
        ],
        "general",
        id="general-allow-for-queues-does-not-apply",
    ),
    # both checks would deny: what is reported is the general one, the first and only consulted
    pytest.param(
        [policy_entry("deny_all", rule("*", "deny", "*"))],
        "general",
        id="both-denied",
    ),
    pytest.param(
        [policy_entry("info_only", rule("queue.info", "allow", "*"))],
        "general",
        id="both-not-allowed",
    ),
    pytest.param(
        [
            policy_entry("may_publish", rule("queue.publish", "allow", "*")),
            policy_entry("may_other", rule("queue.publish.queue", "allow", "app:other")),
        ],
        "queue",
        id="queue-not-allowed",
    ),
    pytest.param(
        [
            policy_entry("may_all", rule("*", "allow", "*")),
            policy_entry("not_out", rule("queue.publish.queue", "deny", "app:out")),
        ],
        "queue",
        id="queue-denied",
    ),
]


@pytest.mark.parametrize(("policies", "check"), DENIALS)
async def test_denied_publish(
    apps: AppFactory,
    logs: pytest.LogCaptureFixture,
    policies: list[dict[str, Any]],
    check: str,
) -> None:
    ids = [entry["name"] for entry in policies]
    app, out = await apps.run(
        PRELUDE + 'function handle(p) report("out", queue.publish("out", {n = p})) end',
        ["go"],
        security={"policies": ids},
        extra_entries=policies,
    )
    message = assert_denied(outcomes(logs)["out"])
    if check == "general":
        # the general check denied, and the queue-specific one was never asked
        assert names_general_check(message), message
    else:
        assert "queue.publish.queue" in message, message
        assert "app:out" in message, message
    assert out == []
    assert await app.info("out") == (0, 0)
    assert app.consumer.stats.denied == 1
    assert (app.consumer.stats.acked, app.consumer.stats.failed) == (1, 0)
    denied = worker_records(logs, "publish denied")
    assert len(denied) == 1
    assert denied[0].levelno == logging.WARNING
    assert getattr(denied[0], "consumer", None) == "app:worker"
    assert getattr(denied[0], "error", None) == message


async def test_every_denial_is_counted_and_the_handler_goes_on(
    apps: AppFactory, logs: pytest.LogCaptureFixture
) -> None:
    app, out = await apps.run(
        PRELUDE
        + """
        function handle(p)
          report("other-" .. p, queue.publish("other", p))
          report("out-" .. p, queue.publish("out", p))
        end
        """,
        ["a", "b", "c"],
        security={"policies": ["may_publish", "may_out"]},
        extra_entries=POLICIES,
    )
    found = outcomes(logs)
    for name in ("a", "b", "c"):
        assert_published(found[f"out-{name}"])
        assert "app:other" in assert_denied(found[f"other-{name}"])
    assert sorted(m.data for m in out) == ["a", "b", "c"]
    assert await app.drain("other") == []
    assert app.consumer.stats.denied == 3
    assert len(worker_records(logs, "publish denied")) == 3


GROUPED = [
    policy_entry("may_publish", rule("queue.publish", "allow", "*"), groups=["senders"]),
    policy_entry("may_out", rule("queue.publish.queue", "allow", "app:out"), groups=["senders"]),
    policy_entry("admin_all", rule("*", "allow", "*"), groups=["admins"]),
]


@pytest.mark.parametrize(
    "security",
    [
        pytest.param({"groups": ["senders"]}, id="groups"),
        pytest.param({"groups": ["senders", "readers"]}, id="groups-one-matching"),
        pytest.param({"policies": ["may_publish", "may_out"]}, id="policies"),
        pytest.param({"policies": ["app:may_publish", "app:may_out"]}, id="policies-full-ids"),
        pytest.param({"policies": ["may_publish"], "groups": ["senders"]}, id="both"),
    ],
)
async def test_policies_reached_through_groups_and_ids(
    apps: AppFactory, logs: pytest.LogCaptureFixture, security: dict[str, Any]
) -> None:
    app, out = await apps.run(
        PRELUDE
        + """
        function handle(p)
          report("other", queue.publish("other", p))
          report("out", queue.publish("out", p))
        end
        """,
        ["go"],
        security=security,
        extra_entries=GROUPED,
    )
    found = outcomes(logs)
    assert_published(found["out"])
    # the admins' allow-all does not reach this actor: `other` stays closed
    assert "app:other" in assert_denied(found["other"])
    assert [m.data for m in out] == ["go"]
    assert app.consumer.stats.denied == 1


ACTOR_POLICY = [
    policy_entry(
        "mail_team",
        rule(
            "queue.*",
            "allow",
            "*",
            [cond("actor.id", "eq", "mailer"), cond("actor.meta.team", "in", ["mail", "ops"])],
        ),
    )
]


@pytest.mark.parametrize(
    ("actor", "allowed"),
    [
        pytest.param({"id": "mailer", "meta": {"team": "mail"}}, True, id="matching"),
        pytest.param({"id": "mailer", "meta": {"team": "ops"}}, True, id="other-listed-team"),
        pytest.param({"id": "mailer", "meta": {"team": "billing"}}, False, id="other-team"),
        pytest.param({"id": "mailer"}, False, id="no-meta"),
        pytest.param({"id": "biller", "meta": {"team": "mail"}}, False, id="other-id"),
    ],
)
async def test_actor_from_the_consumer_entry_is_used_in_conditions(
    apps: AppFactory, logs: pytest.LogCaptureFixture, actor: dict[str, Any], allowed: bool
) -> None:
    app, out = await apps.run(
        PRELUDE + 'function handle(p) report("out", queue.publish("out", p)) end',
        ["go"],
        security={"actor": actor, "policies": ["mail_team"]},
        extra_entries=ACTOR_POLICY,
    )
    outcome = outcomes(logs)["out"]
    if allowed:
        assert_published(outcome)
        assert [m.data for m in out] == ["go"]
    else:
        assert actor["id"] in assert_denied(outcome)
        assert out == []
    assert app.consumer.stats.denied == (0 if allowed else 1)


async def test_without_an_actor_the_consumer_is_the_actor(
    apps: AppFactory, logs: pytest.LogCaptureFixture
) -> None:
    _, out = await apps.run(
        PRELUDE
        + """
        function handle(p)
          report("out", queue.publish("out", p))
          report("other", queue.publish("other", p))
        end
        """,
        ["go"],
        security={"policies": ["self"]},
        extra_entries=[
            policy_entry(
                "self",
                rule("*", "allow", "*", [cond("actor.id", "eq", "app:worker")]),
            ),
            policy_entry(
                "not_other",
                rule("*", "deny", "app:other", [cond("actor.id", "eq", "app:worker")]),
            ),
        ],
    )
    found = outcomes(logs)
    assert_published(found["out"])
    assert_published(found["other"])  # `not_other` is not one of this consumer's policies
    assert [m.data for m in out] == ["go"]


async def test_meta_conditions_see_the_headers_of_the_publish(
    apps: AppFactory, logs: pytest.LogCaptureFixture
) -> None:
    app, out = await apps.run(
        PRELUDE
        + """
        function handle(p)
          report("acme", queue.publish("out", "for acme", {tenant = "acme", n = 1}))
          report("globex", queue.publish("out", "for globex", {tenant = "globex"}))
          report("none", queue.publish("out", "no headers"))
          report("large", queue.publish("out", "too large", {tenant = "acme", n = 7}))
        end
        """,
        ["go"],
        security={"policies": ["acme_only"]},
        extra_entries=[
            policy_entry(
                "acme_only",
                rule(
                    "queue.*",
                    "allow",
                    "*",
                    [cond("meta.tenant", "eq", "acme"), cond("meta.n", "lt", 5)],
                ),
            )
        ],
    )
    found = outcomes(logs)
    assert_published(found["acme"])
    for label in ("globex", "none", "large"):
        assert_denied(found[label])
    assert [(m.data, m.headers.get("tenant")) for m in out] == [("for acme", "acme")]
    assert app.consumer.stats.denied == 3


async def test_a_header_that_is_not_a_regex_denies_instead_of_failing_the_handler(
    apps: AppFactory, logs: pytest.LogCaptureFixture
) -> None:
    # auto_ack: should the handler fail, its message is not redelivered over and over
    app, out = await apps.run(
        PRELUDE
        + """
        function handle(p)
          report("out", queue.publish("out", p, {pattern = "("}))
        end
        """,
        ["go"],
        auto_ack=True,
        security={"policies": ["by_pattern"]},
        extra_entries=[
            policy_entry(
                "by_pattern",
                rule("*", "allow", "*", [cond("actor.id", "matches", value_from="meta.pattern")]),
            )
        ],
    )
    stats = app.consumer.stats
    assert stats.failed == 0, f"the handler failed instead of getting an error: {stats.errors}"
    assert_denied(outcomes(logs)["out"])
    assert out == []
    assert stats.denied == 1


async def test_consumer_without_security_stays_open_and_is_listed_at_start_up(
    apps: AppFactory, logs: pytest.LogCaptureFixture
) -> None:
    guarded = {
        "name": "guarded",
        "kind": "queue.consumer",
        "queue": "other",
        "func": "handler",
        "security": {"groups": ["everyone"]},
    }
    app, out = await apps.run(
        PRELUDE + 'function handle(p) report("out", queue.publish("out", p)) end',
        ["go"],
        extra_entries=[policy_entry("deny_all", rule("*", "deny", "*"), ["everyone"]), guarded],
    )
    assert_published(outcomes(logs)["out"])
    assert [m.data for m in out] == ["go"]
    assert app.consumer.entry.id == "app:worker"
    assert app.consumer.stats.denied == 0
    warnings = worker_records(logs, "consumers without policies: their publishes are allowed")
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert getattr(warnings[0], "consumers", None) == ["app:worker"]
    assert worker_records(logs, "no security.policy entries: every publish is allowed") == []


async def test_file_without_policies_runs_open_and_says_so_once(
    apps: AppFactory, logs: pytest.LogCaptureFixture
) -> None:
    app, out = await apps.run(
        PRELUDE
        + """
        function handle(p)
          report("out-" .. p, queue.publish("out", p, {tenant = "anyone"}))
          report("other-" .. p, queue.publish("other", p))
        end
        """,
        ["a", "b", "c"],
        security={"actor": {"id": "someone", "meta": {"team": "none"}}, "groups": ["nobody"]},
    )
    found = outcomes(logs)
    assert len(found) == 6
    for outcome in found.values():
        assert_published(outcome)
    assert sorted(m.data for m in out) == ["a", "b", "c"]
    assert sorted(m.data for m in await app.drain("other")) == ["a", "b", "c"]
    assert app.consumer.stats.denied == 0
    warnings = worker_records(logs, "no security.policy entries: every publish is allowed")
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert worker_records(logs, "consumers without policies: their publishes are allowed") == []
    assert worker_records(logs, "publish denied") == []


# -- 3. entries validation -----------------------------------------------------------------------

SUMMARY_RE = re.compile(r"luaq: (\d+) problem\(s\), nothing was started")


def write_checked(path: Path, extra: list[dict[str, Any]], security: dict[str, Any]) -> Path:
    document = {
        "version": "1.0",
        "namespace": "app",
        "entries": [
            {"name": "broker", "kind": "queue.driver.memory"},
            {"name": "jobs", "kind": "queue.queue", "driver": "broker"},
            {
                "name": "handler",
                "kind": "function.lua",
                "source": "function handle(p) return true end",
                "method": "handle",
            },
            {
                "name": "worker",
                "kind": "queue.consumer",
                "queue": "jobs",
                "func": "handler",
                "security": security,
            },
            *extra,
        ],
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def check(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, str, str]:
    code = main(["check", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def only_condition(condition: dict[str, Any]) -> dict[str, Any]:
    return rule("*", "allow", "*", [condition])


def test_check_accepts_every_operator_and_both_operand_forms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conditions = [c for pair in OPERATOR_CASES.values() for c in pair]
    conditions += [case[1] for case in FIELD_CASES]
    extra = [
        policy_entry("everything", rule("*", "allow", "*", conditions), groups=["g"]),
        policy_entry("listed", rule(["queue.publish", "queue.*"], "deny", ["app:*", "*"])),
    ]
    path = write_checked(tmp_path / "app.yaml", extra, {"policies": ["listed"], "groups": ["g"]})
    code, out, err = check(capsys, path)
    assert code == 0, err
    assert out.startswith("ok: 1 file(s)"), out


BAD_POLICIES = [
    pytest.param(
        only_condition(cond("actor.id", "like", "x")),
        r"policy\.conditions\.0\.operator",
        r"'eq'.*'nmatches'",
        id="unknown-operator",
    ),
    pytest.param(
        only_condition(cond("user.id", "eq", "x")),
        r"policy\.conditions\.0\.field",
        r"actor",
        id="unknown-field",
    ),
    pytest.param(
        only_condition(cond("meta", "exists")),
        r"policy\.conditions\.0\.field",
        r"actor",
        id="meta-without-a-key",
    ),
    pytest.param(
        only_condition(cond("meta.a", "eq", value_from="user.id")),
        r"policy\.conditions\.0\.value_from",
        r"actor",
        id="value_from-unknown-field",
    ),
    pytest.param(
        only_condition(cond("meta.a", "in", "x")),
        r"policy\.conditions\.0(?:\.|: )value",
        r"\bin\b.*list",
        id="in-without-a-list",
    ),
    pytest.param(
        only_condition(cond("meta.a", "nin", 3)),
        r"policy\.conditions\.0(?:\.|: )value",
        r"\bnin\b.*list",
        id="nin-without-a-list",
    ),
    pytest.param(
        only_condition(cond("meta.a", "matches", "(")),
        r"policy\.conditions\.0(?:\.|: )value",
        r"regular expression",
        id="matches-invalid-regex",
    ),
    pytest.param(
        only_condition(cond("meta.a", "nmatches", "[a-")),
        r"policy\.conditions\.0(?:\.|: )value",
        r"regular expression",
        id="nmatches-invalid-regex",
    ),
    pytest.param(
        only_condition(cond("meta.a", "eq", "x", value_from="actor.id")),
        r"policy\.conditions\.0(?:\.|: )value(?:_from)?",
        r"value_from",
        id="value-and-value_from",
    ),
    pytest.param(
        only_condition(cond("meta.a", "eq")),
        r"policy\.conditions\.0(?:\.|: )value(?:_from)?",
        r"value_from",
        id="neither-value-nor-value_from",
    ),
    pytest.param(
        only_condition(cond("meta.a", "exists", "x")),
        r"policy\.conditions\.0(?:\.|: )(?:value|operator)",
        r"exists.*no value",
        id="exists-with-a-value",
    ),
    pytest.param(
        only_condition(cond("meta.a", "nexists", value_from="actor.id")),
        r"policy\.conditions\.0(?:\.|: )(?:value|operator)",
        r"nexists.*no value",
        id="nexists-with-value_from",
    ),
    pytest.param(
        rule("*", "permit", "*"), r"policy\.effect", r"'allow'.*'deny'", id="effect-permit"
    ),
    pytest.param(
        {"effect": "allow", "resources": "*"}, r"policy\.actions", r"required", id="no-actions"
    ),
]


@pytest.mark.parametrize(("body", "field", "message"), BAD_POLICIES)
def test_check_rejects_a_malformed_policy(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    body: dict[str, Any],
    field: str,
    message: str,
) -> None:
    path = write_checked(tmp_path / "app.yaml", [policy_entry("bad", body)], {"groups": ["g"]})
    code, out, err = check(capsys, path)
    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    summary = SUMMARY_RE.fullmatch(lines[-1])
    assert summary, err
    problems = lines[:-1]
    assert int(summary.group(1)) == len(problems) == 1, err
    pattern = re.compile(rf"{re.escape(str(path))}: app:bad: (?:{field}): (?P<message>.+)")
    match = pattern.fullmatch(problems[0])
    assert match, f"not `file: entry: field: message` for field /{field}/: {problems[0]!r}"
    assert re.search(message, match.group("message")), problems[0]


def test_check_rejects_a_consumer_naming_an_undeclared_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_checked(
        tmp_path / "app.yaml",
        [policy_entry("declared", rule("*"))],
        {"policies": ["declared", "nope", "other:declared"]},
    )
    code, out, err = check(capsys, path)
    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    assert SUMMARY_RE.fullmatch(lines[-1]), err
    assert lines[:-1] == [
        f"{path}: app:worker: security.policies: app:nope is not a declared security.policy entry",
        f"{path}: app:worker: security.policies: other:declared is not a declared "
        "security.policy entry",
    ]
