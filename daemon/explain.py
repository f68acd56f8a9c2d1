"""`provisiond why USER`: what provisiond did and will do for one user, from SQLite alone.

No network: the user and its groups come from the last snapshot (`source_user`, `source_group`),
the link and the history from `target_object` and `operation`. The prediction ("next cycle",
what would be sent) is the sync-user step itself run plan-only (`ondemand.plan_user`:
`Engine.reconcile` with `Reconcile.plan_only`) over the user as the last snapshot holds it (plus
any other stored user that maps to the same userName, so that a `conflict` shows): the same
desired state, links, slice, `max_deletes`, held-plan and approval rules, and nothing written to
SQLite or sent to a target. Scope and mapping are shown with the same pure code (`Rules`,
`mapping.desired_state`).

Every query is by primary key or index, except the membership scan of `source_group` (one row
per group, not per user; a substring search, no JSON parsing).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from daemon import approvals, refusals
from daemon.config import Config, TargetConfig
from daemon.durations import local_time
from daemon.engine import rules_for
from daemon.links import HELD, PENDING, GroupLink, Op, UserLink
from daemon.mapping import Desired, Rules, desired_state, resolve_pins, username_key
from daemon.model import JSON, Snapshot
from daemon.source.changes import EVENT_APPLIED, EVENT_COVERED, EVENT_PENDING, epoch, last_event
from daemon.store import Store

DEFAULT_HISTORY = 10              # last operations shown per target
SYNC_USER_KIND = "sync-user"      # `cycle.summary.kind` of a cycle written by `provisiond sync-user`
PINS_META = "group_pins"          # engine: meta "group_pins.<target>" (configured name -> PingOne id)


class UnknownUser(LookupError):
    """Nothing in the state file (nor in PingOne, for sync-user) matches the reference."""


@dataclass(frozen=True, slots=True)
class StoredGroups:
    """The groups of the last snapshot: JSON by id (id, name) and nesting (child -> parents)."""

    groups: dict[str, JSON]
    parents: dict[str, frozenset[str]]


# -- reading SQLite ---------------------------------------------------------------------------


async def find_user(store: Store, ref: str) -> JSON | None:
    """A stored PingOne user by id, then username (both indexed), then email."""
    for sql in ("SELECT data FROM source_user WHERE id=?",
                "SELECT data FROM source_user WHERE username=? COLLATE NOCASE LIMIT 1"):
        async with store.db.execute(sql, (ref,)) as cur:
            row = await cur.fetchone()
        if row is not None:
            loaded: JSON = json.loads(row[0])
            return loaded
    return await store.find_source_user(ref)


async def find_linked_id(store: Store, ref: str) -> str | None:
    """The source id of a user no longer in the snapshot but still linked in some target."""
    async with store.db.execute(
        "SELECT source_id FROM target_object WHERE kind='user' AND (source_id=? OR name=? COLLATE NOCASE) "
        "LIMIT 1", (ref, ref)) as cur:
        row = await cur.fetchone()
    return str(row[0]) if row else None


async def stored_groups(store: Store) -> StoredGroups:
    groups: dict[str, JSON] = {}
    parents: dict[str, frozenset[str]] = {}
    async with store.db.execute("SELECT id, name, parents FROM source_group") as cur:
        async for gid, name, raw in cur:
            groups[gid] = {"id": gid, "name": name}
            ups = json.loads(raw)
            if ups:
                parents[gid] = frozenset(ups)
    return StoredGroups(groups, parents)


async def direct_group_ids(store: Store, user_ids: Iterable[str]) -> dict[str, set[str]]:
    """user id -> ids of the stored groups it is a direct member of."""
    out: dict[str, set[str]] = {}
    for uid in user_ids:
        found: set[str] = set()
        # `members` is a JSON array of strings: the quoted id matches one element exactly.
        async with store.db.execute(
            "SELECT id FROM source_group WHERE instr(members, ?) > 0", (json.dumps(uid),)) as cur:
            async for (gid,) in cur:
                found.add(gid)
        out[uid] = found
    return out


async def namesakes(store: Store, user_name: str, user_id: str) -> list[JSON]:
    """Other stored users whose PingOne username is `user_name` (indexed), the candidates for a
    `conflict` under the usual mapping `userName = "username"`. A conflict through another mapped
    attribute (e.g. `email`) is not looked for here: that would scan every user."""
    out: list[JSON] = []
    async with store.db.execute(
        "SELECT data FROM source_user WHERE username=? COLLATE NOCASE AND id != ? LIMIT 20",
        (user_name, user_id)) as cur:
        async for (data,) in cur:
            out.append(json.loads(data))
    return out


async def group_links(store: Store, target: str) -> dict[str, GroupLink]:
    """Every group link of a target (few rows: the pushed groups), with all their members."""
    out: dict[str, GroupLink] = {}
    async with store.db.execute(
        "SELECT source_id, target_id, name, members, foreign_members, origin FROM target_object "
        "WHERE target=? AND kind='group'", (target,)) as cur:
        async for sid, tid, name, members, foreign, origin in cur:
            try:
                out[sid] = GroupLink(sid, tid, name, frozenset(json.loads(members)),
                                     frozenset(json.loads(foreign)), origin)
            except (ValueError, TypeError):
                continue     # a malformed row: the next cycle re-reads it (`Engine.load_links`)
    return out


async def namesake_links(store: Store, target: str, user_name: str, user_id: str) -> list[UserLink]:
    """The other user links of a target whose userName is `user_name` as servers compare it
    (`username_key`): a departed namesake's account is the one a rehire takes over, and no one
    else's lookup may take it. Indexed (`target_object_name`); NOCASE folds ASCII only, the
    comparison after it is the real one."""
    async with store.db.execute(
        "SELECT source_id FROM target_object WHERE target=? AND kind='user' AND name=? COLLATE NOCASE "
        "AND source_id != ? LIMIT 20", (target, user_name, user_id)) as cur:
        ids = [str(r[0]) async for r in cur]
    out: list[UserLink] = []
    for sid in ids:
        link = await user_link(store, target, sid)
        if link is not None and username_key(link.user_name) == username_key(user_name):
            out.append(link)
    return out


async def in_snapshot(store: Store, user_id: str) -> bool:
    """Is this PingOne user in the last stored snapshot?"""
    async with store.db.execute("SELECT 1 FROM source_user WHERE id=?", (user_id,)) as cur:
        return await cur.fetchone() is not None


async def user_link(store: Store, target: str, user_id: str) -> UserLink | None:
    row = await store.link_for(target, user_id)
    if row is None:
        return None
    return UserLink(user_id, row["target_id"], row["user_name"], row["attrs"], row["active"], row["origin"],
                    row["disabled_reason"], row["disabled_at"])


async def pins_for(store: Store, target: str) -> dict[str, str]:
    stored = await store.get_meta(f"{PINS_META}.{target}")
    pins: dict[str, str] = json.loads(stored) if stored else {}
    return pins


async def last_daemon_cycle(store: Store, target: str) -> int | None:
    """The newest cycle of a target that the daemon ran (not a `sync-user` one)."""
    return await store.last_cycle_id(target)


# -- pure helpers shared with sync-user --------------------------------------------------------


def user_snapshot(users: Mapping[str, JSON], groups: Mapping[str, JSON], parents: Mapping[str, frozenset[str]],
                  memberships: Mapping[str, Iterable[str]]) -> Snapshot:
    """A snapshot holding only `users` (with their direct groups): enough to evaluate scope by
    groups (direct or nested) and by filter, and to map, exactly as a full cycle would."""
    members: dict[str, set[str]] = {}
    for uid, gids in memberships.items():
        for gid in gids:
            members.setdefault(gid, set()).add(uid)
    return Snapshot(users=dict(users), groups=dict(groups),
                    members={g: frozenset(m) for g, m in members.items()}, parents=dict(parents))


def scope_verdict(snapshot: Snapshot, rules: Rules, pins: Mapping[str, str], cfg: TargetConfig,
                  user_id: str) -> dict[str, Any]:
    """In scope or not, and which part of the rule decided."""
    user = snapshot.users.get(user_id)
    children = snapshot.children()
    groups_part: list[dict[str, Any]] = []
    admitted: bool | None = None
    if rules.scope_groups:
        admitted = False
        for selector in rules.scope_groups:
            chosen = selector.select(snapshot, pins)     # a rule may select several: the one admitting
            group = next((g for g in chosen if user_id in snapshot.member_ids(
                g["id"], transitive=rules.transitive, children=children)), chosen[0] if chosen else None)
            entry: dict[str, Any] = {"selector": selector.label(), "group_id": None, "member": False, "via": None}
            if group is not None:
                gid = group["id"]
                entry["group_id"] = gid
                entry["group"] = group.get("name")
                members = snapshot.member_ids(gid, transitive=rules.transitive, children=children)
                if user_id in members:
                    entry["member"] = True
                    entry["via"] = _membership_path(snapshot, user_id, gid)
                    admitted = True
            else:
                entry["missing_in_source"] = True
            groups_part.append(entry)
    filter_part: dict[str, Any] | None = None
    matched: bool | None = None
    if rules.scope_filter is not None:
        matched = bool(user is not None and rules.scope_filter.matches(
            user, lambda gid: snapshot.member_ids(gid, transitive=rules.transitive, children=children)))
        filter_part = {"expression": cfg.scope.filter, "matches": matched}
    in_scope = user is not None and admitted is not False and matched is not False
    return {"in_scope": in_scope, "groups": groups_part, "filter": filter_part,
            "membership": "transitive" if rules.transitive else "direct",
            "decided_by": _decided_by(user is not None, groups_part, admitted, filter_part)}


def _membership_path(snapshot: Snapshot, user_id: str, group_id: str) -> list[str]:
    """Group names from a group the user is directly in up to `group_id` (shortest)."""
    direct = [g for g, members in snapshot.members.items() if user_id in members]
    if group_id in direct:
        return [_name(snapshot, group_id)]
    previous: dict[str, str | None] = {g: None for g in direct}
    queue = list(direct)
    while queue:
        gid = queue.pop(0)
        for parent in sorted(snapshot.parents.get(gid, ())):
            if parent in previous:
                continue
            previous[parent] = gid
            if parent == group_id:
                path = [parent]
                step: str | None = gid
                while step is not None:
                    path.append(step)
                    step = previous[step]
                return [_name(snapshot, g) for g in reversed(path)]
            queue.append(parent)
    return [_name(snapshot, group_id)]


def _name(snapshot: Snapshot, group_id: str) -> str:
    name = snapshot.groups.get(group_id, {}).get("name")
    return name if isinstance(name, str) else group_id


def _decided_by(present: bool, groups: list[dict[str, Any]], admitted: bool | None,
                filter_part: dict[str, Any] | None) -> str:
    if not present:
        return "the user is not in PingOne's last snapshot (deleted there)"
    parts: list[str] = []
    if admitted is None:
        parts.append("no scope group (every user passes this part)")
    elif admitted:
        for g in groups:
            if g["member"]:
                via = g["via"] or []
                how = "directly" if len(via) <= 1 else "via " + " -> ".join(via)
                parts.append(f"member of {g['selector']} ({how})")
                break
    else:
        parts.append("not a member of any scope group: " + ", ".join(g["selector"] for g in groups))
    if filter_part is not None:
        verb = "matches" if filter_part["matches"] else "does not match"
        parts.append(f"{verb} the filter {filter_part['expression']}")
    return "; ".join(parts)


# -- the explanation --------------------------------------------------------------------------


async def explain(store: Store, config: Config, ref: str, target: str | None = None) -> dict[str, Any]:
    """Everything `why` says about one user, as JSON-able data. Raises UnknownUser, KeyError (target).

    The prediction (`next_cycle`) is the sync-user step run plan-only (`ondemand.plan_user`):
    `Engine.reconcile` over this user as the last snapshot holds it, nothing written or sent."""
    from daemon import logs
    from daemon.ondemand import plan_user  # ondemand imports this module

    started = time.perf_counter()
    planned = await plan_user(config, store, ref, target=target, log=logs.get_logger(command="why"))
    user_id, user, snap = planned.user_id, planned.user, planned.snapshot
    stored = await stored_groups(store)
    memberships = await direct_group_ids(store, [user_id] if user is not None else [])
    out: dict[str, Any] = {
        "user": _user_summary(user, user_id, stored, memberships.get(user_id, set())),
        "last_event": await last_event(store, user_id),
        "targets": [],
    }
    for name, (_, done) in planned.targets.items():
        cfg = config.target(name)
        rules = rules_for(cfg)
        pins = resolve_pins(snap, rules, await pins_for(store, name))
        desired = desired_state(snap, rules, pins)
        out["targets"].append(await _explain_target(store, cfg, rules, pins, snap, desired, user_id, done.ops))
    out["took_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return out


def _user_summary(user: JSON | None, user_id: str, stored: StoredGroups, direct: set[str]) -> dict[str, Any]:
    if user is None:
        return {"id": user_id, "in_source": False}
    return {"id": user_id, "in_source": True, "username": user.get("username"), "email": user.get("email"),
            "enabled": user.get("enabled", True) is not False, "updated_at": user.get("updatedAt"),
            "groups": sorted(str(stored.groups.get(g, {}).get("name") or g) for g in direct)}


async def _explain_target(store: Store, cfg: TargetConfig, rules: Rules, pins: Mapping[str, str],
                          snap: Snapshot, desired: Desired, user_id: str, ops: list[Op]) -> dict[str, Any]:
    """One target's part of `why`: *ops* is the plan the sync-user step made (plan-only)."""
    name = cfg.name
    scope = scope_verdict(snap, rules, pins, cfg, user_id)
    want = desired.users.get(user_id)
    skip = desired.skipped.get(user_id)
    link = await user_link(store, name, user_id)
    links = await group_links(store, name)
    approval = await approvals.in_effect(store, name)
    released = approval.releases if approval is not None else frozenset()
    history = await store.operations_for(name, user_id, limit=DEFAULT_HISTORY)
    last_cycle = await last_daemon_cycle(store, name)
    held_last = any(op["cycle"] == last_cycle and op["status"] == HELD for op in history)
    # Approved only when the approved plan held this user's removal (the engine's identity);
    # an approval of another plan leaves it held.
    removal_approved = held_last and approvals.removal_key("user", user_id) in released
    refused = (await refusals.load(store, name)).get(user_id)    # a standing refusal (admin_linked)
    failed_last = {(op["kind"], op["op"]) for op in history
                   if op["status"] == "failed" and op["cycle"] == (history[0]["cycle"] if history else None)}
    next_ops = [_describe(op, failed_last) for op in ops]
    capped = {op.source_id: op.payload.get("limit") for op in ops
              if op.op == "add_members" and user_id in op.payload.get("capped", ())}
    memberships = []
    for gid, group in desired.groups.items():
        glink = links.get(gid)
        memberships.append({"group": group.display_name, "group_id": gid, "linked": glink is not None,
                            "should_be_member": user_id in group.members,
                            "member_in_target": glink is not None and user_id in glink.members,
                            "group_limit": capped.get(gid)})
    return {
        "target": name,
        "profile": cfg.profile,
        "in_scope": scope["in_scope"],
        "scope": scope,
        "mapped": ({"userName": want.user_name, "active": want.active, "attributes": dict(want.attrs)}
                   if want is not None else None),
        "skipped": {"reason": skip.reason, "detail": skip.detail} if skip is not None else None,
        "link": (await store.link_for(name, user_id)) if link is not None else None,
        "groups": memberships,
        "last_operations": history,
        "held": held_last and not removal_approved,
        "refused": refused,
        "approval_pending": approval is not None,
        "approved_plan": approval.plan_id if approval is not None and approval.plan_id >= 0 else None,
        "removal_approved": removal_approved if held_last else None,
        "next_cycle": {"operations": next_ops, "summary": _next_summary(next_ops, scope, want, skip, link)},
    }


def _describe(op: Op, failed_last: set[tuple[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": op.kind, "op": op.op, "name": op.name, "reason": op.reason,
                           "status": op.status, "skip_reason": op.skip_reason}
    if op.op == "update":
        out["changed"] = dict(op.payload.get("changed", {}))
        out["before"] = dict(op.payload.get("before", {}))
    if (op.kind, op.op) in failed_last and op.status == PENDING:
        out["retry"] = True
    return out


def _next_summary(ops: list[dict[str, Any]], scope: dict[str, Any], want: Any, skip: Any,
                  link: UserLink | None) -> str:
    if skip is not None:
        return f"nothing is sent: skipped ({skip.reason}: {skip.detail})"
    if not ops:
        if want is not None:
            return "nothing: the target already holds what PingOne says"
        if link is None:
            return "nothing: not in scope and not in the target"
        return "nothing: out of scope; already deprovisioned as far as the remove action goes"
    parts = []
    for op in ops:
        text = f"{op['kind']} {op['op']} ({op['reason']})"
        if op["kind"] == "group":
            text = f"{op['op']} {op['name']} ({op['reason']})"
        if op["status"] == HELD:
            text += " HELD above max_deletes until `provisiond approve`"
        elif op["status"] != PENDING:
            text += f" [{op['status']}: {op['skip_reason']}]"
        if op.get("retry"):
            text += " (retries the failure above)"
        parts.append(text)
    return "; ".join(parts)


# -- text -------------------------------------------------------------------------------------


def _when(ts: float | None) -> str:
    return local_time(ts)     # with its zone


def render_event(event: dict[str, Any] | None) -> list[str]:
    """The lines about the last change-feed event seen for the user."""
    if event is None:
        return ["  last change-feed event: none kept (the feed is off, or no event has named this user "
                "in the last 14 days)"]
    lines = [f"  last change-feed event: {event['action'] or '(no action type)'} (activity "
             f"{event['activity_id']}), recorded {event['recorded_at']}, seen {_when(event['seen'])}"]
    carried = event.get("targets") or {}
    parts = []
    for name, c in sorted(carried.items()):
        if c.get("cycle") is not None:
            parts.append(f"{name} incremental cycle {c['cycle']} ({c.get('outcome')})")
        else:
            parts.append(f"{name} not run ({c.get('outcome')}): its next full cycle carries it"
                         if c.get("outcome") != "busy with its full cycle" else f"{name} {c.get('outcome')}")
    by = ": " + ", ".join(parts) if parts else ""
    status = event["status"]
    if status == EVENT_APPLIED:
        recorded = epoch(str(event["recorded_at"]))
        after = (f" ({max(0.0, event['applied'] - recorded):.1f}s after it was recorded)"
                 if recorded is not None and event.get("applied") is not None else "")
        lines.append(f"    applied {_when(event['applied'])}{after}{by}")
    elif status == EVENT_PENDING:
        lines.append(f"    PENDING: {event.get('detail') or 'not applied yet'}{by}")
    elif status == EVENT_COVERED:
        lines.append(f"    covered by a full cycle: {event.get('detail') or ''}")
    else:
        lines.append(f"    skipped: {event.get('detail') or ''}")
    return lines


def render_explanation(data: dict[str, Any]) -> str:
    """The text `why` prints."""
    u = data["user"]
    lines: list[str] = []
    if u["in_source"]:
        lines.append(f"user {u['username']} ({u['id']}), email {u.get('email') or '-'}, "
                     f"{'enabled' if u['enabled'] else 'DISABLED'} in PingOne, updated {u.get('updated_at') or '-'}")
        lines.append(f"  direct groups: {', '.join(u['groups']) or '(none)'}")
    else:
        lines.append(f"user {u['id']}: not in PingOne's last snapshot (deleted there); still linked in a target")
    if "last_event" in data:
        lines.extend(render_event(data["last_event"]))
    for t in data["targets"]:
        lines.append("")
        verdict = "IN SCOPE" if t["in_scope"] else "NOT IN SCOPE"
        lines.append(f"target {t['target']} ({t['profile']}): {verdict}: {t['scope']['decided_by']}")
        if t["skipped"]:
            lines.append(f"  SKIPPED: {t['skipped']['reason']}: {t['skipped']['detail']}")
        if t["mapped"]:
            lines.append(f"  mapped: userName {t['mapped']['userName']}, active {t['mapped']['active']}")
            for path, value in sorted(t["mapped"]["attributes"].items()):
                if path != "userName" and value is not None:
                    lines.append(f"    {path}: {json.dumps(value, ensure_ascii=False)}")
        link = t["link"]
        if link:
            state = "active" if link["active"] else f"inactive ({link['disabled_reason'] or 'disabled'}" + (
                f" since {_when(link['disabled_at'])})" if link["disabled_at"] else ")")
            lines.append(f"  in target: id {link['target_id']} as {link['user_name']}, {state}, "
                         f"{link['origin']}, last synced {_when(link['last_synced'])}")
        else:
            lines.append("  in target: not linked (provisiond has not created or adopted it)")
        for g in t["groups"]:
            have = "member" if g["member_in_target"] else "not a member"
            want = "should be" if g["should_be_member"] else "should not be"
            limit = (f"; not sent: beyond the target's limit of {g['group_limit']} groups per user (group_limit)"
                     if g.get("group_limit") else "")
            lines.append(f"  group {g['group']}: {have} in the target, {want}{limit}")
        if t["last_operations"]:
            lines.append("  last operations:")
            for op in t["last_operations"]:
                detail = ""
                if op["http_status"]:
                    detail += f" HTTP {op['http_status']}"
                if op["scim_type"]:
                    detail += f" scimType {op['scim_type']}"
                if op["error"]:
                    detail += f": {op['error']}"
                if op["skip_reason"]:
                    detail += f" ({op['skip_reason']})"
                if op.get("from_source_id"):
                    whose = "user" if op["kind"] == "user" else "group"
                    detail += (f": took over the account of departed {whose} {op.get('from_name') or ''} "
                               f"({op['from_source_id']})")
                lines.append(f"    cycle {op['cycle']} {_when(op['finished'] or op['started'])} "
                             f"{op['kind']} {op['op']} ({op['reason']}): {op['status']}{detail}")
        if t.get("refused"):
            lines.append(f"  refused: the target refuses to delete this user ({t['refused']}); "
                         "provisiond asks again at the next full sync")
        lines.append(f"  next cycle: {t['next_cycle']['summary']}")
        if t.get("removal_approved"):
            lines.append(f"  held, APPROVED: plan {t['approved_plan']} held this removal and is approved; "
                         "the next cycle (or `sync-user`) sends it")
        elif t["held"]:
            other = (f" (the pending approval of plan {t['approved_plan']} does not release it: "
                     "that plan did not hold this removal)" if t.get("approved_plan") is not None else "")
            lines.append(f"  held: release with `provisiond approve --target {t['target']}`{other}")
    return "\n".join(lines)
