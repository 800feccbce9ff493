"""Which tiers get a copy of a chunk: TieredStore's copy policy, a pure function of tier traits."""

from __future__ import annotations

from typing import Protocol, Sequence


class Traits(Protocol):
    volatile: bool
    shared: bool


def copy_targets(tiers: Sequence[Traits], above: int, write_through: bool, put: bool) -> list[int]:
    """Indices of the tiers above index `above` that get a copy of a whole chunk.

    put=True: a new chunk (above = len(tiers)). put=False: a promotion of a chunk found in
    tier `above`. A tier gets a copy when it is
    - the top tier;
    - shared: other nodes gain from the chunk at once;
    - the first durable local tier (the disk), in write-through mode only: in write-back mode
      it fills as volatile tiers evict, and on flush;
    - volatile, on promotion only: on put the lower memory tiers fill as the top one evicts.
    Any other durable local tier (a second disk) fills as the tier above it evicts.
    """
    out: list[int] = []
    durable_seen = False
    for i, tier in enumerate(tiers[:above]):
        durable_local = not tier.volatile and not tier.shared
        if (i == 0 or tier.shared or (tier.volatile and not put)
                or (durable_local and write_through and not durable_seen)):
            out.append(i)
        durable_seen |= durable_local
    return out


def write_back_targets(tiers: Sequence[Traits]) -> list[int]:
    """The tiers write-back mode leaves out of a put (the disk): flush writes volatile tiers' chunks there."""
    deferred = set(copy_targets(tiers, len(tiers), True, put=True))
    return sorted(deferred - set(copy_targets(tiers, len(tiers), False, put=True)))
