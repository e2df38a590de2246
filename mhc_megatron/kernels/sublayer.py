"""One mHC sublayer's two halves as two autograd functions that share the gradient of ``x``.

An mHC sublayer reads its n-stream input ``x`` three times: the coefficient projection, the
pre-mix and the post + residual step. Left to autograd, each backward would write its own
partial ``g_x`` (nC per token) and autograd would add them: two more passes that read 2nC and
write nC each. Here the backward kernels accumulate into one buffer instead, in the stream dtype:

1. ``post + res`` backward (the first to run: F's backward needs its ``g_f``) writes
   ``g_x = H_res^T g_out`` into a fresh buffer and hands it to the :class:`SublayerLink`;
2. the input half's backward (:class:`SublayerInputFunction`, which runs after F's backward)
   takes the buffer, the pre-mix backward adds ``H_pre ⊗ g_y`` to it, and
3. the projection backward adds ``g_proj @ phi^T + c v``, and the buffer is returned to
   autograd as the gradient of ``x``.

Each step reads the buffer, adds its term in fp32 and stores the sum rounded to the stream
dtype, so ``g_x = rnd(rnd(rnd(post) + pre) + coefficients)``. The data dependencies fix that order:
the input half's outputs ``H_post, H_res`` feed the post + res step and ``y`` feeds F, so its
backward runs after both. If the output half got no gradient, the input half starts the buffer.

Under mHC recompute (:mod:`mhc_megatron.mcore.recompute`) the link also stands in for ``x``:
neither half keeps it; in backward both ask the link, which asks the block's recompute chain.
"""

from __future__ import annotations

import torch

from .coefficients import coefficient_grads, coefficients_backward, coefficients_forward
from .pre import pre_backward, pre_forward


class SublayerLink:
    """The shared state of one call of one sublayer (see the module docstring).

    ``x_source``: ``None`` keeps ``x`` for backward as usual; a callable returns it in backward
    instead (called once by each half).
    """

    def __init__(self, x_source=None):
        self.x_source = x_source
        self._grad: torch.Tensor | None = None
        self._written = None

    @property
    def keeps_x(self) -> bool:
        return self.x_source is None

    def stream_input(self) -> torch.Tensor:
        return self.x_source()

    def start_grad(self, g_x: torch.Tensor) -> None:
        if self._grad is not None:
            raise RuntimeError("mHC sublayer: the post+res backward ran twice before the input half took its gradient")
        self._grad = g_x
        # the post+res step may run on the high-priority stream: remember where g_x was written
        self._written = _record_event(g_x)

    def take_grad(self) -> torch.Tensor | None:
        g, self._grad = self._grad, None
        if g is not None:
            _use_on_current_stream(g, self._written)
        return g


def _record_event(t: torch.Tensor):
    if not t.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(t.device))
    return event


def _use_on_current_stream(t: torch.Tensor, written) -> None:
    """Order this stream after the write of ``t`` and keep the allocator from reusing ``t``'s
    memory before this stream is done with it (a tensor that crosses streams outside autograd)."""
    if t.is_cuda and written is not None:
        stream = torch.cuda.current_stream(t.device)
        stream.wait_event(written)
        t.record_stream(stream)


class SublayerInputFunction(torch.autograd.Function):
    """Coefficients and pre-mix of one sublayer: ``x [T, n, C] -> (y, h_pre, h_post, h_res)``.

    Keeps (besides ``x`` unless the link provides it) only per-token floats the backward
    needs: the projections and sum of squares (m + 1) and ``H_pre`` (n). ``h_pre`` is returned
    for diagnostics only (its gradient flows through ``y``).
    """

    @staticmethod
    def forward(ctx, x, phi, bias, alpha, n, iters, eps, link):
        T, _, C = x.shape
        xc = x.contiguous()  # x may be a broadcast view: kept as it is (see PostResFunction)
        h_pre, h_post, h_res, proj, sumsq = coefficients_forward(xc.view(T, n * C), phi, bias, alpha, n, iters, eps)
        y = pre_forward(xc, h_pre)
        keep_x = link is None or link.keeps_x
        ctx.save_for_backward(x if keep_x else None, phi, bias, alpha, proj, sumsq, h_pre)
        ctx.n, ctx.iters, ctx.eps, ctx.link, ctx.x_shape = n, iters, eps, link, x.shape
        ctx.mark_non_differentiable(h_pre)
        ctx.set_materialize_grads(False)  # no zeros for outputs without a gradient (h_pre)
        return y, h_pre, h_post, h_res

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_y, _g_h_pre, g_h_post, g_h_res):
        x, phi, bias, alpha, proj, sumsq, h_pre = ctx.saved_tensors
        link, n = ctx.link, ctx.n
        if x is None:
            x = link.stream_input().reshape(ctx.x_shape)
        x = x.contiguous()
        T, _, C = x.shape
        g_x = link.take_grad() if link is not None else None
        if g_y is not None:
            g_x, g_h_pre = pre_backward(g_y.contiguous(), x, h_pre, g_x)
        else:
            g_h_pre = None
        g_pre, g_post, g_res = coefficient_grads(g_h_pre, g_h_post, g_h_res, T, n, x.device)
        g_v, g_phi, g_bias, g_alpha = coefficients_backward(
            x.view(T, n * C), phi, bias, alpha, proj, sumsq, g_pre, g_post, g_res, n, ctx.iters, ctx.eps,
            g_v=None if g_x is None else g_x.view(T, n * C),
        )
        return g_v.view(T, n, C), g_phi, g_bias, g_alpha, None, None, None, None


def mhc_sublayer_input_triton(x, phi, bias, alpha, iters: int, eps: float, link: SublayerLink | None = None):
    """``(y [..., C], h_pre [..., n], h_post [..., n], h_res [..., n, n])`` of ``x [..., n, C]``:
    :func:`~mhc_megatron.ops.mhc_coefficients` then :func:`~mhc_megatron.ops.mhc_pre`, as one
    autograd function whose backward accumulates into the link's ``g_x`` buffer."""
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    y, h_pre, h_post, h_res = SublayerInputFunction.apply(
        x.reshape(-1, n, C), phi.float().contiguous(), bias.float().contiguous(),
        alpha.float().contiguous(), n, iters, eps, link,
    )
    return y.view(*lead, C), h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n)
