"""Security policies: who may do what, decided per actor.

A consumer acts as an actor (its `security.actor`, by default its own id). The policies that
apply to it are those it names and those of the groups it is in. Deny beats allow; once any
policy applies to an actor, what no policy allows is denied. A file with no policies at all
runs open, and the worker says so at start-up.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .entries import Condition, Config, ConsumerEntry, PolicyEntry
from .errors import ErrorKind, QueueError

_MISSING = object()


def _lookup(context: Mapping[str, Any], path: str) -> Any:
    """`actor.meta.team` in {"actor": {"meta": {"team": ...}}}; _MISSING when absent."""
    value: Any = context
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _compare(operator: str, left: Any, right: Any) -> bool:
    try:
        match operator:
            case "eq":
                return bool(left == right)
            case "ne":
                return bool(left != right)
            case "lt":
                return bool(left < right)
            case "gt":
                return bool(left > right)
            case "lte":
                return bool(left <= right)
            case "gte":
                return bool(left >= right)
            case "in":
                return left in right
            case "nin":
                return left not in right
            case "contains":
                return right in left
            case "ncontains":
                return right not in left
            case "matches":
                return re.search(str(right), str(left)) is not None
            case "nmatches":
                return re.search(str(right), str(left)) is None
    except (TypeError, re.error):
        pass  # values that cannot be compared, or a pattern from value_from that is not one
    return False


def holds(condition: Condition, context: Mapping[str, Any]) -> bool:
    left = _lookup(context, condition.field)
    if condition.operator == "exists":
        return left is not _MISSING
    if condition.operator == "nexists":
        return left is _MISSING
    right = _lookup(context, condition.value_from) if condition.value_from else condition.value
    if left is _MISSING or right is _MISSING:
        # a negative test on a missing field holds; a positive one does not
        return condition.operator in ("ne", "nin", "ncontains", "nmatches")
    return _compare(condition.operator, left, right)


def _matches(patterns: Sequence[str], value: str | None) -> bool:
    if value is None:  # a check without a resource: only policies for every resource apply
        return "*" in patterns
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


OPEN = Decision(True, "no security policies are declared")


class Access:
    """The policies of one actor, and the checks made against them."""

    def __init__(self, actor: Mapping[str, Any], policies: Sequence[PolicyEntry], open_: bool):
        self.actor = actor
        self.policies = policies
        self.open = open_

    def check(
        self, action: str, resource: str | None, meta: Mapping[str, Any] | None = None
    ) -> Decision:
        if self.open:
            return OPEN
        context: dict[str, Any] = {"actor": self.actor, "action": action, "meta": meta or {}}
        if resource is not None:  # the general check has no resource: `exists` must not hold
            context["resource"] = resource
        allowed_by = None
        for entry in self.policies:
            rule = entry.policy
            if not (_matches(rule.actions, action) and _matches(rule.resources, resource)):
                continue
            if not all(holds(condition, context) for condition in rule.conditions):
                continue
            if rule.effect == "deny":
                return Decision(False, f"denied by policy {entry.id}")
            allowed_by = allowed_by or entry.id
        if allowed_by is None:
            return Decision(False, "no policy allows it")
        return Decision(True, f"allowed by policy {allowed_by}")

    def check_publish(self, queue_id: str, headers: Mapping[str, Any]) -> None:
        """The two checks of a publish (ACTIONS), in order; the queue check is not consulted after a
        denial."""
        if self.open:  # (on every publish: spared the checks' cost)
            return
        actor = self.actor["id"]
        for action, resource in zip(ACTIONS, (None, queue_id), strict=True):
            decision = self.check(action, resource, headers)
            if not decision.allowed:
                target = f" on {resource}" if resource else ""
                raise Denied(
                    action,
                    f"{action}{target} is not permitted for actor {actor}: {decision.reason}",
                )


ACTIONS = ("queue.publish", "queue.publish.queue")  # the checks of a publish, in order


class Denied(QueueError):
    """A publish a policy refuses; `action` is the check that refused it."""

    def __init__(self, action: str, message: str) -> None:
        super().__init__(ErrorKind.PERMISSION_DENIED, message)
        self.action = action


def access_for(consumer: ConsumerEntry, config: Config) -> Access:
    security = consumer.security
    actor = security.actor
    identity = {"id": actor.id, "meta": dict(actor.meta)} if actor else {"id": consumer.id}
    groups = set(security.groups)
    policies = [
        entry
        for entry in config.policies.values()
        if entry.id in security.policies or groups.intersection(entry.groups)
    ]
    return Access(identity, policies, open_=not policies)
