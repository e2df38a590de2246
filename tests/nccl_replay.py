"""Replaying every rank's communication plan against NCCL's point-to-point semantics, written for
the tests from NCCL's documented behaviour (independently of the schedule code):

- the point-to-point calls a rank issues on one communicator run in issue order: a call starts
  only when the rank's previous call on that communicator has completed;
- a send and a receive complete together, when the sender's and the receiver's current calls on
  that communicator are a matching send/receive pair; messages are matched by this order, not by
  tag, so the pair must carry the same message (or the receiver silently gets another one);
- PyTorch's ProcessGroupNCCL gives each pair of ranks of a process group its own communicator.

A rank's plan is a list of events (see ``mhc_megatron.pipeline.dualpipev.rank_events``): posting a
receive or a send queues a call without blocking; waiting on one blocks the rank until that call has
completed. :func:`replay` runs all ranks until they finish, and fails on a wait cycle (deadlock), a
mismatched pair, or calls left unmatched.
"""

from __future__ import annotations

import collections


class Deadlock(AssertionError):
    pass


def replay(plans: dict[int, list[tuple[str, object]]]) -> int:
    """Run ``plans`` (rank -> events) to the end; returns the number of messages delivered."""
    queues: dict[tuple, dict[int, collections.deque]] = collections.defaultdict(lambda: collections.defaultdict(collections.deque))
    done: set = set()
    my_sends = {rank: [] for rank in plans}
    cursor = {rank: 0 for rank in plans}
    delivered = 0

    def communicator(m):
        return (m.channel, min(m.src, m.dst), max(m.src, m.dst))

    def blocked(rank, event, item) -> bool:
        if event in ("wait_recv", "wait_send"):
            return ("recv" if event == "wait_recv" else "send", item) not in done
        if event == "wait_sends":
            return any(("send", m) not in done for m in my_sends[rank])
        return False

    while True:
        progressed = False
        for rank, plan in plans.items():  # issue what each rank can issue
            while cursor[rank] < len(plan):
                event, item = plan[cursor[rank]]
                if blocked(rank, event, item):
                    break
                if event == "post_recv":
                    assert item.dst == rank, (rank, item)
                    queues[communicator(item)][rank].append(("recv", item))
                elif event == "send":
                    assert item.src == rank, (rank, item)
                    queues[communicator(item)][rank].append(("send", item))
                    my_sends[rank].append(item)
                cursor[rank] += 1
                progressed = True
        for comm, sides in queues.items():  # complete matched calls at the heads of the queues
            _, low, high = comm
            a, b = sides[low], sides[high]
            while a and b and {a[0][0], b[0][0]} == {"send", "recv"}:
                (kind_a, msg_a), (_, msg_b) = a.popleft(), b.popleft()
                if msg_a != msg_b:
                    raise AssertionError(f"on {comm} the {kind_a} of {msg_a} was matched with {msg_b}: wrong data")
                done.update({("send", msg_a), ("recv", msg_a)})
                delivered += 1
                progressed = True
        if all(cursor[r] == len(p) for r, p in plans.items()):
            break
        if not progressed:
            waiting = {r: plans[r][cursor[r]] for r in plans if cursor[r] < len(plans[r])}
            heads = {comm: {r: q[0] for r, q in sides.items() if q} for comm, sides in queues.items()}
            heads = {c: h for c, h in heads.items() if h}
            raise Deadlock(f"wait cycle: ranks wait on {waiting}; calls at the heads of the communicators: {heads}")
    left = {comm: {r: list(q) for r, q in sides.items() if q} for comm, sides in queues.items()}
    left = {c: v for c, v in left.items() if v}
    assert not left, f"calls never matched: {left}"
    return delivered
