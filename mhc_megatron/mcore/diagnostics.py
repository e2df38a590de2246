"""Stability diagnostics of a built model: its actual H_res matrices and their Amax gains."""

from __future__ import annotations

import contextlib

import torch

from .. import ops
from .coefficients import HCCoefficients, MHCCoefficients


@contextlib.contextmanager
def capture_h_res(model: torch.nn.Module):
    """Within the block, every coefficient module's ``H_res`` of the last forward is recorded.

    Yields a dict ``{sublayer_index: h_res [s, b, n, n]}`` (detached, float32).
    """
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for module in model.modules():
        if isinstance(module, (MHCCoefficients, HCCoefficients)):

            def hook(mod, inputs, output):
                captured[mod.sublayer_index] = output[2].detach().float()

            hooks.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


def gain_summary(h_res_by_sublayer: dict[int, torch.Tensor]) -> dict:
    """:func:`mhc_megatron.ops.gain_profile` of the captured matrices, in sublayer order."""
    return ops.gain_profile([h_res_by_sublayer[i] for i in sorted(h_res_by_sublayer)])
