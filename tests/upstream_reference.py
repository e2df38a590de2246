"""Test-only: upstream Megatron-LM's mHC written out from its formulas, on its own checkpoint layout.

Transcribed from Megatron-LM main's ``HyperConnectionModule`` and ``HyperConnectionTransformerLayer``
(``megatron/core/transformer/hyper_connection.py``, ``transformer_layer.py``); no upstream code
and nothing of the product is used. Three pieces:

* :func:`upstream_mappings` / :func:`upstream_sinkhorn`: the coefficient maths;
* :func:`upstream_gpt_weights` / :func:`write_upstream_checkpoint`: a tiny GPT model's tensors
  under upstream's distributed-checkpoint keys and shapes, written as a torch_dist checkpoint
  whose shards are cut like a TP=``tp`` run (column-/row-parallel splits, one shard per layer),
  with the linears' (empty) extra-state objects as megatron-core saves them;
* :func:`upstream_gpt_logits`: that model's forward pass (megatron-core's local GPT layers:
  learned absolute positions, RMSNorm, causal MHA with biases, GeLU MLP), every sublayer wrapped
  in upstream's mHC.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-6  # upstream's SinkhornKnopp.eps and HyperConnectionModule.norm_eps
GATES = ("alpha_pre", "alpha_post", "alpha_res")
HC = ("self_attention_hyper_connection", "mlp_hyper_connection")


def upstream_sinkhorn(h, iters):
    m = torch.exp(h - h.max(dim=-1, keepdim=True).values)
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True).clamp(min=EPS)  # rows
        m = m / m.sum(dim=-2, keepdim=True).clamp(min=EPS)  # columns
    return m


def upstream_mappings(x_flat, weight, bias, a_pre, a_post, a_res, n, iters):
    """x_flat [s, b, nC] -> (h_pre [s, b, n], h_post [s, b, n], h_res [s, b, n, n])."""
    r = x_flat.norm(dim=-1, keepdim=True) / math.sqrt(x_flat.shape[-1])
    r = 1.0 / (r + EPS)
    proj = x_flat @ weight.t()
    gates = torch.cat([a_pre.expand(n), a_post.expand(n), a_res.expand(n * n)])
    h = r * proj * gates + bias
    s, b = x_flat.shape[:2]
    return h[..., :n].sigmoid(), h[..., n : 2 * n].sigmoid() * 2, upstream_sinkhorn(h[..., 2 * n :].view(s, b, n, n), iters)


def upstream_gpt_weights(layers=2, hidden=32, ffn=64, vocab=96, seq=16, n=4, grown=3.0, seed=0, dtype=torch.float64):
    """Full tensors of a tiny upstream-mHC GPT model by checkpoint key (layer-stacked like a
    TransformerBlock saves them). ``grown``: scale of the mHC projection and biases, as after
    training (H_res logits far from uniform, so Sinkhorn has not converged at 20 iterations)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    m = n * n + 2 * n
    w = {
        "embedding.word_embeddings.weight": rnd(vocab, hidden),
        "embedding.position_embeddings.weight": rnd(seq, hidden, std=0.1),
        "decoder.final_layernorm.weight": 1 + rnd(hidden, std=0.1),
        "output_layer.weight": rnd(vocab, hidden, std=hidden ** -0.5),
    }
    L = layers
    w.update({
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": 1 + rnd(L, hidden, std=0.1),
        "decoder.layers.self_attention.linear_qkv.weight": rnd(L, 3 * hidden, hidden, std=hidden ** -0.5),
        "decoder.layers.self_attention.linear_qkv.bias": rnd(L, 3 * hidden, std=0.1),
        "decoder.layers.self_attention.linear_proj.weight": rnd(L, hidden, hidden, std=hidden ** -0.5),
        "decoder.layers.self_attention.linear_proj.bias": rnd(L, hidden, std=0.1),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": 1 + rnd(L, hidden, std=0.1),
        "decoder.layers.mlp.linear_fc1.weight": rnd(L, ffn, hidden, std=hidden ** -0.5),
        "decoder.layers.mlp.linear_fc1.bias": rnd(L, ffn, std=0.1),
        "decoder.layers.mlp.linear_fc2.weight": rnd(L, hidden, ffn, std=ffn ** -0.5),
        "decoder.layers.mlp.linear_fc2.bias": rnd(L, hidden, std=0.1),
    })
    for hc in HC:
        w[f"decoder.layers.{hc}.mapping_proj.weight"] = rnd(L, m, n * hidden, std=grown / math.sqrt(n * hidden))
        w[f"decoder.layers.{hc}.bias"] = rnd(L, m, std=grown)
        for gate in GATES:
            w[f"decoder.layers.{hc}.{gate}"] = (0.3 + torch.rand(L, 1, generator=g, dtype=torch.float64)).to(dtype)
    return w


# tensor-parallel split axis of each weight (after the layer axis for decoder.layers.*); None: replicated
_TP_AXIS = {
    "embedding.word_embeddings.weight": 0, "output_layer.weight": 0,
    "self_attention.linear_qkv.weight": 0, "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1, "mlp.linear_fc1.weight": 0, "mlp.linear_fc1.bias": 0,
    "mlp.linear_fc2.weight": 1,
}


def _shards(key, t, tp):
    """(local tensor, rank offsets, replica id) pieces of ``t`` as ``tp`` ranks and one layer each save them."""
    from megatron.core.dist_checkpointing import ShardedTensor

    stacked = key.startswith("decoder.layers.")
    axis = _TP_AXIS.get(key[len("decoder.layers."):] if stacked else key)
    for layer in range(t.shape[0]) if stacked else [None]:
        piece = t[layer] if stacked else t
        prepend = ((0, layer, t.shape[0]),) if stacked else ()
        off = 1 if stacked else 0
        for rank in range(tp):
            if axis is None:
                yield ShardedTensor.from_rank_offsets(key, piece.clone(), *prepend, replica_id=rank,
                                                      prepend_axis_num=off) if rank == 0 else None
            else:
                part = piece.chunk(tp, dim=axis)[rank].clone()
                yield ShardedTensor.from_rank_offsets(key, part, *prepend, (axis + off, rank, tp), replica_id=0,
                                                      prepend_axis_num=off)


def write_upstream_checkpoint(directory, weights, *, tp=1, n=4, iters=20, iteration=None, args=True):
    """Save ``weights`` as upstream Megatron-LM would: a torch_dist checkpoint with upstream's keys
    and global shapes, cut into the shards of a TP=``tp`` run; with ``args``, a Megatron-style
    common state whose args carry upstream's mHC flags. In one process (the shards of all ranks)."""
    import argparse
    import os

    from megatron.core import dist_checkpointing

    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    state = {}
    for key, t in weights.items():
        for i, shard in enumerate(s for s in _shards(key, t, tp) if s is not None):
            state[f"{key}#{i}"] = shard
    L = weights["decoder.layers.mlp.linear_fc1.bias"].shape[0]
    for linear in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
        key = f"decoder.layers.{linear}._extra_state"  # megatron-core's local linears: no extra state (None)
        for layer in range(L):
            state[f"{key}#{layer}"] = ShardedObject(key, None, (L,), (layer,), replica_id=0)
    if args:  # and what else a training checkpoint holds: optimizer state, RNG state per (pp, tp) rank
        state["optimizer.state.exp_avg.output_layer.weight"] = ShardedTensor.from_rank_offsets(
            "optimizer.state.exp_avg.output_layer.weight", torch.zeros_like(weights["output_layer.weight"]))
        for rank in range(tp):
            state[f"rng#{rank}"] = ShardedObject("rng_state", [{"seed": rank}], (1, tp), (0, rank), replica_id=0)
        state["opt_param_scheduler"] = {"num_steps": 7}
        state["args"] = argparse.Namespace(
            enable_mhc_connections=True, mhc_num_residual_streams=n, mhc_sinkhorn_iterations=iters,
            mhc_init_gating_factor=0.01, num_layers=weights["decoder.layers.mlp.linear_fc1.bias"].shape[0],
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
        )
        state["checkpoint_version"] = 3.0
        state["iteration"] = iteration or 0
    target = directory
    if iteration is not None:
        target = os.path.join(directory, f"iter_{iteration:07d}")
    os.makedirs(target, exist_ok=True)
    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize, torch.cuda.current_device = (lambda device=None: None), (lambda: "cpu")
    try:
        dist_checkpointing.save(state, target)
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved
    if iteration is not None:
        with open(os.path.join(directory, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    return target


def _rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def upstream_gpt_logits(w, tokens, *, n=4, iters=20, heads=4, norm_eps=1e-5):
    """Logits [b, s, vocab] of the upstream-mHC GPT model with weights ``w`` (eval: no dropout)."""
    s = tokens.shape[1]
    h = w["embedding.word_embeddings.weight"][tokens] + w["embedding.position_embeddings.weight"][:s]
    h = h.transpose(0, 1)  # [s, b, C]
    C = h.shape[-1]
    x = h.unsqueeze(2).expand(*h.shape[:2], n, C).reshape(*h.shape[:2], n * C)  # input_expand
    L = w["decoder.layers.mlp.linear_fc1.bias"].shape[0]
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)

    def mhc(x, hc, l, sublayer):
        lw = {k: w[f"decoder.layers.{hc}.{k}"][l] for k in ("mapping_proj.weight", "bias", *GATES)}
        h_pre, h_post, h_res = upstream_mappings(x, lw["mapping_proj.weight"], lw["bias"], lw["alpha_pre"],
                                                 lw["alpha_post"], lw["alpha_res"], n, iters)
        xs = x.view(*x.shape[:2], n, C)
        out, bias = sublayer((xs * h_pre.unsqueeze(-1)).sum(2))  # aggregate, then the sublayer
        mixed = (h_res @ xs).reshape(x.shape)  # apply_h_res
        expanded = (h_post.unsqueeze(-1) * out.unsqueeze(2)).reshape(x.shape)
        return mixed + expanded + (h_post.unsqueeze(-1) * bias).reshape(x.shape)

    def attention(l):
        def run(a):
            p = lambda name: w[f"decoder.layers.self_attention.{name}"][l]  # noqa: E731
            y = _rmsnorm(a, p("linear_qkv.layer_norm_weight"), norm_eps)
            qkv = (y @ p("linear_qkv.weight").t() + p("linear_qkv.bias")).view(s, -1, heads, 3 * (C // heads))
            q, k, v = (t.permute(1, 2, 0, 3) for t in qkv.split(C // heads, dim=-1))  # [b, heads, s, hn]
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(C // heads)
            ctx = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
            ctx = ctx.permute(2, 0, 1, 3).reshape(s, -1, C)
            return ctx @ p("linear_proj.weight").t(), p("linear_proj.bias")
        return run

    def mlp(l):
        def run(a):
            p = lambda name: w[f"decoder.layers.mlp.{name}"][l]  # noqa: E731
            y = _rmsnorm(a, p("linear_fc1.layer_norm_weight"), norm_eps)
            y = torch.nn.functional.gelu(y @ p("linear_fc1.weight").t() + p("linear_fc1.bias"))
            return y @ p("linear_fc2.weight").t(), p("linear_fc2.bias")
        return run

    for l in range(L):
        x = mhc(x, HC[0], l, attention(l))
        x = mhc(x, HC[1], l, mlp(l))
    y = _rmsnorm(x.view(*x.shape[:2], n, C).mean(2), w["decoder.final_layernorm.weight"], norm_eps)  # output_contract
    return (y @ w["output_layer.weight"].t()).transpose(0, 1)
