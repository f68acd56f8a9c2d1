"""The SCIM emulator's member PATCH fast path (`member_changes`, `patched_group`) gives what the
general path gives — the same members in the same order, or the same error — and over HTTP a
member PATCH on a large group leaves exactly the members a reader expects."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.sandbox.scim import ScimEmulator, ScimError, member_changes
from daemon.sandbox.server import serve

pytestmark = pytest.mark.timeout(60)

_IDS = [f"U{i}" for i in range(8)] + [f"u{i}" for i in range(3)] + ["missing"]


def _emulator(profile: str, fast: bool, members: list[str]) -> tuple[ScimEmulator, dict[str, Any]]:
    em = ScimEmulator(profile)
    em.fast_member_patch = fast
    for uid in _IDS:
        if uid != "missing":
            em.put_user({"id": uid, "userName": f"{uid}.{len(uid)}.{uid.isupper()}@example.com", "active": True})
    group = em.put_group({"id": "g1", "displayName": "G", "members": [{"value": m} for m in members]})
    return em, group


_member = st.fixed_dictionaries({"value": st.sampled_from(_IDS)},
                                optional={"display": st.sampled_from(["A", "B"]), "type": st.just("User")})
_operation = st.one_of(
    st.builds(lambda ms: {"op": "add", "path": "members", "value": ms}, st.lists(_member, max_size=4)),
    st.builds(lambda v, case: {"op": "remove", "path": f'{case("members")}[value eq "{v}"]'},
              st.sampled_from(_IDS), st.sampled_from([str, str.upper])),
)


def _outcome(em: ScimEmulator, group: dict[str, Any], operations: list[dict[str, Any]]) -> Any:
    try:
        attrs = em.patched_group(group, operations)
    except ScimError as error:
        return ("error", error.status, error.detail)
    return ("ok", {**attrs, "members": attrs.get("members", [])})


@given(profile=st.sampled_from(["generic", "zpa", "zia"]),
       members=st.lists(st.sampled_from(_IDS[:-1]), unique=True, max_size=8),
       operations=st.lists(_operation, min_size=1, max_size=5))
def test_the_fast_path_gives_what_the_general_path_gives(profile: str, members: list[str],
                                                         operations: list[dict[str, Any]]) -> None:
    fast, fast_group = _emulator(profile, True, members)
    slow, slow_group = _emulator(profile, False, members)
    assert member_changes(operations) is not None
    assert _outcome(fast, fast_group, operations) == _outcome(slow, slow_group, operations)


@pytest.mark.parametrize("operations", [
    [{"op": "replace", "path": "displayName", "value": "H"}],
    [{"op": "remove", "path": "members"}],
    [{"op": "remove", "path": "members", "value": [{"value": "U1"}]}],
    [{"op": "remove", "path": 'members[value eq "U1" and display eq "A"]'}],
    [{"op": "remove", "path": 'members[value eq "U\\"1"]'}],
    [{"op": "add", "path": "members", "value": [{"value": 5}]}],
    [{"op": "add", "value": {"members": [{"value": "U1"}]}}],
    [{"op": "add", "path": "members", "value": [{"value": "U1"}]}, {"op": "replace", "path": "displayName", "value": "H"}],
])
def test_anything_else_takes_the_general_path(operations: list[dict[str, Any]]) -> None:
    assert member_changes(operations) is None


async def test_a_member_patch_on_a_large_group_over_http() -> None:
    em = ScimEmulator("generic")
    ids = [f"user-{i:05d}" for i in range(20_000)]
    for uid in ids:
        em.put_user({"id": uid, "userName": f"{uid}@example.com"})
    em.put_group({"id": "big", "displayName": "Big", "members": [{"value": uid} for uid in ids[:15_000]]})
    gone = ids[:50:7]
    body = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [
        *({"op": "remove", "path": f'members[value eq "{uid}"]'} for uid in gone),
        {"op": "add", "path": "members", "value": [{"value": uid} for uid in ids[15_000:15_100]]},
    ]}
    headers = {"Authorization": f"Bearer {em.token}", "Content-Type": "application/scim+json"}
    async with serve(em.app()) as base, aiohttp.ClientSession() as session:
        async with session.patch(f"{base}{em.prefix}/Groups/big", json=body, headers=headers) as resp:
            assert resp.status in (200, 204)
        async with session.get(f"{base}{em.prefix}/Groups/big", headers=headers) as resp:
            got = [m["value"] for m in (await resp.json())["members"]]
        unknown = {**body, "Operations": [{"op": "add", "path": "members", "value": [{"value": "nobody"}]}]}
        async with session.patch(f"{base}{em.prefix}/Groups/big", json=unknown, headers=headers) as resp:
            assert resp.status == 400
    want = [uid for uid in ids[:15_000] if uid not in set(gone)] + ids[15_000:15_100]
    assert got == want
