"""Test helpers for running megatron-core on CPU with the gloo backend.

The redirections of megatron-core's CUDA-only spots live here, in test code only:
``GlobalMemoryBuffer.get_tensor`` (sequence-parallel gathers allocate on the current CUDA device),
``CudaRNGStatesTracker.fork`` and ``_get/_set_cuda_rng_state`` (CUDA RNG state), the MoE router's ``gating`` (moves its weight
to the current CUDA device on the first forward), the sequence-parallel gather/scatter
mappings (allocate their outputs there) and, with Megatron-LM main, MTP's check for inference
linears (an ``isinstance`` against mocked transformer-engine classes without TE); in spawned workers also ``torch.cuda.current_device``
and ``torch.cuda.synchronize`` as a whole (see ``whole_process_on_cpu``). Attention uses the product's device-portable
``SDPACoreAttention``, so Megatron's ``DotProductAttention`` needs no redirection.

Every redirection is scoped: :func:`cpu_redirected` and :func:`whole_process_on_cpu` are context
managers that put the original objects back on exit. ``run_distributed``'s workers run their
function inside both; the ``megatron_world`` fixture (conftest) inside ``cpu_redirected`` for one
test. Nothing is patched at import time, and ``init_megatron`` patches nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import traceback
from unittest import mock

import torch
import torch.distributed as dist

VOCAB = 96
SEQ = 16
BATCH = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ACTIVE = 0  # nesting depth of cpu_redirected(): only the outermost one patches and restores


@contextlib.contextmanager
def cpu_redirected():
    """Redirect megatron-core's CUDA-only spots for the duration of the ``with`` block only; every
    redirected attribute is restored (the very object it was) on exit, also on an exception.
    Nested uses are no-ops inside the outermost one."""
    global _ACTIVE
    if _ACTIVE:
        _ACTIVE += 1
        try:
            yield
        finally:
            _ACTIVE -= 1
        return
    with contextlib.ExitStack() as stack:
        for owner, name, replacement in _redirections():
            stack.enter_context(mock.patch.object(owner, name, replacement))
        _ACTIVE = 1
        try:
            yield
        finally:
            _ACTIVE = 0


def redirected_attributes() -> list[tuple[object, str]]:
    """``(owner, name)`` of every attribute :func:`cpu_redirected` replaces (for the test that they
    come back)."""
    return [(owner, name) for owner, name, _ in _redirections()]


def _redirections() -> list[tuple[object, str, object]]:
    from megatron.core import utils as mcore_utils
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import multi_token_prediction
    from megatron.core.transformer.moe import router

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        return torch.empty(tensor_shape, dtype=dtype)

    @contextlib.contextmanager
    def fork(self, name=None):
        yield

    out = [
        (mcore_utils.GlobalMemoryBuffer, "get_tensor", get_tensor),
        (tp_random.CudaRNGStatesTracker, "fork", fork),
        # activation checkpointing (Megatron's selective recompute) saves and restores CUDA RNG state
        (tp_random, "_get_cuda_rng_state", lambda *args, **kwargs: torch.empty(0)),
        (tp_random, "_set_cuda_rng_state", lambda *args, **kwargs: None),
    ]
    for owner, name in (
        (router.Router, "gating"),
        (multi_token_prediction.MTPLossLoggingHelper, "save_metrics_to_tracker"),  # MTP's loss log buffer
        (mappings, "_gather_along_first_dim"),
        (mappings, "_reduce_scatter_along_first_dim"),
    ):
        out.append((owner, name, _on_cpu(getattr(owner, name))))
    out.extend(_without_te_no_inference_linears(multi_token_prediction))
    return out


def _without_te_no_inference_linears(multi_token_prediction) -> list[tuple[object, str, object]]:
    """Megatron-LM main (0.20): ``MultiTokenPredictionLayer`` asks
    ``is_inference_column_parallel_linear(eh_proj)``, an ``isinstance`` against classes derived
    from transformer-engine's; without transformer-engine those are mocks and ``isinstance``
    raises TypeError (for any model with MTP). No such layer exists without TE: answer False."""
    from megatron.core.extensions.transformer_engine import HAVE_TE

    if not HAVE_TE and hasattr(multi_token_prediction, "is_inference_column_parallel_linear"):
        return [(multi_token_prediction, "is_inference_column_parallel_linear", lambda module: False)]
    return []


def _on_cpu(cuda_fn):
    """``cuda_fn`` run with ``torch.cuda.current_device()`` answering "cpu"."""

    def redirected(*args, **kwargs):
        with mock.patch("torch.cuda.current_device", return_value="cpu"):
            return cuda_fn(*args, **kwargs)

    return redirected


def init_megatron(rank: int, world_size: int, port: int, tp: int = 1, pp: int = 1, **mp_kwargs) -> None:
    from megatron.core import parallel_state

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **mp_kwargs
    )


class SPRMSNorm(torch.nn.RMSNorm):
    """RMSNorm that accepts sequence parallelism (test stand-in for TENorm): its weight is
    marked so megatron-core all-reduces its gradient over the tensor-parallel group."""

    def __init__(self, config, hidden_size, eps=1e-5):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def tiny_config(**overrides):
    from mhc_megatron.mcore.portable import portable_config

    kwargs = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, normalization="RMSNorm",
                  hidden_dropout=0.0, attention_dropout=0.0)
    kwargs.update(overrides)
    return portable_config(**kwargs)


def local_block_spec(config, settings, *, sp_norm: bool = False, vp_stage=None, pp_rank=None, **spec_kwargs):
    """The local GPT spec with the portable attention, turned into an mHC block spec."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from mhc_megatron.mcore.attention import SDPACoreAttention
    from mhc_megatron.mcore.specs import mhc_block_spec, with_core_attention

    spec_kwargs.setdefault("normalization", config.normalization)
    layer = with_core_attention(get_gpt_layer_local_spec(**spec_kwargs), SDPACoreAttention)
    final_norm = None
    if sp_norm:
        layer = dataclasses.replace(
            layer,
            submodules=dataclasses.replace(
                layer.submodules, input_layernorm=SPRMSNorm, pre_mlp_layernorm=SPRMSNorm
            ),
        )
        final_norm = SPRMSNorm
    if final_norm is not None:
        count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        block = TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=final_norm)
        return mhc_block_spec(block, config, settings, vp_stage, pp_rank) if settings.enabled else block
    return mhc_block_spec(layer, config, settings, vp_stage, pp_rank)


def build_gpt(config, settings, *, seed: int = 1234, sp_norm: bool = False, **model_kwargs):
    from megatron.core.models.gpt import GPTModel

    torch.manual_seed(seed)
    spec = local_block_spec(config, settings, sp_norm=sp_norm)
    model_kwargs.setdefault("vocab_size", VOCAB)
    model_kwargs.setdefault("max_sequence_length", SEQ)
    return GPTModel(config, spec, **model_kwargs)


def make_batch(seed: int = 0, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    positions = torch.arange(seq).expand(batch, seq)
    return tokens[:, :-1].contiguous(), positions, tokens[:, 1:].contiguous()


def lm_loss(model, batch) -> torch.Tensor:
    tokens, positions, labels = batch
    return model(tokens, positions, None, labels=labels).float().mean()


def full_gradients(model) -> dict[str, torch.Tensor]:
    """Gradients of every parameter, gathered over tensor-parallel ranks to the full tensor
    (``main_grad`` where Megatron's ``DistributedDataParallel`` keeps them)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for name, p in model.named_parameters():
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g.contiguous(), group=group)
            g = torch.cat(parts, dim=p.partition_dim)
        out[name] = g.detach().clone()
    return out


@contextlib.contextmanager
def whole_process_on_cpu():
    """In a spawned worker: megatron-core's sequence-parallel backward, its gradient buffers and
    the distributed checkpoint writer call ``torch.cuda.current_device()`` /
    ``torch.cuda.synchronize()`` directly; answer "cpu" and do nothing (restored on exit)."""
    with mock.patch.object(torch.cuda, "current_device", lambda: "cpu"), \
            mock.patch.object(torch.cuda, "synchronize", lambda device=None: None):
        yield


def _worker(rank, world_size, port, fn, args, result_dir):
    try:
        with whole_process_on_cpu(), cpu_redirected():
            result = fn(rank, world_size, port, *args)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args):
    """Run ``fn(rank, world_size, port, *args)`` in ``world_size`` fresh processes; return the
    per-rank results (``fn`` must be a module-level function of an importable module)."""
    import torch.multiprocessing as mp

    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the children's import-time warnings
    with tempfile.TemporaryDirectory() as result_dir:
        port = free_port()
        try:
            mp.start_processes(
                _worker,
                args=(world_size, port, fn, args, result_dir),
                nprocs=world_size,
                start_method="spawn",
            )
        except Exception as err:
            errors = [
                open(os.path.join(result_dir, f)).read()
                for f in sorted(os.listdir(result_dir))
                if f.endswith(".err")
            ]
            raise AssertionError("distributed worker failed:\n" + "\n".join(errors)) from err
        return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
