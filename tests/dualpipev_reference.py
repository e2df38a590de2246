"""DeepSeek's published DualPipeV order, transcribed for the tests from the algorithm's eight steps
(the DualPipe paper's V variant and DeepSeek's reference schedule), independently of
``mhc_megatron.pipeline.program``: the product's order and its runtime are compared with this.

Per rank ``r`` of ``P`` and ``M`` micro-batches, with chunk 0 the way down and chunk 1 the way up:

    1. 2(P-r-1) x F0             2. (r+1) x F0 F1             3. (P-r-1) x B1* W F1
    4. (M-2P+r+1) x F0 B1 F1 B0  5. (P-r-1) x B1 F1 B0        6. (r+1) x B1 B0, the second half B*
    7. (P-r-1) x W B0*           8. (r+1) x W

``B*`` leaves its weight gradient to a later ``W``, which takes the oldest deferred one. In steps 4
and 5 each F and the B after it form an overlapped F&B pair (marked ``&``: DeepSeek's
``_forward_backward_chunk``), except the bottom rank's first F0 B1 of step 4, which run one after the
other (its F0 feeds its own B1); step 5's lone B1 is not paired. In step 6
the deferral starts at ``i = (r+1) // 2``: before that step's B1 on odd ranks, before its B0 on even.

The product runs this order without the weight passes: its layers cannot split a backward, so
every ``B*`` computes its weight gradients itself and the ``W`` slots are dropped
(``weight_passes=False``, the default).
"""

from __future__ import annotations


def dualpipev_order(rank: int, ranks: int, microbatches: int, weight_passes: bool = False) -> list[str]:
    """``["F0.0", "F7.0", ..., "B7.0*", "W7.0", ...]``: stage numbers of the V, ``*`` a deferred B;
    without ``weight_passes`` the W entries and ``*`` marks are left out."""
    stage = {"0": rank, "1": 2 * ranks - 1 - rank}
    tokens: list[str] = []
    before_turn = ranks - rank - 1
    tokens += ["F0"] * (2 * before_turn)
    tokens += ["F0", "F1"] * (rank + 1)
    tokens += ["B1*", "W", "F1"] * before_turn
    for i in range(microbatches - 2 * ranks + rank + 1):
        first = "F0 B1" if i == 0 and rank == ranks - 1 else "F0& B1&"
        tokens += [*first.split(), "F1&", "B0&"]
    tokens += ["B1", "F1&", "B0&"] * before_turn
    deferring = False
    for i in range(rank + 1):
        if i == (rank + 1) // 2 and rank % 2 == 1:
            deferring = True
        tokens.append("B1*" if deferring else "B1")
        if i == (rank + 1) // 2 and rank % 2 == 0:
            deferring = True
        tokens.append("B0*" if deferring else "B0")
    tokens += ["W", "B0*"] * before_turn
    tokens += ["W"] * (rank + 1)

    count = {}
    waiting: list[str] = []
    out = []
    for token in tokens:
        if token == "W":
            out.append("W" + waiting.pop(0))
            continue
        kind, chunk, deferred, paired = token[0], token[1], token.endswith("*"), token.endswith("&")
        n = count.get((kind, chunk), 0)
        count[(kind, chunk)] = n + 1
        name = f"{stage[chunk]}.{n}"
        out.append(f"{kind}{name}" + ("*" if deferred else "") + ("&" if paired else ""))
        if deferred:
            waiting.append(name)
    assert not waiting, "every deferred weight pass runs"
    if not weight_passes:
        out = [op.replace("*", "") for op in out if op[0] != "W"]
    return out


def as_reference(executed) -> list[str]:
    """An executed op list (``Op`` objects or their ``str``) in this module's notation."""
    return [str(op) + ("&" if getattr(op, "paired", False) else "") for op in executed]


def unmarked(order: list[str]) -> list[str]:
    """The order as ``str(Op)`` spells it (no pairing marks)."""
    return [op.rstrip("*&") for op in order]


def peak_in_flight(order: list[str]) -> float:
    """The most micro-batches whose activations a rank holds at once: each chunk is half the rank's
    layers, so a forward of one chunk adds 1/2 and its backward frees it."""
    live = peak = 0.0
    for op in order:
        if op[0] == "F":
            live += 0.5
        elif op[0] == "B":
            live -= 0.5
        peak = max(peak, live)
    return peak
