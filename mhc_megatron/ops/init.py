"""Initial values for the parameters of one mHC or HC sublayer."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._checks import check_expansion_rate
from .coefficients import num_coefficients

#: The paper's initial value of the three scalar gates (alpha_pre, alpha_post, alpha_res).
DEFAULT_ALPHA = 0.01
#: ``ours`` (below) or ``upstream``: upstream Megatron-LM's initialisation.
INIT_SCHEMES = ("ours", "upstream")


class MHCParameters(NamedTuple):
    phi: torch.Tensor  # [n*C, n*n + 2n]
    bias: torch.Tensor  # [n*n + 2n]
    alpha: torch.Tensor  # [3]


class HCParameters(NamedTuple):
    theta: torch.Tensor  # [C, n + 2]
    bias: torch.Tensor  # [n*n + 2n]
    alpha: torch.Tensor  # [3]


def _check_hidden(hidden) -> int:
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden width C must be a positive integer, got {hidden!r}")
    return hidden


def init_mhc_parameters(
    n: int,
    hidden: int,
    *,
    alpha: float = DEFAULT_ALPHA,
    phi_std: float | None = None,
    res_diag: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    scheme: str = "ours",
) -> MHCParameters:
    """Initial ``(phi, bias, alpha)`` of an mHC sublayer, chosen so it starts as a residual layer.

    ``scheme="upstream"`` is upstream Megatron-LM's initialisation instead: ``phi`` xavier-uniform
    (``U(-b, b)``, ``b = sqrt(6 / (nC + n*n + 2n))``), every bias 0 (so ``H_pre = 1/2``,
    ``H_post = 1``, ``H_res`` uniform), gates ``alpha``; ``phi_std`` and ``res_diag`` belong
    to our scheme and must keep their defaults with it. Our scheme (the default):

    The paper fixes only the gates (``alpha = 0.01``). Our choices for the rest:

    * ``bias_pre = logit(1/n)``: ``H_pre = 1/n`` per stream, so the sublayer input is the mean
      of the streams (for ``n = 1``, where ``logit(1)`` does not exist, ``bias_pre = 0`` and
      ``H_pre = 1/2``). Megatron's pre-norms have an epsilon comparable to the square of its
      small initial activations, so the scale of ``H_pre · x`` is not irrelevant.
    * ``bias_post = 0``: ``H_post = 2 sigmoid(0) = 1``.
    * ``bias_res = res_diag * I``: with the default 0, ``H_res`` starts as the uniform ``1/n``
      matrix (upstream Megatron's choice); ``res_diag`` of about 4 to 8 starts it close to the
      identity instead (the demo can compare both).
    * ``phi ~ N(0, phi_std^2)`` with ``phi_std = 1/sqrt(nC)``: the dynamic part
      ``alpha (v phi) / r`` then has a standard deviation of about ``alpha`` — a small
      perturbation. It must not be zero: the streams enter as identical copies, and with
      ``phi = 0`` and these symmetric biases every stream would get the same gradient forever,
      so the model would never become anything but a residual model. With a single stream
      (``n = 1``) there is no symmetry to break and ``phi`` starts at zero.

    Why this is a residual layer at the start: with identical streams ``x_i = h``, every row of
    ``H_res`` sums to 1, so ``H_res x = x``; ``H_pre x = h`` (the mean); ``H_post ~ 1`` adds
    ``F(h)`` to every stream: every stream becomes ``h + F(h)`` up to the small dynamic part.
    For ``n = 1``: ``H_res = 1`` (a 1x1 Sinkhorn is always 1), ``H_post = 1`` exactly and
    ``F(h/2) = F(h)`` for a scale-invariant pre-norm ``F``, so the layer is ``x + F(x)``.
    """
    n = check_expansion_rate(n)
    hidden = _check_hidden(hidden)
    m = num_coefficients(n)
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"mHC init scheme must be one of {', '.join(INIT_SCHEMES)}, got {scheme!r}")
    if scheme == "upstream":
        if phi_std is not None or res_diag != 0.0:
            raise ValueError(
                "the upstream init scheme sets phi (xavier) and every bias (0) itself; "
                f"phi_std={phi_std!r} and res_diag={res_diag!r} belong to scheme 'ours'"
            )
        bound = math.sqrt(6.0 / (n * hidden + m))  # xavier_uniform_ of upstream's [m, nC] weight
        weight = torch.empty(m, n * hidden, dtype=dtype, device=device).uniform_(-bound, bound, generator=generator)
        return MHCParameters(
            weight.t().contiguous(),
            torch.zeros(m, dtype=dtype, device=device),
            torch.full((3,), float(alpha), dtype=dtype, device=device),
        )
    if phi_std is None:
        phi_std = 1.0 / math.sqrt(n * hidden) if n > 1 else 0.0
    phi = torch.empty(n * hidden, m, dtype=dtype, device=device)
    if phi_std > 0:
        phi.normal_(0.0, phi_std, generator=generator)
    else:
        phi.zero_()
    bias = torch.zeros(m, dtype=dtype, device=device)
    if n > 1:
        bias[:n] = math.log(1.0 / (n - 1))  # logit(1/n)
    bias[2 * n :].view(n, n).diagonal().fill_(res_diag)
    gates = torch.full((3,), float(alpha), dtype=dtype, device=device)
    return MHCParameters(phi, bias, gates)


def init_hc_parameters(
    n: int,
    hidden: int,
    layer_index: int,
    *,
    alpha: float = DEFAULT_ALPHA,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> HCParameters:
    """Initial ``(theta, bias, alpha)`` of an unconstrained HC sublayer, pre-norm style.

    As in the Hyper-Connections paper: the dynamic projection ``theta`` starts at zero and the
    static part makes the layer a pre-norm residual layer: ``H_res = I``, ``H_post = 1`` and
    ``H_pre`` the one-hot vector of stream ``layer_index mod n`` (which also breaks the
    symmetry between the streams).
    """
    n = check_expansion_rate(n)
    hidden = _check_hidden(hidden)
    if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 0:
        raise ValueError(f"layer_index must be an integer >= 0, got {layer_index!r}")
    theta = torch.zeros(hidden, n + 2, dtype=dtype, device=device)
    bias = torch.zeros(num_coefficients(n), dtype=dtype, device=device)
    bias[layer_index % n] = 1.0
    bias[n : 2 * n] = 1.0
    bias[2 * n :].view(n, n).diagonal().fill_(1.0)
    gates = torch.full((3,), float(alpha), dtype=dtype, device=device)
    return HCParameters(theta, bias, gates)
