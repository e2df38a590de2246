"""Reading and writing a Megatron ``torch_dist`` checkpoint whole, through megatron-core's
``dist_checkpointing``, in one process.

A distributed checkpoint stores every tensor by its global shape, whatever tensor/pipeline
layout saved it, and megatron-core cuts each rank's shard out of that when loading. So this
module reads the model's tensors unsharded and writes them back unsharded: the written
checkpoint loads into any TP/PP layout, as the read one did.

What is carried: the model tensors, the model's sharded objects (transformer-engine extra
state), the common state (``args``, ``iteration``, ``checkpoint_version``, ...) and the content
metadata. What is not: the optimizer state and the RNG / rerun state, which are laid out per
rank or per optimizer bucket (the caller records that in the checkpoint's ``args``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

import torch

from .layouts import NotConvertible

TRACKER = "latest_checkpointed_iteration.txt"
#: sharded keys of a Megatron training checkpoint that are not the model's (besides ``optimizer.*``
#: and ``[<prefix>]rng_state``)
_NOT_MODEL = ("rerun_state_machine_state", "common_state")
#: common-state entries that belong to what is not carried
_COMMON_DROPPED = ("optimizer", "opt_param_scheduler", "rng_state", "rerun_state_machine")


@dataclass
class Checkpoint:
    tensors: dict  # model key -> full (unsharded) tensor
    objects: dict  # unique key ('<key>/shard_<offsets>_<shape>') -> (key, global_shape, global_offset, data)
    common: dict  # the non-sharded state (args, iteration, ...)
    content_metadata: dict | None = None
    iteration: str | None = None  # the tracker file's content, when the path had one
    not_carried: list = field(default_factory=list)  # keys and common entries left out


def _is_model(key: str) -> bool:
    base = key.split("/")[0]  # a sharded object's unique key is '<key>/shard_...'
    return not (base.startswith("optimizer.") or base in _NOT_MODEL or base.endswith("rng_state"))


def locate(path: str) -> tuple[str, str | None]:
    """``(directory holding metadata.json, tracker content or None)`` for a checkpoint directory
    (``--save`` directory with ``latest_checkpointed_iteration.txt``, or one iteration)."""
    if not os.path.isdir(path):
        raise NotConvertible(f"{path}: no such checkpoint directory")
    iteration = None
    directory = path
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            iteration = f.read().strip()
        name = "release" if iteration == "release" else f"iter_{int(iteration):07d}" if iteration.isdigit() else None
        if name is None or not os.path.isdir(os.path.join(path, name)):
            raise NotConvertible(f"{tracker} names iteration {iteration!r}, but {path} has no {name or 'such'} directory")
        directory = os.path.join(path, name)
    entries = sorted(os.listdir(directory))
    if any(e.startswith("mp_rank_") for e in entries):
        raise NotConvertible(
            f"{directory} is in Megatron's legacy 'torch' format (mp_rank_*/model_optim_rng.pt); save it as "
            "torch_dist first (Megatron-LM: --ckpt-convert-format torch_dist --ckpt-convert-save DIR)"
        )
    meta = os.path.join(directory, "metadata.json")
    if not os.path.isfile(meta):
        raise NotConvertible(
            f"{directory} is not a Megatron distributed checkpoint: no metadata.json and no {TRACKER}; "
            f"it holds {entries[:8]}{' ...' if len(entries) > 8 else ''}"
        )
    with open(meta) as f:
        backend = json.load(f).get("sharded_backend")
    if backend != "torch_dist":
        raise NotConvertible(f"{directory} is a {backend!r} distributed checkpoint; convert-checkpoint reads torch_dist")
    return directory, iteration


@contextlib.contextmanager
def single_process_group():
    """A one-process gloo group for ``dist_checkpointing`` (kept if one exists already)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def cpu_checkpoint_io():
    """Hooks ``checkpoint-io-sync`` and ``checkpoint-io-device`` (:mod:`mhc_megatron.hooks`), only
    inside the converter: megatron-core's checkpoint writer calls ``torch.cuda.synchronize()`` and
    allocates a flag on ``torch.cuda.current_device()``; the converter's tensors are on the CPU and
    its group is gloo. Both are restored afterwards."""
    from .. import hooks

    with hooks.active("checkpoint-io-sync", "checkpoint-io-device"):
        yield


def read(path: str) -> Checkpoint:
    """The model part of the checkpoint at ``path``, unsharded (call inside :func:`single_process_group`)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import _CONTENT_METADATA_KEY, load_sharded_metadata
    from megatron.core.safe_globals import register_safe_globals

    register_safe_globals()  # the common state holds Megatron's args (a Namespace, enums)
    directory, iteration = locate(path)
    metadata = load_sharded_metadata(directory)
    wanted = {k: v for k, v in metadata.items() if _is_model(k)}
    not_carried = sorted(k for k in metadata if not _is_model(k) and k != "common_state/shard_0_1")
    with cpu_checkpoint_io():
        loaded = dist_checkpointing.load(wanted, directory, validate_access_integrity=False)
    common = dict(dist_checkpointing.load_common_state_dict(directory))
    content_metadata = common.pop(_CONTENT_METADATA_KEY, None)
    for name in [k for k in common if k in _COMMON_DROPPED]:
        not_carried.append(f"common:{name}")
        del common[name]
    tensors, objects = {}, {}
    for key, meta in wanted.items():
        if isinstance(meta, dist_checkpointing.ShardedTensor):
            tensors[key] = loaded[key]
        else:
            objects[key] = (meta.key, tuple(meta.global_shape), tuple(meta.global_offset), loaded[key])
    return Checkpoint(tensors, objects, common, content_metadata, iteration, not_carried)


def write(path: str, ckpt: Checkpoint) -> str:
    """Write ``ckpt`` as a torch_dist checkpoint under ``path`` (the same structure as it was read
    from: a save directory with the tracker file, or one iteration); returns the iteration
    directory. ``path`` must not exist or be empty."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    if os.path.exists(path) and os.listdir(path):
        raise NotConvertible(f"{path} exists and is not empty; give a new directory for the converted checkpoint")
    directory = path
    if ckpt.iteration is not None:
        name = "release" if ckpt.iteration == "release" else f"iter_{int(ckpt.iteration):07d}"
        directory = os.path.join(path, name)
    os.makedirs(directory, exist_ok=True)
    state = dict(ckpt.common)
    for key, tensor in ckpt.tensors.items():
        state[f"tensor:{key}"] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=0)
    for unique, (key, shape, offset, data) in ckpt.objects.items():
        state[f"object:{unique}"] = ShardedObject(key, data, shape, offset, replica_id=0)
    with cpu_checkpoint_io():
        dist_checkpointing.save(state, directory, content_metadata=ckpt.content_metadata)
    if ckpt.iteration is not None:
        with open(os.path.join(path, TRACKER), "w") as f:
            f.write(ckpt.iteration)
    return directory
