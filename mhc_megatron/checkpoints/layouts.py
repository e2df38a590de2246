"""The two checkpoint layouts of an mHC model and the mapping between them (pure functions on
``{checkpoint key: tensor}``; no I/O).

Checkpoint keys are megatron-core's distributed-checkpoint keys: a GPT decoder stores each
parameter once for all layers (``decoder.layers.<name>``, a leading layer axis), a HybridModel
per layer (``decoder.layers.<i>.<name>``). Per sublayer:

================================================  ==========================================================
mhc-megatron                                      upstream Megatron-LM (``HyperConnectionModule``)
================================================  ==========================================================
``input_layernorm.coefficients.phi`` [nC, m]      ``self_attention_hyper_connection.mapping_proj.weight`` [m, nC]
``input_layernorm.coefficients.bias`` [m]         ``self_attention_hyper_connection.bias`` [m]
``input_layernorm.coefficients.alpha`` [3]        ``self_attention_hyper_connection.alpha_{pre,post,res}`` [1] each
``pre_mlp_layernorm.coefficients.*``              ``mlp_hyper_connection.*`` (the same three)
``<slot>.norm.*`` (a norm kept under its slot)    ``<slot>.*``
``decoder.final_layernorm.norm.*``                ``decoder.final_layernorm.*``
================================================  ==========================================================

with ``m = n*n + 2n`` ordered ``[pre (n) | post (n) | res (n*n, row-major: res[i, j] mixes stream j
into stream i)]`` on both sides. Every other key (embeddings, attention, MLP, the norms fused
into ``linear_qkv``/``linear_fc1``, the output layer) is the same on both sides. The mapping
only moves, transposes, splits and concatenates: values are never rounded, so converting there
and back gives the same bits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

FORMATS = ("upstream-mhc", "mhc-megatron")

# (our norm slot, upstream's hyper-connection module) per sublayer
_SLOTS = (("input_layernorm", "self_attention_hyper_connection"), ("pre_mlp_layernorm", "mlp_hyper_connection"))
_GATES = ("alpha_pre", "alpha_post", "alpha_res")
_LAYER_KEY = re.compile(r"^(decoder\.layers\.)(\d+\.)?(.*)$")


class NotConvertible(ValueError):
    """A checkpoint this converter cannot convert as asked; the message says what was found."""


@dataclass(frozen=True)
class Found:
    """What a checkpoint holds."""

    format: str  # one of FORMATS
    expansion_rate: int
    hidden_size: int
    mode: str = "mhc"  # ours: mhc or hc
    hybrid: bool = False  # per-layer keys (HybridModel)
    mtp: bool = False  # multi-token-prediction keys
    moe: bool = False  # MoE router keys


def _split(key: str):
    """``decoder.layers.[<i>.]<rest>`` -> (prefix incl. index, rest), else None."""
    m = _LAYER_KEY.match(key)
    return (m[1] + (m[2] or ""), m[3]) if m else None


def _n_from_width(m: int, where: str) -> int:
    n = int(round(math.sqrt(m + 1) - 1))  # m = n^2 + 2n = (n + 1)^2 - 1
    if n < 1 or n * n + 2 * n != m:
        raise NotConvertible(f"{where} has {m} coefficients per token, which is n*n + 2n for no n")
    return n


def detect(shapes: dict[str, tuple[int, ...]]) -> Found:
    """Tell the layout from the checkpoint's tensor keys and global shapes (``NotConvertible``
    for a checkpoint of neither layout, naming what it holds)."""
    ours = {k: s for k, s in shapes.items() if ".coefficients." in k}
    upstream = {k: s for k, s in shapes.items() if "_hyper_connection." in k}
    hybrid = any(_LAYER_KEY.match(k)[2] for k in (ours or upstream) if _LAYER_KEY.match(k))
    mtp = any(k.startswith("mtp.") for k in shapes)
    moe = any(".mlp.router." in k for k in shapes)
    if ours and upstream:
        raise NotConvertible(
            f"the checkpoint has both layouts' mHC parameters ({sorted(ours)[0]!r} and {sorted(upstream)[0]!r})"
        )
    if ours:
        phis = [s for k, s in ours.items() if k.endswith(".coefficients.phi")]
        thetas = [s for k, s in ours.items() if k.endswith(".coefficients.theta")]
        if thetas:
            c, n2 = thetas[0][-2:]
            return Found("mhc-megatron", n2 - 2, c, mode="hc", hybrid=hybrid, mtp=mtp, moe=moe)
        if not phis:
            raise NotConvertible(f"mhc-megatron coefficient keys without a phi: {sorted(ours)[:3]}")
        nc, m = phis[0][-2:]
        n = _n_from_width(m, "phi")
        return Found("mhc-megatron", n, nc // n, hybrid=hybrid, mtp=mtp, moe=moe)
    if upstream:
        weights = [s for k, s in upstream.items() if k.endswith("mapping_proj.weight")]
        if not weights:
            raise NotConvertible(f"upstream hyper-connection keys without mapping_proj.weight: {sorted(upstream)[:3]}")
        m, nc = weights[0][-2:]
        n = _n_from_width(m, "mapping_proj.weight")
        return Found("upstream-mhc", n, nc // n, hybrid=hybrid, mtp=mtp, moe=moe)
    decoder = sorted(k for k in shapes if k.startswith("decoder."))
    what = (
        f"{len(shapes)} tensors, none of them mHC parameters (no '*.coefficients.phi' of mhc-megatron, no "
        f"'*_hyper_connection.mapping_proj.weight' of upstream Megatron-LM)"
    )
    if decoder:
        what += f"; decoder keys such as {decoder[:3]}: a residual (non-mHC) model"
    else:
        what += f"; keys such as {sorted(shapes)[:3]}"
    raise NotConvertible(f"neither an mhc-megatron nor an upstream-mHC checkpoint: {what}")


def rename(key: str, to: str) -> str:
    """The key of a norm parameter or state (tensor or object) in the layout ``to``; every other
    key that is not an mHC parameter is the same in both layouts."""
    if to not in FORMATS:
        raise ValueError(f"layout must be one of {', '.join(FORMATS)}, got {to!r}")
    final, final_ours = "decoder.final_layernorm.", "decoder.final_layernorm.norm."
    parts = _split(key)
    if to == "upstream-mhc":
        if parts is not None:
            prefix, rest = parts
            for slot, _ in _SLOTS:
                if rest.startswith(f"{slot}.norm."):
                    return f"{prefix}{slot}.{rest[len(slot) + len('.norm.'):]}"
        elif key.startswith(final_ours):
            return final + key[len(final_ours):]
        return key
    if parts is not None:
        prefix, rest = parts
        for slot, _ in _SLOTS:
            if rest.startswith(f"{slot}.") and not rest.startswith(f"{slot}.norm."):
                return f"{prefix}{slot}.norm.{rest[len(slot) + 1:]}"
    elif key.startswith(final) and not key.startswith(final_ours):
        return final_ours + key[len(final):]
    return key


def to_upstream(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mhc-megatron keys and tensors -> upstream Megatron-LM's (see the module table)."""
    out = {}
    for key, t in tensors.items():
        parts = _split(key)
        slot = next((s for s in _SLOTS if parts and parts[1].startswith(f"{s[0]}.coefficients.")), None)
        if slot is None:
            out[rename(key, "upstream-mhc")] = t
            continue
        prefix, rest = parts
        name, hc = rest[len(f"{slot[0]}.coefficients."):], slot[1]
        if name == "phi":
            out[f"{prefix}{hc}.mapping_proj.weight"] = t.transpose(-1, -2).contiguous()
        elif name == "bias":
            out[f"{prefix}{hc}.bias"] = t
        elif name == "alpha":
            for i, gate in enumerate(_GATES):
                out[f"{prefix}{hc}.{gate}"] = t[..., i : i + 1].contiguous()
        else:
            raise NotConvertible(f"{key}: upstream Megatron-LM's mHC has no {name!r} parameter")
    return out


def to_ours(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream Megatron-LM's keys and tensors -> mhc-megatron's (see the module table)."""
    out, gates = {}, {}
    for key, t in tensors.items():
        parts = _split(key)
        slot = next((s for s in _SLOTS if parts and parts[1].startswith(f"{s[1]}.")), None)
        if slot is None:
            out[rename(key, "mhc-megatron")] = t
            continue
        prefix, rest = parts
        name, target = rest[len(slot[1]) + 1:], f"{prefix}{slot[0]}.coefficients."
        if name == "mapping_proj.weight":
            out[target + "phi"] = t.transpose(-1, -2).contiguous()
        elif name == "bias":
            out[target + "bias"] = t
        elif name in _GATES:
            gates.setdefault(target + "alpha", {})[name] = t
        else:
            raise NotConvertible(f"{key}: mhc-megatron has no counterpart of upstream's {name!r}")
    for key, parts in gates.items():
        missing = [g for g in _GATES if g not in parts]
        if missing:
            raise NotConvertible(f"{key[: -len('coefficients.alpha')]}: upstream gates {missing} missing")
        out[key] = torch.cat([parts[g] for g in _GATES], dim=-1)
    return out
