"""The three modules that turn a megatron-core ``TransformerLayer`` into an mHC layer.

They fill existing slots of ``TransformerLayerSubmodules``, so Megatron's own layer code (and
its attention, MLP, MoE and norm modules) runs unchanged:

* norm slots (``input_layernorm``, ``pre_mlp_layernorm``) -> :class:`MHCSublayerInput`:
  reads the n-stream residual ``[s, b, n*C]``, computes ``H_pre, H_post, H_res`` and returns
  ``(norm(H_pre · x), MHCResidual)`` — the ``(output, residual)`` pair every Megatron norm call
  site accepts;
* bias-dropout-add slots (``self_attn_bda``, ``mlp_bda``) -> :class:`MHCSublayerOutput`:
  ``H_res · x + H_post^T · dropout(F + bias)``, flattened back to ``[s, b, n*C]``;
* the block's final norm -> :class:`MHCStreamContraction`: the mean (or sum) of the streams,
  then the original norm.

The first global layer's attention input module also expands the embedding ``[s, b, C]`` into
n streams, so a model's entry and exit are where Megatron already has them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from .. import ops
from ..ops import choose_backend
from .coefficients import MHCCoefficients
from .recompute import BlockRecompute, RecomputeChain, recomputed
from .profiling import region
from .settings import MHCSettings
from .streams import join, on_high_priority_stream

if TYPE_CHECKING:
    from ..kernels.sublayer import SublayerLink


@dataclass
class MHCResidual:
    """What an mHC sublayer carries from its input module to its output module."""

    x: torch.Tensor  # the n-stream residual [s, b, n, C]
    h_post: torch.Tensor  # [s, b, n]
    h_res: torch.Tensor  # [s, b, n, n]
    chain: RecomputeChain | None = None  # set when the sublayer is in a recompute block
    position: int = 0
    kernels: bool = False  # the Triton kernels run this sublayer
    link: SublayerLink | None = None  # the kernels' shared g_x buffer (when building a graph)

    def float(self) -> "MHCResidual":
        """For ``fp32_residual_connection``: Megatron calls ``residual.float()``."""
        return MHCResidual(self.x.float(), self.h_post, self.h_res, self.chain, self.position, self.kernels, self.link)

    def record_stream(self, stream) -> None:
        """Megatron's expert-parallel combine node marks the residual as used on its stream."""
        for t in (self.x, self.h_post, self.h_res):
            t.record_stream(stream)


def _unflatten_streams(hidden_states: torch.Tensor, n: int, hidden_size: int, where: str) -> torch.Tensor:
    if hidden_states.shape[-1] != n * hidden_size:
        raise ValueError(
            f"{where} expects the {n}-stream residual [s, b, {n}*{hidden_size}] = "
            f"[..., {n * hidden_size}], got shape {tuple(hidden_states.shape)}. A pipeline "
            "stage must exchange n-stream tensors (see docs/megatron.md, pipeline parallelism)"
        )
    return hidden_states.unflatten(-1, (n, hidden_size))


class MHCSublayerInput(MegatronModule):
    """Norm slot of an mHC sublayer: coefficients, pre-mix ``H_pre · x``, then the inner norm.

    Args:
        norm: the layer norm builder the residual spec had in this slot (``IdentityOp`` where
            the norm is fused into the next linear, as in transformer-engine's dense spec).
        coefficients: spec of the coefficient module (:class:`MHCCoefficients` or
            :class:`HCCoefficients`).
        expand_input: the model's first sublayer: its input is the C-wide embedding.
        recompute: the recompute block this sublayer belongs to (``None``: keep everything),
            and ``position`` its index in the block.
    """

    #: Megatron-LM main (megatron-core 0.20) unpacks a norm's ``(output, residual)`` pair only when
    #: the norm declares it; 0.19 unpacks any tuple. We always return the pair.
    returns_residual = True

    def __init__(
        self,
        config,
        hidden_size: int,
        eps: float,
        *,
        norm,
        coefficients: ModuleSpec,
        settings: MHCSettings,
        expand_input: bool = False,
        recompute: BlockRecompute | None = None,
        position: int = 0,
    ):
        super().__init__(config=config)
        self.n = settings.expansion_rate
        self.hidden_size = hidden_size
        self.expand_input = expand_input
        self.backend = settings.backend
        self.recompute = recompute
        self.position = position
        self.coefficients = build_module(
            coefficients, config=config, hidden_size=hidden_size, settings=settings
        )
        self.norm = norm(config=config, hidden_size=hidden_size, eps=eps)

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = join(hidden_states)  # the previous MLP's post+res may still be on its stream
        if self.expand_input:
            if hidden_states.shape[-1] != self.hidden_size:
                raise ValueError(
                    f"the model's first mHC sublayer expects the embedding [s, b, {self.hidden_size}], "
                    f"got shape {tuple(hidden_states.shape)}"
                )
            with region("expand"):
                x = ops.expand_streams(hidden_states, self.n)
                if self.recompute is None or not torch.is_grad_enabled():
                    # materialise the streams once: every mHC step keeps x for backward, and
                    # each would otherwise keep its own contiguous copy of the broadcast view.
                    # (A recompute block keeps the view itself: C instead of nC elements.)
                    x = x.contiguous()
        else:
            x = _unflatten_streams(
                hidden_states, self.n, self.hidden_size,
                f"mHC sublayer {self.coefficients.sublayer_index}",
            )
        grad = torch.is_grad_enabled()
        with region("pre"):
            if self._uses_kernels(x):
                h_post, h_res, y, residual = self._kernel_step(x, grad)
            elif self.recompute is not None and grad:
                chain = self.recompute.chain_for(self.position, x)
                h_post, h_res, y = recomputed(
                    self._coefficients_and_pre, chain, self.position, x, *self.coefficients.coefficient_parameters()
                )
                residual = MHCResidual(x, h_post, h_res, chain, self.position)
            else:
                h_post, h_res, y = self._coefficients_and_pre(x)
                residual = MHCResidual(x, h_post, h_res)
        normed = self.norm(y)
        if isinstance(normed, tuple):  # a residual-fused norm returns (output, residual)
            normed = normed[0]
        return normed, residual

    def _uses_kernels(self, x: torch.Tensor) -> bool:
        """mHC with the Triton kernels chosen for this input (HC has none)."""
        return isinstance(self.coefficients, MHCCoefficients) and choose_backend(
            "mhc_sublayer", self.backend, x, n=self.n
        ) == "triton"

    def _kernel_step(self, x: torch.Tensor, grad: bool):
        """Coefficients + pre-mix as one autograd function sharing ``g_x`` with the post+res
        step (:mod:`mhc_megatron.kernels.sublayer`); under recompute ``x`` comes from the chain."""
        from ..kernels.sublayer import SublayerLink

        chain, link = None, None
        if grad:
            if self.recompute is not None:
                chain = self.recompute.chain_for(self.position, x)
                # position 0 keeps the block's input itself; later ones take it from the chain
                link = SublayerLink(None if self.position == 0 else chain.source(self.position))
                if self.position:
                    chain.register_use(self.position)  # the post+res half takes it too
            else:
                link = SublayerLink()
        _, h_post, h_res, y = self.coefficients(x, with_pre=True, link=link)
        return h_post, h_res, y, MHCResidual(x, h_post, h_res, chain, self.position, True, link)

    def _coefficients_and_pre(self, x: torch.Tensor, *params: torch.Tensor):
        h_pre, h_post, h_res = self.coefficients(x, *params)
        return h_post, h_res, ops.mhc_pre(x, h_pre, backend=self.backend)


class MHCSublayerOutput(torch.nn.Module):
    """Bias-dropout-add slot of an mHC sublayer: ``H_res · x + H_post^T · dropout(F + bias)``
    (``dropout="per-stream"`` in the settings: ``H_res · x + dropout(H_post^T · (F + bias))``).

    Called like Megatron's ``get_bias_dropout_add``: ``module(training, fused)`` returns the
    function ``(output_with_bias, residual, dropout_prob) -> next residual``.
    """

    def __init__(
        self, config=None, settings: MHCSettings | None = None, high_priority_stream: bool = False,
        contract: bool = False, defer_join: bool = False,
    ):
        super().__init__()
        self.backend = settings.backend if settings is not None else "auto"
        self.dropout = settings.dropout if settings is not None else "shared"
        self.high_priority_stream = high_priority_stream
        # the next mHC sublayer's input joins the side stream (the block spec decides: see
        # mhc_block_spec)
        self.defer_join = high_priority_stream and defer_join and not contract
        # the model's last sublayer where the final norm is not a spec slot (HybridModel)
        self.contraction = settings.contraction if contract else None

    def forward(self, training: bool, fused: bool = False):
        return functools.partial(
            self._post_residual, training=training, backend=self.backend, side_stream=self.high_priority_stream,
            defer_join=self.defer_join, contraction=self.contraction, fused=fused, per_stream=self.dropout == "per-stream",
        )

    @staticmethod
    def _post_residual(
        output_with_bias, residual, prob: float, training: bool, backend: str, side_stream: bool = False,
        defer_join: bool = False, contraction: str | None = None, fused: bool = False, per_stream: bool = False,
    ) -> torch.Tensor:
        if not isinstance(residual, MHCResidual):
            raise TypeError(
                "MHCSublayerOutput needs the MHCResidual made by MHCSublayerInput in the same "
                f"sublayer's norm slot, got {type(residual).__name__}; build the layer with "
                "mhc_megatron.mcore.specs"
            )
        out, bias = output_with_bias
        p = prob if training else 0.0
        chain, position = residual.chain, residual.position
        if per_stream and p > 0:
            # upstream's placement, PyTorch reference only (the settings refuse it with the kernels
            # and with recompute)
            if residual.kernels or chain is not None:
                raise ValueError("--mhc-dropout per-stream runs with --mhc-kernels reference and without --mhc-recompute")
            run = functools.partial(ops.mhc_post_res, backend="reference", bias=bias, stream_dropout=p)
            replays = []
        elif residual.kernels:
            if not fused:  # Megatron's unfused bias-dropout-add: its two passes, then the kernel
                out, bias, p = _bias_dropout(out, bias, p), None, 0.0
            from ..kernels.post_res import mhc_post_res_triton

            replays = []

            def run(x, f, h_post, h_res):
                x_next, replay = mhc_post_res_triton(x, f, h_post, h_res, bias, p, residual.link)
                replays.append(replay)
                return x_next
        else:
            out = _bias_dropout(out, bias, p)
            post = functools.partial(ops.mhc_post_res, backend=backend)
            if chain is not None and torch.is_grad_enabled():
                run = functools.partial(recomputed, post, chain, position)
            else:
                run = post
            replays = [lambda x_again: post(x_again, out, residual.h_post, residual.h_res)]
        args = (out, residual.h_post, residual.h_res)
        with region("post_res"):
            x = on_high_priority_stream(run, residual.x, *args, defer_join=defer_join) if side_stream else run(residual.x, *args)
        if chain is not None and torch.is_grad_enabled():
            chain.record_post(position, replays[0], x)
        if contraction is not None:
            with region("contract"):
                return ops.contract_streams(x, contraction)
        return x.flatten(-2)


def streams_of(models) -> int:
    """The number of residual streams n the built model (chunks) carries: 1 without mHC/HC modules."""
    found = {m.n for model in models for m in model.modules() if isinstance(m, (MHCSublayerInput, MHCStreamContraction))}
    if len(found) > 1:
        raise ValueError(f"the model chunks mix expansion rates {sorted(found)}")
    return found.pop() if found else 1


def _bias_dropout(out: torch.Tensor, bias, p: float) -> torch.Tensor:
    if bias is not None:
        out = out + bias
    return torch.nn.functional.dropout(out, p=p, training=True) if p > 0 else out


class MHCStreamContraction(MegatronModule):
    """Final-norm slot: contract the n streams (mean or sum), then the original final norm."""

    def __init__(self, config, hidden_size: int, eps: float, *, norm, settings: MHCSettings):
        super().__init__(config=config)
        self.n = settings.expansion_rate
        self.hidden_size = hidden_size
        self.reduction = settings.contraction
        self.norm = norm(config=config, hidden_size=hidden_size, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = _unflatten_streams(join(hidden_states), self.n, self.hidden_size, "the mHC stream contraction")
        with region("contract"):
            y = ops.contract_streams(x, self.reduction)
        return self.norm(y)
