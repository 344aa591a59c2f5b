"""The permissions the operator uses, as RBAC rules: what its ClusterRole (or per-namespace
Role) grants. A test checks them against the calls the operator makes."""

from __future__ import annotations

from typing import Any

from .resource import GROUP, PLURAL

# Deployments, Services and PodDisruptionBudgets are replaced whole (what was added by hand
# goes); ConfigMaps are immutable, made anew for each configuration and deleted after its
# rollout; a PodDisruptionBudget is deleted when the QueueConsumer keeps one pod or none.
_OWNED = ["get", "list", "watch", "create", "update"]

# In every watched namespace (a ClusterRole when it watches them all).
RULES: list[dict[str, Any]] = [
    # kopf lists and watches them, and patches its finalizer (daemons stop before deletion)
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"]},
    # ownerReferences with blockOwnerDeletion need it (OwnerReferencesPermissionEnforcement)
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": _OWNED},
    {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "verbs": ["get", "list", "watch", "create", "delete"],
    },
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": _OWNED},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": [*_OWNED, "delete"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},  # broker URL, TLS
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]

# In the operator's own namespace only: leader election.
LEASE_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "create", "update"],
    },
]
