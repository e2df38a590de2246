"""Worker functions run in spawned gloo processes by the multi-process tests."""

from __future__ import annotations

import torch

from mcore_helpers import build_gpt, full_gradients, init_megatron, lm_loss, make_batch, tiny_config
from mhc_megatron.mcore import MHCSettings


def _settings(mode: str, n: int = 4) -> MHCSettings:
    return MHCSettings(mode=mode, expansion_rate=n)


class _NoStream:
    """``torch.cuda.current_stream()`` on the CPU: Megatron's gradient buckets ask for it and wait
    on CUDA-graph events they do not have here."""

    def wait_event(self, event):
        raise AssertionError("no CUDA events on the CPU")

    def wait_stream(self, stream):
        pass


def tp_loss_and_grads(rank, world_size, port, tp, mode, sequence_parallel):
    """One forward/backward at tensor-parallel size ``tp`` through Megatron's training path: the
    model wrapped in megatron-core's ``DistributedDataParallel`` (gradients accumulate into its
    buffers' ``main_grad``), then ``finalize_model_grads`` as ``train_step`` calls it (data-parallel
    sync, and under sequence parallelism the all-reduce of replicated parameters' gradients over
    the tensor-parallel group). Returns full (gathered) gradients."""
    from unittest import mock

    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    init_megatron(rank, world_size, port, tp=tp)
    cfg = tiny_config(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    model = build_gpt(cfg, _settings(mode), sp_norm=True)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), model)
    ddp.zero_grad_buffer()
    loss = lm_loss(ddp, make_batch())
    loss.backward()
    with mock.patch.object(torch.cuda, "current_stream", lambda device=None: _NoStream()):
        finalize_model_grads([ddp])
    # DDP's hooks moved every gradient into its buffers, where finalize_model_grads reduced them
    assert all(p.grad is None and p.main_grad is not None for p in model.parameters())
    # mHC parameters must start identical on every tensor-parallel rank
    group = parallel_state.get_tensor_model_parallel_group()
    replicated = {}
    for name, p in model.named_parameters():
        if ".coefficients." in name:
            ref = p.detach().clone()
            torch.distributed.broadcast(ref, src=torch.distributed.get_global_rank(group, 0), group=group)
            replicated[name] = torch.equal(ref, p.detach())
    return {"loss": loss.item(), "grads": full_gradients(model), "replicated": replicated}


def _train_steps(model, start: int, steps: int, lr: float = 0.05) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(start, start + steps):
        loss = lm_loss(model, make_batch(seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _per_token_loss(model) -> torch.Tensor:
    tokens, positions, labels = make_batch(seed=1000)
    with torch.no_grad():
        return model(tokens, positions, None, labels=labels).float()


def train_and_save(rank, world_size, port, tp, mode, ckpt_dir, steps_before, steps_after):
    """Train ``steps_before`` SGD steps, save a distributed checkpoint, train on."""
    from megatron.core import dist_checkpointing

    init_megatron(rank, world_size, port, tp=tp)
    model = build_gpt(tiny_config(tensor_model_parallel_size=tp), _settings(mode))
    before = _train_steps(model, 0, steps_before)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    at_save = _per_token_loss(model)
    after = _train_steps(model, steps_before, steps_after)
    return {"before": before, "at_save": at_save, "after": after}


def load_and_train(rank, world_size, port, tp, mode, ckpt_dir, start, steps_after):
    """Build a differently initialised model, load the checkpoint, train on from ``start``."""
    from megatron.core import dist_checkpointing

    init_megatron(rank, world_size, port, tp=tp)
    model = build_gpt(tiny_config(tensor_model_parallel_size=tp), _settings(mode), seed=999)
    fresh = _per_token_loss(model)
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state)
    at_load = _per_token_loss(model)
    after = _train_steps(model, start, steps_after)
    return {"fresh": fresh, "at_load": at_load, "after": after}
