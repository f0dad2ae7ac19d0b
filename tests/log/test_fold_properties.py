"""Property tests of the fold: random interleavings of honest and forged events.

Four parties sign events on one job subject: the submitter S, honest workers W1 and W2, and
an attacker A with its own key. Each step is any event type with any attempt, reason or
``prev`` (mostly the right one), a random gap of server time, or a verbatim replay of an
earlier envelope. Messages get growing stream sequences (with gaps: other subjects share the
stream) and server timestamps. Whatever the interleaving:

* folding the same log twice, or one event at a time, gives the same state;
* an envelope replayed at another place is never accepted;
* nobody finishes, starts or releases a job without having claimed it first, and a result is
  only ever signed by a key whose claim was accepted;
* a challenge the holder answered in time (server time) never passes the lease on;
* only the submitter cancels, and only the submitter re-runs a job that has a result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asman.log import subjects, wire
from asman.log.definition import job_id
from asman.log.events import FINISH_REASONS, JobFold, RawEvent, Rules, check_event, fold
from asman.log.keys import PeerKey

DEF = {"image": "asman/busybox:local", "command": "echo property"}
JOB = job_id(DEF)
QUEUE = "prop"
SUBJECT = subjects.job_subject(QUEUE, JOB)
RULES = Rules(lease_ms=1000, max_attempts=3, max_events=512)
KEYS = {name: PeerKey.generate() for name in ("S", "W1", "W2", "A")}
PROCS = {"S": "", "W1": "a1", "W2": "b2", "A": "cc"}
KINDS = ("claimed", "renewed", "started", "finished", "released", "cancel", "requeued", "submitted")


@dataclass(frozen=True)
class Step:
    actor: str
    kind: str
    attempt: int
    reason: str
    gap_ms: int
    wrong_prev: bool
    replay: int | None  # index of an earlier message to publish again verbatim


steps = st.lists(
    st.builds(
        Step,
        actor=st.sampled_from(tuple(KEYS)),
        kind=st.sampled_from(KINDS),
        attempt=st.integers(1, 5),
        reason=st.sampled_from(FINISH_REASONS),
        gap_ms=st.sampled_from((0, 1, 10, 300, 999, 1000, 1001, 2500)),
        wrong_prev=st.sampled_from((False, False, False, False, True)),
        replay=st.none() | st.integers(0, 30),
    ),
    max_size=40,
)


def build(plan: list[Step]) -> tuple[list[RawEvent], list[tuple[str, int]]]:
    """The raw messages of ``plan`` after a valid ``submitted`` by S, and (signer, ts) of
    each message (the attacker's replays keep the original signer)."""
    raws: list[RawEvent] = []
    meta: list[tuple[str, int]] = []
    seq, ts = 0, 1_000_000

    def publish(data: bytes, signer: str) -> None:
        nonlocal seq
        seq += 1 + (seq % 3)  # other subjects' messages in between
        raws.append(RawEvent(seq, data, SUBJECT, ts))
        meta.append((signer, ts))

    def sign(actor: str, body: dict[str, object], prev: int) -> bytes:
        event = {"ts": ts, **body, "prev": prev, "proc": PROCS[actor]}
        return wire.seal(KEYS[actor], SUBJECT, event)

    submitted = {"type": "submitted", "definition": json.dumps(DEF), "class": "cpu"}
    publish(sign("S", submitted, 0), "S")
    for step in plan:
        ts += step.gap_ms
        if step.replay is not None and raws:
            original = raws[step.replay % len(raws)]
            publish(original.data, meta[step.replay % len(raws)][0])
            continue
        prev = raws[-1].seq if raws else 0
        if step.wrong_prev:
            prev = max(0, prev - 1 - step.attempt)
        body: dict[str, object] = {"type": step.kind, "attempt": step.attempt}
        if step.kind == "finished":
            body["reason"] = step.reason
        if step.kind == "submitted":
            body.update(definition=json.dumps(DEF), **{"class": "cpu"})
        publish(sign(step.actor, body, prev), step.actor)
    return raws, meta


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_the_fold_holds_whatever_the_interleaving(plan: list[Step]) -> None:
    raws, meta = build(plan)
    state = fold(QUEUE, JOB, SUBJECT, raws, RULES)
    assert state is not None  # the first event is a valid submission

    # the same log folded twice, or one event at a time, is the same state
    assert fold(QUEUE, JOB, SUBJECT, raws, RULES) == state
    folder = JobFold(QUEUE, JOB, SUBJECT, RULES)
    for raw in raws:
        folder.add(check_event(raw, SUBJECT))
        assert folder.state() is not None
    assert folder.state() == state

    names = {KEYS[name].peer_id: name for name in KEYS}
    accepted = [h for h in state.history if h.accepted]
    by_seq = {raw.seq: raw for raw in raws}
    seen: set[bytes] = set()
    for h in state.history:
        data = by_seq[h.seq].data
        if data in seen:  # a verbatim replay, anywhere: never accepted
            assert not h.accepted, h
        seen.add(data)

    claimed_by: set[str] = set()
    for h in accepted:
        who = names[h.signer]
        if h.type == "claimed":
            claimed_by.add(who)
        if h.type in ("renewed", "started", "finished", "released"):
            assert who in claimed_by, f"{who} wrote {h.type} without an accepted claim"
        if h.type == "cancel":
            assert who == "S"
        if h.type == "submitted":
            assert who == "S" and h.seq == raws[0].seq
    if state.result is not None and state.result.worker:
        writer = names[state.result.worker]
        assert writer == "S" or writer in claimed_by

    # a challenge answered in time never passes the lease on
    passed = [h for h in state.history if "passed to" in h.note]
    for h in passed:
        holder, challenger = h.note.split("the lease of ")[1].split(" passed to ")
        challenger = challenger.split(" ")[0]
        # find the challenge: the last accepted claim by the challenger before h
        challenge = next(
            c
            for c in reversed(accepted)
            if c.seq < h.seq and c.type == "claimed" and c.signer.startswith(challenger)
        )
        c_ts = next(t for (raw, (_, t)) in zip(raws, meta, strict=True) if raw.seq == challenge.seq)
        h_ts = next(t for (raw, (_, t)) in zip(raws, meta, strict=True) if raw.seq == h.seq)
        assert h_ts >= c_ts + RULES.lease_ms, (c_ts, h_ts)
        answers = [
            a
            for a in accepted
            if challenge.seq < a.seq < h.seq
            and a.signer.startswith(holder)
            and a.type in ("renewed", "started", "finished", "released")
        ]
        assert answers == [], f"the holder answered at {answers} and still lost the lease"


def test_a_replay_at_the_same_place_is_impossible_and_elsewhere_refused() -> None:
    """The one place a replayed envelope would fit is the place it was first published,
    which the compare-and-set never gives twice; everywhere else its ``prev`` is wrong."""
    raws, _ = build([Step("W1", "claimed", 1, "success", 0, False, None)])
    claim = raws[1]
    again = RawEvent(claim.seq + 5, claim.data, SUBJECT, (claim.ts or 0) + 1)
    state = fold(QUEUE, JOB, SUBJECT, [*raws, again], RULES)
    assert state is not None and state.claims == 1
    assert "out of chain" in state.history[-1].note
