"""Choosing the mHC recompute block size L_r, and predicting what it stores (docs/recompute.md).

Counting is per token and per *sublayer* (attention and MLP each count as one mHC layer).
Without recompute every sublayer keeps, for backward, its n-stream input ``x`` (nC elements),
its sublayer output ``f`` (C) and a few fp32 coefficient tensors. With recompute in blocks of
``L_r`` sublayers, a block keeps only its first input ``x_{l0}`` (nC), each sublayer's ``f``
(C) and the small per-token coefficient floats (the Triton kernels keep all of them: recomputing
them would re-read ``x``); in backward the block's inputs ``x_{l0+1} ... x_{l0+L_r-1}`` are
recomputed from them (a transient of ``(L_r - 1) nC``).

The block size minimises the spec's cost ``nC ceil(L/L_r) + (n+2)C L_r`` over the sublayers of
one pipeline stage (or virtual chunk): ``L_r* = sqrt(n L / (n + 2))``, taken as the integer
minimiser and clamped to the stage so that no block crosses a stage boundary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

FP32 = 4


def spec_cost(block: int, sublayers: int, n: int) -> int:
    """The spec's memory cost in units of C per token: ``n ceil(L/L_r) + (n+2) L_r``."""
    return n * math.ceil(sublayers / block) + (n + 2) * block


def optimal_block_size(sublayers: int, n: int) -> tuple[int, float]:
    """``(integer L_r minimising spec_cost within 1..sublayers, continuous L_r*)``."""
    if sublayers < 1:
        raise ValueError(f"a stage needs at least one sublayer, got {sublayers}")
    star = math.sqrt(n * sublayers / (n + 2))
    best = min(range(1, sublayers + 1), key=lambda b: (spec_cost(b, sublayers, n), -b))
    return best, star


def resolve_block_size(requested, sublayers: int, n: int) -> int:
    """``"auto"`` -> the optimum; an integer is clamped to the stage (a block never crosses it)."""
    if requested == "auto":
        return optimal_block_size(sublayers, n)[0]
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"mHC recompute block size must be 'auto' or an integer >= 1, got {requested!r}")
    return min(requested, sublayers)


def coefficient_floats(n: int) -> int:
    """fp32 numbers per token and sublayer the kernels keep either way (H_pre, H_post, H_res,
    the projection and sum of squares)."""
    m = n * n + 2 * n
    return n + n + n * n + m + 1


def stored_bytes_per_token(
    sublayers: int, hidden: int, n: int, act_bytes: int, block: int | None, first_stage: bool = False
) -> int:
    """mHC activation bytes kept for backward per token in one stage, beyond what the same
    residual model keeps; ``block=None``: no recompute. On the first stage the first block's
    kept input is the C-wide embedding output (its n streams are copies), not nC."""
    if block is None:
        per = n * hidden * act_bytes + hidden * act_bytes + coefficient_floats(n) * FP32
        return sublayers * per
    blocks = math.ceil(sublayers / block)
    kept_inputs = blocks * n * hidden * act_bytes
    if first_stage:
        kept_inputs -= (n - 1) * hidden * act_bytes
    kept_small = coefficient_floats(n) * FP32  # kept, not recomputed: see the module docstring
    return kept_inputs + sublayers * (hidden * act_bytes + kept_small)


def transient_bytes_per_token(hidden: int, n: int, act_bytes: int, block: int | None) -> int:
    """Extra bytes alive while one block is recomputed (the block's recomputed inputs)."""
    return 0 if block is None else (block - 1) * n * hidden * act_bytes


@dataclass
class RecomputePlan:
    layers: int
    hidden: int
    expansion_rate: int
    pp: int
    vpp: int
    sublayers_per_stage: int
    block_size: int
    block_size_star: float
    stage_block_sizes: list[int]
    blocks_per_stage: int
    curve: list[dict]
    tokens_per_microbatch: int
    stored_bytes_without: int
    stored_bytes_with: int
    transient_bytes_with: int
    stage_stored_bytes_with: list[int]

    def as_dict(self) -> dict:
        return asdict(self)


def plan_recompute(
    layers: int,
    hidden: int,
    n: int,
    pp: int = 1,
    vpp: int = 1,
    seq: int = 4096,
    micro_batch: int = 1,
    act_bytes: int = 2,
    block_size="auto",
) -> RecomputePlan:
    """The plan for one pipeline stage chunk: ``layers`` transformer layers split evenly over
    ``pp * vpp`` chunks (each layer = 2 sublayers). Byte totals are for one micro-batch
    (``seq * micro_batch`` tokens) on one stage (all its chunks), beyond what the residual model
    keeps; ``stage_stored_bytes_with`` lists every stage (the first keeps one block input less)."""
    for name, value in (("layers", layers), ("hidden", hidden), ("pp", pp), ("vpp", vpp), ("seq", seq),
                        ("micro_batch", micro_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if n < 1:
        raise ValueError(f"expansion rate must be an integer >= 1, got {n!r}")
    chunks = pp * vpp
    if layers % chunks:
        raise ValueError(
            f"{layers} layers do not split evenly over {pp} pipeline stages x {vpp} virtual chunks; "
            f"use a layer count divisible by {chunks}"
        )
    sublayers = 2 * layers // chunks
    best, star = optimal_block_size(sublayers, n)
    block = resolve_block_size(block_size, sublayers, n)
    tokens = seq * micro_batch
    curve = [
        {
            "block_size": b,
            "spec_cost_C": spec_cost(b, sublayers, n),
            "stored_bytes": vpp * tokens * stored_bytes_per_token(sublayers, hidden, n, act_bytes, b),
            "transient_bytes": tokens * transient_bytes_per_token(hidden, n, act_bytes, b),
        }
        for b in range(1, sublayers + 1)
    ]
    return RecomputePlan(
        layers=layers, hidden=hidden, expansion_rate=n, pp=pp, vpp=vpp,
        sublayers_per_stage=sublayers, block_size=block, block_size_star=star,
        stage_block_sizes=[block] * pp, blocks_per_stage=vpp * math.ceil(sublayers / block),
        curve=curve, tokens_per_microbatch=tokens,
        stored_bytes_without=vpp * tokens * stored_bytes_per_token(sublayers, hidden, n, act_bytes, None),
        stored_bytes_with=vpp * tokens * stored_bytes_per_token(sublayers, hidden, n, act_bytes, block),
        transient_bytes_with=tokens * transient_bytes_per_token(hidden, n, act_bytes, block),
        stage_stored_bytes_with=[
            tokens * sum(
                stored_bytes_per_token(sublayers, hidden, n, act_bytes, block, first_stage=(stage == 0 and chunk == 0))
                for chunk in range(vpp)
            )
            for stage in range(pp)
        ],
    )
