"""``convert_checkpoint``: one torch_dist checkpoint of an mHC model from one layout to the other,
with the model's mHC settings carried in Megatron's ``args`` (and in ``mhc_conversion``).

Between the two implementations the converted model computes the same function up to the
numerics that differ (docs/megatron.md, "Relation to upstream Megatron-LM's mHC"); the metadata
of a checkpoint converted to mhc-megatron selects upstream's numerics, so training continues
with upstream's maths.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from . import layouts, torch_dist
from .layouts import FORMATS, NotConvertible

#: what our settings must be to run upstream Megatron-LM's maths (flag -> value)
UPSTREAM_NUMERICS = {
    "mhc_sinkhorn_order": "rows-first",
    "mhc_norm_eps_placement": "outside",
    "mhc_dropout": "per-stream",
    "mhc_coeff_eps": 1e-6,
}
_OURS_DEFAULTS = {"mhc_sinkhorn_order": "cols-first", "mhc_norm_eps_placement": "inside-sqrt",
                  "mhc_dropout": "shared", "mhc_coeff_eps": 1e-6}


@dataclass
class Conversion:
    source: str
    target: str
    found: layouts.Found
    sinkhorn_iters: int
    alpha_init: float | None
    converted: int  # tensors written
    not_carried: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    continue_flags: list = field(default_factory=list)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _refuse_to_upstream(found: layouts.Found, args) -> None:
    why = []
    if found.mode != "mhc":
        why.append(f"it is --residual-mode {found.mode} (upstream has mHC only)")
    if found.hybrid:
        why.append("it is a HybridModel (upstream Megatron-LM main has no mHC HybridModel layer; its dev "
                   "branch wraps each hybrid layer as a whole, a different function)")
    if found.mtp:
        why.append("it has multi-token-prediction layers (upstream refuses MTP with mHC)")
    if found.moe:
        why.append("it has MoE layers (upstream's HyperConnectionTransformerLayer refuses MoE)")
    contraction = getattr(args, "mhc_contraction", "mean") if args is not None else "mean"
    if contraction != "mean":
        why.append(f"it contracts the streams by the {contraction} (upstream: the mean)")
    if why:
        raise NotConvertible("cannot convert to upstream-mhc: " + "; ".join(why))


def _carried_args(args, found: layouts.Found, target: str, iters: int, alpha):
    """A copy of Megatron's args saying how to build the converted model (and that the optimizer
    and RNG state were not carried: Megatron then loads the weights alone)."""
    new = argparse.Namespace(**vars(args))
    new.no_save_optim = True
    new.no_save_rng = True
    if target == "mhc-megatron":
        new.enable_mhc_connections = False
        new.residual_mode = "mhc"
        new.expansion_rate = found.expansion_rate
        new.mhc_sinkhorn_iters = iters
        new.mhc_kernels = "reference"
        if alpha is not None:
            new.mhc_alpha_init = alpha
        new.mhc_init = "upstream"
        for name, value in UPSTREAM_NUMERICS.items():
            setattr(new, name, value)
    else:
        new.enable_mhc_connections = True
        new.mhc_num_residual_streams = found.expansion_rate
        new.mhc_sinkhorn_iterations = iters
        if alpha is not None:
            new.mhc_init_gating_factor = alpha
        new.residual_mode = "residual"
        new.expansion_rate = None
    return new


def convert_checkpoint(source_path: str, target_path: str, source: str, target: str) -> Conversion:
    """Convert the checkpoint at ``source_path`` (layout ``source``) into ``target_path`` (layout
    ``target``); ``NotConvertible`` names what is in the way."""
    for name, value in (("--from", source), ("--to", target)):
        if value not in FORMATS:
            raise NotConvertible(f"{name} must be one of {', '.join(FORMATS)}, got {value!r}")
    if source == target:
        raise NotConvertible(f"--from and --to are both {source}: nothing to convert")
    from ..compat import check_megatron_core

    check_megatron_core()
    with torch_dist.single_process_group():
        ckpt = torch_dist.read(source_path)
        found = layouts.detect({k: tuple(t.shape) for k, t in ckpt.tensors.items()})
        if found.format != source:
            raise NotConvertible(
                f"{source_path} is an {found.format} checkpoint (n = {found.expansion_rate}), not {source}: "
                f"use --from {found.format}"
            )
        args = ckpt.common.get("args")
        iters, alpha = _mhc_metadata(args, found, source)
        notes = []
        if target == "upstream-mhc":
            _refuse_to_upstream(found, args)
            differ = [f"{_flag(k)} {getattr(args, k)}" for k, v in UPSTREAM_NUMERICS.items()
                      if args is not None and getattr(args, k, _OURS_DEFAULTS[k]) != v]
            if args is None or differ:
                notes.append(
                    "upstream computes with its own numerics (rows-first Sinkhorn, 1/(rms + eps), dropout per "
                    "stream, bf16 coefficient maths in a bf16 model); this model was trained with "
                    + (", ".join(differ) if differ else "settings not recorded in the checkpoint")
                    + ", so its outputs there differ slightly (docs/megatron.md)"
                )
            tensors = layouts.to_upstream(ckpt.tensors)
            flags = ["--enable-mhc-connections", "--mhc-num-residual-streams", str(found.expansion_rate),
                     "--mhc-sinkhorn-iterations", str(iters)]
        else:
            tensors = layouts.to_ours(ckpt.tensors)
            flags = ["--residual-mode", "mhc", "--expansion-rate", str(found.expansion_rate), "--mhc-sinkhorn-iters",
                     str(iters), *[x for k, v in UPSTREAM_NUMERICS.items() for x in (_flag(k), str(v))],
                     "--mhc-kernels", "reference"]
        objects = {}
        for unique, (key, shape, offset, data) in ckpt.objects.items():
            new_key = layouts.rename(key, target)
            objects[new_key + unique[len(key):]] = (new_key, shape, offset, data)
        common = dict(ckpt.common)
        if args is not None:
            common["args"] = _carried_args(args, found, target, iters, alpha)
        common["mhc_conversion"] = {
            "from": source, "to": target, "expansion_rate": found.expansion_rate, "hidden_size": found.hidden_size,
            "sinkhorn_iters": iters, "alpha_init": alpha, "source": str(source_path),
            "numerics": "upstream" if target == "mhc-megatron" else "upstream's own",
        }
        if ckpt.not_carried:
            flags += ["--no-load-optim", "--no-load-rng"]
        torch_dist.write(target_path, torch_dist.Checkpoint(
            tensors, objects, common, ckpt.content_metadata, ckpt.iteration, ckpt.not_carried))
    return Conversion(source, target, found, iters, alpha, len(tensors), ckpt.not_carried, notes, flags)


def _mhc_metadata(args, found: layouts.Found, source: str) -> tuple[int, float | None]:
    """(Sinkhorn iterations, gate init) from the checkpoint's args, checked against its shapes."""
    if args is None:
        return 20, None
    if source == "upstream-mhc":
        n, iters, alpha = (getattr(args, k, None) for k in
                           ("mhc_num_residual_streams", "mhc_sinkhorn_iterations", "mhc_init_gating_factor"))
    else:
        n, iters, alpha = (getattr(args, k, None) for k in ("expansion_rate", "mhc_sinkhorn_iters", "mhc_alpha_init"))
    if n is not None and n != found.expansion_rate:
        raise NotConvertible(
            f"the checkpoint's args say {n} residual streams but its mHC parameters have "
            f"{found.expansion_rate}; the checkpoint is inconsistent"
        )
    return (iters if iters is not None else 20), alpha
