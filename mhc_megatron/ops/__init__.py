"""The mHC maths as a functional API (pure PyTorch references).

Everything a layer needs, with the spec's notation (``x`` is the n-stream residual ``[..., n, C]``):

* :func:`mhc_coefficients` / :func:`hc_coefficients`: ``H_pre``, ``H_post``, ``H_res`` per token;
* :func:`sinkhorn_knopp`: projection of ``H_res`` logits onto doubly stochastic matrices;
* :func:`mhc_pre`: the sublayer input ``H_pre · x``;
* :func:`mhc_post_res`: the next residual ``H_res · x + H_post^T · F(...)``;
* :func:`expand_streams` / :func:`contract_streams`: model entry and exit;
* :func:`amax_gain`, :func:`composite_mapping`, :func:`composite_amax_gain`, :func:`gain_profile`:
  stability diagnostics;
* :func:`init_mhc_parameters` / :func:`init_hc_parameters`: initial parameters of one sublayer.
"""

from ._backend import BACKENDS
from ._backend import choose as choose_backend
from ._checks import check_expansion_rate, check_iters
from .coefficients import EPS_PLACEMENTS, hc_coefficients, mhc_coefficients, num_coefficients
from .gain import amax_gain, composite_amax_gain, composite_mapping, gain_profile
from .init import (
    DEFAULT_ALPHA,
    INIT_SCHEMES,
    HCParameters,
    MHCParameters,
    init_hc_parameters,
    init_mhc_parameters,
)
from .sinkhorn import SINKHORN_ORDERS, sinkhorn_knopp
from .streams import DROPOUT_PLACEMENTS, contract_streams, expand_streams, mhc_post_res, mhc_pre

__all__ = [
    "BACKENDS",
    "DEFAULT_ALPHA",
    "DROPOUT_PLACEMENTS",
    "EPS_PLACEMENTS",
    "INIT_SCHEMES",
    "SINKHORN_ORDERS",
    "HCParameters",
    "MHCParameters",
    "amax_gain",
    "check_expansion_rate",
    "choose_backend",
    "check_iters",
    "composite_amax_gain",
    "composite_mapping",
    "contract_streams",
    "expand_streams",
    "gain_profile",
    "hc_coefficients",
    "init_hc_parameters",
    "init_mhc_parameters",
    "mhc_coefficients",
    "mhc_post_res",
    "mhc_pre",
    "num_coefficients",
    "sinkhorn_knopp",
]
