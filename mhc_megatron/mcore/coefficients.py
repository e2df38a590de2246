"""Modules that own one sublayer's coefficient parameters and compute H_pre, H_post, H_res.

Two implementations with one interface (``forward(x [..., n, C]) -> (h_pre, h_post, h_res)``),
chosen by spec: :class:`MHCCoefficients` (Sinkhorn-constrained) and :class:`HCCoefficients`
(unconstrained Hyper-Connections, for comparison).

The parameters are small and replicated on every tensor-parallel rank. They are created on the
CPU from the default generator (as megatron-core's MoE router does), which Megatron seeds alike
on all tensor-parallel ranks, so every rank starts with the same values. With sequence
parallelism each rank sees other tokens, so their gradients are marked ``sequence_parallel``
and megatron-core all-reduces them over the tensor-parallel group
(``finalize_model_grads``). Without sequence parallelism every rank computes the same gradient.

Precision: the parameters take the model's dtype like every other Megatron parameter (bf16 under
``--bf16``), so Megatron's mixed-precision optimizers keep their fp32 main copies and checkpoint
them; the coefficient maths upcasts them and runs in float32 (``compute``). fp32 parameters inside
a half-precision model are not an option: megatron-core 0.19's optimizers train them but cannot
checkpoint them (the distributed optimizer reorders mixed-dtype parameter groups, the
non-distributed one leaves fp32 parameters out of its sharded state), found by the real-loop bf16
checkpoint case.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from .. import ops
from .settings import MHCSettings


class _Coefficients(MegatronModule):
    """Shared plumbing: parameters, replication flags, the optional finiteness check."""

    def __init__(self, config, hidden_size: int, settings: MHCSettings, sublayer_index: int):
        super().__init__(config=config)
        self.settings = settings
        self.n = settings.expansion_rate
        self.hidden_size = hidden_size
        self.sublayer_index = sublayer_index
        self._create_parameters()
        if config.perform_initialization:
            self.reset_parameters()
        for p in self.parameters(recurse=False):
            p.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor, *params: torch.Tensor, with_pre: bool = False, link=None):
        """``(H_pre, H_post, H_res)`` of ``x``; ``params`` replace the module's own parameters
        (the recompute path passes them explicitly so that their gradients flow through it).
        ``with_pre`` (mHC with the Triton kernels): ``(H_pre, H_post, H_res, H_pre · x)`` from one
        autograd function sharing the gradient of ``x`` through ``link``
        (:mod:`mhc_megatron.kernels.sublayer`). The maths is float32 (float64 for float64 inputs),
        whatever the parameters' dtype."""
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        params = tuple(p.to(dt) for p in (params or self.coefficient_parameters()))
        h = self.compute_with_pre(x, *params, link=link) if with_pre else self.compute(x, *params)
        if self.settings.check_finite:
            _check_finite(h[:3], x, self.sublayer_index)
        return h


def _check_finite(h, x: torch.Tensor, sublayer_index: int) -> None:
    for name, t in zip(("H_pre", "H_post", "H_res"), h):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise FloatingPointError(
                f"{bad} of {t.numel()} {name} coefficients are NaN/Inf in mHC sublayer "
                f"{sublayer_index} (its residual input has {int((~torch.isfinite(x)).sum())} "
                "non-finite values). Lower the learning rate or --mhc-alpha-init, or check the "
                "data; --mhc-check-finite turns this check on and off"
            )


class MHCCoefficients(_Coefficients):
    """mHC coefficients: sigmoid pre/post gates and a Sinkhorn-projected H_res."""

    def _create_parameters(self) -> None:
        m = ops.num_coefficients(self.n)
        self.phi = torch.nn.Parameter(torch.empty(self.n * self.hidden_size, m, dtype=self.config.params_dtype))
        self.bias = torch.nn.Parameter(torch.empty(m, dtype=self.config.params_dtype))
        self.alpha = torch.nn.Parameter(torch.empty(3, dtype=self.config.params_dtype))

    def reset_parameters(self) -> None:
        s = self.settings
        init = ops.init_mhc_parameters(
            self.n, self.hidden_size, alpha=s.alpha_init, res_diag=s.res_init_diag, scheme=s.init
        )
        with torch.no_grad():
            for param, value in zip((self.phi, self.bias, self.alpha), init):
                param.copy_(value)

    def coefficient_parameters(self) -> tuple[torch.Tensor, ...]:
        return self.phi, self.bias, self.alpha

    def compute(self, x: torch.Tensor, phi, bias, alpha):
        s = self.settings
        return ops.mhc_coefficients(
            x, phi, bias, alpha, iters=s.sinkhorn_iters, eps=s.coeff_eps, backend=s.backend,
            sinkhorn_order=s.sinkhorn_order, eps_placement=s.norm_eps_placement,
        )

    def compute_with_pre(self, x: torch.Tensor, phi, bias, alpha, link=None):
        from ..kernels.sublayer import mhc_sublayer_input_triton

        s = self.settings
        y, h_pre, h_post, h_res = mhc_sublayer_input_triton(x, phi, bias, alpha, s.sinkhorn_iters, s.coeff_eps, link)
        return h_pre, h_post, h_res, y


class HCCoefficients(_Coefficients):
    """Unconstrained Hyper-Connections coefficients (tanh dynamic part plus static matrices)."""

    def _create_parameters(self) -> None:
        self.theta = torch.nn.Parameter(torch.empty(self.hidden_size, self.n + 2, dtype=self.config.params_dtype))
        self.bias = torch.nn.Parameter(torch.empty(ops.num_coefficients(self.n), dtype=self.config.params_dtype))
        self.alpha = torch.nn.Parameter(torch.empty(3, dtype=self.config.params_dtype))

    def reset_parameters(self) -> None:
        init = ops.init_hc_parameters(
            self.n, self.hidden_size, self.sublayer_index, alpha=self.settings.alpha_init
        )
        with torch.no_grad():
            for param, value in zip((self.theta, self.bias, self.alpha), init):
                param.copy_(value)

    def coefficient_parameters(self) -> tuple[torch.Tensor, ...]:
        return self.theta, self.bias, self.alpha

    def compute(self, x: torch.Tensor, theta, bias, alpha):
        # HC has no fused kernel (a comparison mode): the reference, whatever the backend
        return ops.hc_coefficients(x, theta, bias, alpha, eps=self.settings.coeff_eps, backend="reference")
