"""The mHC first schedule node for --overlap-moe-expert-parallel-comm (mhc_megatron/mcore/fine_grained.py).

megatron-core's schedule nodes cut the autograd graph between nodes: the first node detaches the
residual (``TransformerLayerNode.detach``) and, in backward, runs autograd on its outputs together
with the tensors it detached, fed with the gradients the later node left on the detached copies
(``backward_impl``). These tests drive megatron-core's own two methods across one mHC sublayer cut
in two (coefficients + pre-mix in the first node; F and post+res in the combine node) and compare
the gradients with the uncut PyTorch reference.
"""

import types

import pytest
import torch

from megatron.core.models.common.utils import TransformerLayerNode
from megatron.core.pipeline_parallel.utils import ScheduleNode
from mhc_megatron import ops
from mhc_megatron.kernels.post_res import mhc_post_res_triton
from mhc_megatron.kernels.sublayer import SublayerLink, mhc_sublayer_input_triton
from mhc_megatron.mcore.fine_grained import detached_residual
from mhc_megatron.mcore.sublayer import MHCResidual
from test_kernels import DEVICE, tol

ITERS, N, C, T = 8, 4, 32, 6


def _node():
    """The state megatron-core's TransformerLayerNode.detach/backward_impl work on."""
    node = types.SimpleNamespace(before_detached=(), detached=())
    node.detach = lambda t: TransformerLayerNode.detach(node, t)
    node.backward = lambda outputs, grads: TransformerLayerNode.backward_impl(
        types.SimpleNamespace(detached=node.detached, before_detached=node.before_detached,
                              default_backward_func=lambda o, g: ScheduleNode.default_backward_func(None, o, g)),
        outputs, grads)
    return node


def _F(y):
    return torch.tanh(y) * 1.5


def _inputs():
    torch.manual_seed(0)
    m = ops.num_coefficients(N)
    return [torch.randn(T, N, C, device=DEVICE), torch.randn(N * C, m, device=DEVICE) / (N * C) ** 0.5,
            torch.randn(m, device=DEVICE), torch.rand(3, device=DEVICE) + 0.1]


def _leaves(inputs):
    return [t.detach().clone().requires_grad_() for t in inputs]


@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "triton"])
def test_a_sublayer_cut_at_the_node_boundary_has_the_uncut_gradients(kernels):
    g_out = torch.randn(T, N, C, device=DEVICE)
    ref = _leaves(_inputs())
    h_pre, h_post, h_res = ops.mhc_coefficients(*ref, ITERS, backend="reference")
    out = ops.mhc_post_res(ref[0], _F(ops.mhc_pre(ref[0], h_pre, backend="reference")), h_post, h_res,
                           backend="reference")
    out.backward(g_out)

    x, phi, bias, alpha = leaves = _leaves(_inputs())
    first = _node()
    if kernels:
        link = SublayerLink()
        y, _, h_post, h_res = mhc_sublayer_input_triton(x, phi, bias, alpha, ITERS, 1e-6, link)
    else:
        link = None
        h_pre, h_post, h_res = ops.mhc_coefficients(x, phi, bias, alpha, ITERS, backend="reference")
        y = ops.mhc_pre(x, h_pre, backend="reference")
    residual = detached_residual(MHCResidual(x, h_post, h_res, kernels=kernels, link=link), first.detach)
    y_cut = first.detach(y)  # the node's output, the next node's input
    # the combine node: F then post+res on the detached tensors
    if kernels:
        cut_out = mhc_post_res_triton(residual.x, _F(y_cut), residual.h_post, residual.h_res, None, 0.0, link)[0]
    else:
        cut_out = ops.mhc_post_res(residual.x, _F(y_cut), residual.h_post, residual.h_res, backend="reference")
    cut_out.backward(g_out)
    # the first node's backward, as megatron-core runs it (outputs: none besides the detached ones)
    first.backward((), ())

    for got, want, name in zip(leaves, ref, ["x", "phi", "bias", "alpha"]):
        torch.testing.assert_close(got.grad, want.grad, **tol("tf32 grad" if DEVICE == "cuda" else "grad", torch.float32), msg=f"gradient of {name}")
