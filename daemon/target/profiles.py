"""Target profiles: what differs between Zscaler ZPA, Zscaler ZIA and a plain SCIM 2.0 server.

Values follow reference/zscaler-scim.md §6. Knobs marked UNCONFIRMED there are assumptions;
every field can be overridden per target (`profile_for(name, **overrides)`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DEFAULT_PAGE_SIZE = 100          # both Zscaler products: count <= 100 is safe everywhere
DEFAULT_MEMBERSHIP_BATCH = 100   # members per PATCH; no documented cap (UNCONFIRMED) -> stay small


class UnknownProfile(ValueError):
    """The profile name is not one of PROFILES."""


@dataclass(frozen=True, slots=True)
class TargetProfile:
    """How one kind of SCIM target behaves, and how provisiond talks to it."""

    name: str
    page_size: int
    membership_batch: int
    active_may_be_string: bool        # `"active": "true"` may come back (tolerated everywhere anyway)
    group_put_is_merge: bool          # PUT /Groups keeps omitted attributes (never clear members by PUT)
    active_false_deletes: bool        # `active=false` removes the user (ZPA); a later GET may 404
    max_groups_per_user: int | None   # memberships beyond this are silently not synced
    username_mutable: bool            # False: a userName change is delete + create
    group_patch_returns_body: bool    # False: PATCH /Groups answers 204
    discovery: bool                   # read /ServiceProviderConfig
    requests_per_second: float = 10.0
    update_method: str = "patch"      # patch | put
    require_email_username: bool = False
    # GET /Groups/{id} lists members, so a missing `members` key means "none" (RFC 7643 leaves
    # an empty multi-valued attribute out). ZPA's examples never show members: UNCONFIRMED there,
    # so a missing key means "unknown" and provisiond keeps its own membership state.
    group_get_returns_members: bool = True
    # A 409 to DELETE /Users/{id} is a standing refusal for that user, not a conflict to retry:
    # the user stays, the delete is `skipped` with this reason and tried again only at the next
    # full sync. ZIA answers so for a user linked to an admin account (zscaler-scim.md §9).
    delete_refused_reason: str = "delete_refused"

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.membership_batch < 1:
            raise ValueError("page_size and membership_batch must be at least 1")
        if self.update_method not in ("patch", "put"):
            raise ValueError(f"update_method must be 'patch' or 'put', not {self.update_method!r}")
        if self.requests_per_second <= 0:
            raise ValueError("requests_per_second must be positive")


PROFILES: dict[str, TargetProfile] = {
    "zpa": TargetProfile(
        name="zpa",
        page_size=DEFAULT_PAGE_SIZE,          # default 10, max 100 for Users
        membership_batch=DEFAULT_MEMBERSHIP_BATCH,
        active_may_be_string=True,
        group_put_is_merge=True,              # PUT example keeps omitted displayName/members
        active_false_deletes=True,            # "About SCIM"; conflicts with "Deleting Users" (UNCONFIRMED)
        max_groups_per_user=1000,
        username_mutable=False,               # per IBM's connector (UNCONFIRMED)
        group_patch_returns_body=False,
        discovery=False,                      # discovery endpoints undocumented for ZPA (UNCONFIRMED)
        requests_per_second=20.0,             # documented 50/s; headroom
        update_method="patch",
        require_email_username=True,
        group_get_returns_members=False,      # get-by-id example omits members (UNCONFIRMED)
    ),
    "zia": TargetProfile(
        name="zia",
        page_size=DEFAULT_PAGE_SIZE,          # GET up to 1,000, .search 100: stay at 100
        membership_batch=DEFAULT_MEMBERSHIP_BATCH,
        active_may_be_string=False,
        group_put_is_merge=False,             # UNCONFIRMED: assume RFC replace
        active_false_deletes=False,           # disables; active=true re-enables
        max_groups_per_user=127,              # 128 in one page, 127 in Ranges & Limitations
        username_mutable=True,                # per IBM/Ping (UNCONFIRMED)
        group_patch_returns_body=False,
        discovery=True,                       # unauthenticated /ServiceProviderConfig
        requests_per_second=5.0,              # documented 5/s per tenant, shared by all workers
        update_method="patch",
        require_email_username=True,
        delete_refused_reason="admin_linked", # 409 "Admin user cannot be deleted" (§9)
    ),
    "generic": TargetProfile(
        name="generic",
        page_size=DEFAULT_PAGE_SIZE,
        membership_batch=DEFAULT_MEMBERSHIP_BATCH,
        active_may_be_string=False,
        group_put_is_merge=False,
        active_false_deletes=False,
        max_groups_per_user=None,
        username_mutable=True,
        group_patch_returns_body=False,       # RFC allows 200 with body or 204: expect neither
        discovery=True,
        requests_per_second=10.0,
        update_method="patch",
        require_email_username=False,
    ),
}


def profile_for(name: str, **overrides: Any) -> TargetProfile:
    """The named profile (zpa / zia / generic) with *overrides* applied."""
    try:
        base = PROFILES[name.lower()]
    except KeyError:
        raise UnknownProfile(f"unknown target profile {name!r}; expected one of {', '.join(PROFILES)}") from None
    fields = {f.name for f in dataclasses.fields(TargetProfile)}
    unknown = sorted(set(overrides) - fields - {"name"})
    if unknown or "name" in overrides:
        raise ValueError(f"not a profile setting: {', '.join(unknown or ['name'])}")
    return dataclasses.replace(base, **overrides) if overrides else base
