"""What provisiond knows of a target, and the operations it plans there.

The model of a target's side: a link (`UserLink`, `GroupLink`) says which target object
provisiond holds for one PingOne id and what it last applied; `Actual` is all of a target's
links; an `Op` is one planned operation with its phase, reason and status, and a `Plan` the
ordered list of them. The store persists these, the planner produces ops from them, the applier
carries ops out and returns new links, `explain` and `ondemand` read them. Pure values: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

# phases
PHASE_USERS = 1
PHASE_GROUPS = 2
PHASE_MEMBER_ADD = 3
PHASE_MEMBER_REMOVE = 4
PHASE_DISABLE = 5
PHASE_DELETE = 6

# statuses of an operation
PENDING = "pending"
SKIPPED = "skipped"
HELD = "held"

# reasons
NEW_IN_SCOPE = "new_in_scope"
ATTRIBUTES_CHANGED = "attributes_changed"
ENABLED_IN_SOURCE = "enabled_in_source"
DISABLED_IN_SOURCE = "disabled_in_source"
LEFT_SCOPE = "left_scope"
DELETED_IN_SOURCE = "deleted_in_source"
DELETE_AFTER_GRACE = "disabled_grace_elapsed"
BACK_IN_SCOPE = "back_in_scope"
NEW_GROUP = "new_group"
GROUP_RENAMED = "group_renamed"
GROUP_DELETED_IN_SOURCE = "group_deleted_in_source"
GROUP_UNSELECTED = "group_unselected"
MEMBERSHIP_CHANGED = "membership_changed"
FOREIGN_MEMBERS = "foreign_members"
ACTION_DISABLED = "action_disabled"
REMOVALS_HELD = "removals_held"
GROUP_LIMIT = "group_limit"             # a membership beyond the target's groups-per-user cap
# identity (README "Identity"): a new PingOne user or group takes over the target object of a
# departed one with the same userName / displayName (a rehire, a group re-created under its name)
ADOPTED_FROM_DEPARTED = "adopted_from_departed"
# a departing link whose target object another link holds: it is let go without any request
HELD_BY_ANOTHER_LINK = "held_by_another_link"


@dataclass(frozen=True, slots=True)
class UserLink:
    """What provisiond last applied for one user in one target."""

    source_id: str
    target_id: str
    user_name: str
    attrs: Mapping[str, Any]
    active: bool
    origin: str = "created"                 # created | adopted
    disabled_reason: str | None = None      # why provisiond set active=false (left_scope, ...)
    disabled_at: float | None = None


@dataclass(frozen=True, slots=True)
class GroupLink:
    source_id: str
    target_id: str
    display_name: str
    members: AbstractSet[str]               # source user ids provisiond added (`Members` mostly)
    foreign: frozenset[str] = frozenset()   # target user ids found in an adopted group (overwrite)
    origin: str = "created"


@dataclass(frozen=True, slots=True)
class Actual:
    users: Mapping[str, UserLink]
    groups: Mapping[str, GroupLink]


@dataclass(frozen=True, slots=True)
class Op:
    seq: int
    phase: int
    kind: str                               # user | group
    op: str                                 # create adopt update enable disable delete retire |
                                            # create adopt rename add_members remove_members delete release
    source_id: str
    target_id: str | None
    name: str                               # userName or group displayName
    reason: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    status: str = PENDING
    skip_reason: str | None = None

    @property
    def is_removal(self) -> bool:
        """Counts against max_deletes: a user deprovisioned, or a group deleted."""
        if self.kind == "group":
            return self.op == "delete"
        return self.phase in (PHASE_DISABLE, PHASE_DELETE) and self.reason in (
            LEFT_SCOPE, DELETED_IN_SOURCE, DELETE_AFTER_GRACE)


@dataclass(slots=True)
class Plan:
    ops: list[Op]
    removals_deferred: int = 0              # not planned: the snapshot was incomplete
    removals_held: int = 0
    removals_limit: int | None = None
    approval: float | None = None           # when the approval this plan honoured was granted

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self.ops:
            key = f"{op.kind}.{op.op}" + ("" if op.status == PENDING else f".{op.status}")
            out[key] = out.get(key, 0) + 1
        return out

    def pending(self) -> list[Op]:
        return [op for op in self.ops if op.status == PENDING]
