"""Queue operations on the log: read and change a queue's policy (asman.log.policy).

A change is a compare-and-set on the policy subject: read the chain, write the next version
naming the last message as ``prev``; a concurrent change makes the append fail and the change
is made again on the newer version (``change`` sees it), so no admin's change is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from asman.errors import Conflict, InvalidInput, LogError, UnauthorizedSigner
from asman.log import subjects
from asman.log.connection import Log
from asman.log.events import now_ms
from asman.log.policy import (
    Policy,
    PolicyChain,
    PolicyView,
    is_owner_bound,
    owner_matches,
)

__all__ = ["read_policy", "write_policy"]

logger = logging.getLogger(__name__)

CAS_RETRIES = 8


async def _read_chain(log: Log, queue: str) -> PolicyChain:
    chain = PolicyChain(queue)
    await chain.catch_up(log.read_policy_subject)
    return chain


async def read_policy(log: Log, queue: str) -> PolicyView | None:
    """The queue's policy versions as the log has them now (None: an open queue name)."""
    subjects.validate_queue(queue)
    if not is_owner_bound(queue):
        return None
    return (await _read_chain(log, queue)).view()


def _refuse_writer(queue: str, me: str, current: Policy | None) -> None:
    if not is_owner_bound(queue):
        raise InvalidInput(
            f"queue {queue} is an open queue: its name is not bound to an owner key, so it "
            "cannot carry a policy; make one that can with `asman queue new --private`"
        )
    if current is None and not owner_matches(queue, me):
        raise UnauthorizedSigner(
            f"queue {queue}'s name is not bound to your key ({me[:12]}…): only its owner "
            "can write its first policy"
        )
    if current is not None and not current.is_admin(me):
        raise UnauthorizedSigner(
            f"your key ({me[:12]}…) is not an admin of queue {queue}: ask its owner "
            f"({current.owner[:12]}…) to run `asman queue policy set {queue} --admin {me}`"
        )


async def write_policy(log: Log, queue: str, change: Callable[[Policy | None], Policy]) -> Policy:
    """Write the next version of ``queue``'s policy: ``change`` gets the current version
    (None: none yet) and returns the new content (its version is set here). Retries on a
    concurrent change; returns the version the log accepted."""
    subjects.validate_queue(queue)
    me = log.key.peer_id
    subject = subjects.policy_subject(queue)
    for _ in range(CAS_RETRIES):
        chain = await _read_chain(log, queue)
        current = chain.view().current
        _refuse_writer(queue, me, current)
        new = change(current)
        version = current.version + 1 if current else 1
        owner = current.owner if current else me
        new = replace(new, queue=queue, version=version, owner=owner, signer=me)
        event = {**new.to_event(), "ts": now_ms()}
        try:
            seq = await log.append(subject, event, expected_last_seq=chain.last_seq, ttl="never")
        except Conflict:
            continue
        log.policies.invalidate()
        await chain.catch_up(log.read_policy_subject)  # ours, read back as every peer reads it
        accepted = next((v for v in chain.versions if v.seq == seq), None)
        if accepted is None:
            raise LogError(f"queue {queue}: the log did not take policy version {version}")
        logger.info("queue %s: policy version %d written", queue, version)
        return accepted
    raise Conflict(f"queue {queue}: the policy kept changing under this change; try again")
