"""``mhc-megatron profile --config launch.yaml``: the profile's model taken from a launch config.

The profile trains its own single-process megatron-core GPT (local modules, RMSNorm, GELU MLP,
learned positions), so it takes from the launch what that model can reproduce (depth, width,
heads, sequence, micro-batch, residual mode, n, mHC recompute; MoE layers; multi-latent
attention; a hybrid layer pattern of attention, MLP and MoE layers, built as a HybridModel), lists
every other model key it does not reproduce, and refuses what would change the measured step beyond
that (multi-token prediction, other hybrid layers, more than one process: the CLI runs a launch of
more than one process for real instead, :mod:`.profile_multiprocess`).
"""

from __future__ import annotations

from .profile import ProfileConfig

TAKEN = {  # launch key -> ProfileConfig field
    "num_layers": "layers", "hidden_size": "hidden", "num_attention_heads": "heads",
    "seq_length": "seq_len", "micro_batch_size": "batch_size", "expansion_rate": "expansion_rate",
}
# further keys taken into ProfileConfig.transformer (TransformerConfig fields): disable_bias_linear
# (add_bias_linear = False) and, for MoE and MLA launches, these:
MOE = {  # launch key -> TransformerConfig field of the MoE layers (megatron-core's local GPT layer spec)
    "num_experts": "num_moe_experts", "moe_router_topk": "moe_router_topk", "moe_ffn_hidden_size": "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size", "moe_layer_freq": "moe_layer_freq",
    "moe_router_score_function": "moe_router_score_function",
    "moe_router_load_balancing_type": "moe_router_load_balancing_type",
    "moe_router_enable_expert_bias": "moe_router_enable_expert_bias", "moe_router_pre_softmax": "moe_router_pre_softmax",
    "moe_router_num_groups": "moe_router_num_groups", "moe_router_group_topk": "moe_router_group_topk",
    "moe_router_topk_scaling_factor": "moe_router_topk_scaling_factor", "moe_aux_loss_coeff": "moe_aux_loss_coeff",
    "moe_z_loss_coeff": "moe_z_loss_coeff", "moe_shared_expert_gate": "moe_shared_expert_gate",
    "moe_token_dispatcher_type": "moe_token_dispatcher_type",
}
MLA = {  # launch key -> MLATransformerConfig field
    "multi_latent_attention": "multi_latent_attention", "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
    "qk_head_dim": "qk_head_dim", "qk_pos_emb_head_dim": "qk_pos_emb_head_dim", "v_head_dim": "v_head_dim",
    "rope_type": "rope_type", "rotary_base": "rotary_base", "rotary_scaling_factor": "rotary_scaling_factor",
    "mscale": "mscale", "mscale_all_dim": "mscale_all_dim",
}
# Megatron's command-line defaults of the MLA flags (its MLATransformerConfig defaults differ: q_lora_rank
# 512, kv_lora_rank 512, rotary_scaling_factor 40), so that a launch without them profiles what it trains
MLA_CLI_DEFAULTS = {"q_lora_rank": None, "kv_lora_rank": 32, "qk_head_dim": 128, "qk_pos_emb_head_dim": 64,
                    "v_head_dim": 128, "rotary_scaling_factor": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}
# dispatchers that run in one process; alltoall creates a CUDA stream at build, so on the CPU it
# becomes allgather (with one expert-parallel rank both route the same tokens to the same experts)
ONE_PROCESS_DISPATCHERS = ("allgather", "alltoall")
BUILT = {"normalization": "RMSNorm"}  # launch values the profile's model has anyway (and mHC's defaults)
REFUSED = {  # launch key -> why the profile's model cannot stand in for it
    "mtp_num_layers": "multi-token prediction",
}
PARALLEL = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
            "expert_model_parallel_size")


def _moe_layer_freq(value, layers: int, path: str):
    """The launch's moe_layer_freq for ``layers`` layers: an int as it is, a pattern list (Megatron's
    string such as "([0]+[1]*11)") cut to the first ``layers`` entries when --layers profiles fewer."""
    from megatron.training.arguments import moe_freq_type

    freq = moe_freq_type(value)
    if isinstance(freq, int):
        return freq
    if len(freq) < layers:
        raise ValueError(f"--config {path}: moe_layer_freq {value!r} names {len(freq)} layers, the profile builds "
                         f"{layers}: give --layers {len(freq)} or fewer")
    return list(freq[:layers])


def _hybrid_pattern(cfg, mode: str, fields: dict) -> str:
    """The launch's hybrid layer pattern, checked as mhc-pretrain-gpt checks it, without pipeline bars,
    cut to the first --layers symbols when --layers profiles fewer layers."""
    from ..mcore import MHCSettings
    from ..mcore.hybrid import LOCAL_SYMBOLS, check_hybrid_pattern, main_pattern

    given = cfg.get("hybrid_layer_pattern")
    try:  # what mhc-pretrain-gpt refuses (Mamba, MTP in the pattern, --mhc-recompute), in its words
        check_hybrid_pattern(given, MHCSettings(mode=mode, recompute=fields.get("recompute", False)))
    except ValueError as err:
        raise ValueError(f"--config {cfg.path}: {err}") from None
    pattern = main_pattern(given)
    other = sorted(set(pattern) - set(LOCAL_SYMBOLS))
    if other:
        raise ValueError(f"--config {cfg.path}: hybrid_layer_pattern {given!r} has {', '.join(map(repr, other))}; "
                         f"mhc-megatron profile builds {', '.join(map(repr, LOCAL_SYMBOLS))} layers (local modules): "
                         "profile the real run instead")
    if "E" in pattern and not cfg.get("num_experts"):
        raise ValueError(f"--config {cfg.path}: hybrid_layer_pattern {given!r} has MoE layers ('E') but no num_experts")
    if cfg.get("multi_latent_attention"):
        raise ValueError(f"--config {cfg.path}: hybrid_layer_pattern with multi_latent_attention: mhc-megatron "
                         "profile's hybrid stack has no MLA layers; drop one of the two in a copy of the config")
    layers = fields.get("layers")  # given on the command line (the launch's num_layers is the pattern's)
    if layers is not None and layers != cfg.get("num_layers"):
        if layers > len(pattern):
            raise ValueError(f"--config {cfg.path}: --layers {layers} with hybrid_layer_pattern {given!r} of "
                             f"{len(pattern)} layers: give --layers {len(pattern)} or fewer")
        pattern = pattern[:layers]
    return pattern


def transformer_fields(cfg, layers: int, device: str) -> tuple[dict, list[str]]:
    """The TransformerConfig fields of the launch's MoE and MLA layers, and the launch keys they
    took (so they are not listed as not reproduced)."""
    fields, taken = {}, []
    if cfg.get("disable_bias_linear"):
        fields["add_bias_linear"], taken = False, ["disable_bias_linear"]
    if cfg.get("num_experts"):
        for key, name in MOE.items():
            if cfg.get(key) is not None:
                fields[name], taken = cfg.get(key), taken + [key]
        if fields.get("moe_shared_expert_intermediate_size") and fields.get("add_bias_linear", True):
            raise ValueError(f"--config {cfg.path}: moe_shared_expert_intermediate_size "
                             f"{fields['moe_shared_expert_intermediate_size']} with linear biases: megatron-core's "
                             "shared experts take no bias (the real run fails the same): add disable_bias_linear: true")
        if "moe_layer_freq" in fields:
            fields["moe_layer_freq"] = _moe_layer_freq(fields["moe_layer_freq"], layers, cfg.path)
        dispatcher = fields.get("moe_token_dispatcher_type", "allgather")
        if dispatcher not in ONE_PROCESS_DISPATCHERS:
            raise ValueError(f"--config {cfg.path}: moe_token_dispatcher_type {dispatcher} does not run in one "
                             f"process on this machine; mhc-megatron profile builds the MoE layers with "
                             f"{' or '.join(ONE_PROCESS_DISPATCHERS)}: set one of them in a copy of the config")
        if dispatcher == "alltoall" and device == "cpu":
            fields["moe_token_dispatcher_type"] = "allgather"
    if cfg.get("multi_latent_attention"):
        fields.update(MLA_CLI_DEFAULTS)
        for key, name in MLA.items():
            if cfg.get(key) is not None:
                fields[name], taken = cfg.get(key), taken + [key]
    return fields, taken


def profile_config_from_launch(path: str, overrides: dict, device: str = "auto") -> tuple[ProfileConfig, list[str]]:
    """The profile settings for the launch at ``path`` with ``overrides`` (ProfileConfig fields
    given on the command line, None = not given) on top, and the launch's model keys that the
    profile's model does not reproduce (printed with the table)."""
    import yaml

    from ..demo.config import resolve_device
    from ..launch.config import load_launch_config

    cfg = load_launch_config(path)
    for key, what in REFUSED.items():
        if cfg.get(key):
            raise ValueError(f"--config {path}: {key} {cfg.get(key)} builds {what}, which mhc-megatron profile "
                             "does not build yet (it profiles a GPTModel, with MoE and MLA layers as configured); "
                             "drop the key from a copy of the config to profile the model without it, or profile "
                             "the real run (mhc-pretrain-gpt --mhc-profile-ranges under nsys)")
    for key in PARALLEL:
        if int(cfg.get(key, 1)) > 1:
            raise ValueError(f"--config {path}: {key} {cfg.get(key)} needs {cfg.get(key)} processes; the profile's "
                             f"own model runs in one process: set {key}: 1 in a copy of the config to measure one "
                             "GPU's share; mhc-megatron profile --config runs such a launch for real with torchrun "
                             "(bench/profile_multiprocess.py)")
    mode = cfg.get("residual_mode", "residual")
    if mode == "residual":
        raise ValueError(f"--config {path}: residual_mode is residual; the profile compares hc or mhc against it: "
                         "set residual_mode: mhc")
    fields = {field: cfg.get(key) for key, field in TAKEN.items() if cfg.get(key) is not None}
    fields["recompute"] = bool(cfg.get("mhc_recompute", False))
    fields.update({k: v for k, v in overrides.items() if v is not None})
    taken = []
    if cfg.get("hybrid_layer_pattern"):
        fields["hybrid_layer_pattern"] = _hybrid_pattern(cfg, mode, fields)
        fields["layers"], taken = len(fields["hybrid_layer_pattern"]), ["hybrid_layer_pattern", "num_layers"]
    layers = fields.get("layers", ProfileConfig.layers)
    fields["transformer"], more = transformer_fields(cfg, layers, resolve_device(device).type)
    taken += more
    with open(path) as f:
        sections = yaml.safe_load(f)
    model_keys = {k for s in ("model", "mhc") for k in (sections.get(s) or {})}
    from ..mcore import MHCSettings

    built = {**BUILT, "mhc_sinkhorn_iters": MHCSettings.sinkhorn_iters, "mhc_alpha_init": MHCSettings.alpha_init}
    built_as_given = {k for k, v in built.items() if cfg.get(k) == v}
    not_reproduced = sorted(model_keys - set(TAKEN) - set(taken) - built_as_given
                            - {"residual_mode", "mhc_recompute", "max_position_embeddings"})
    notes = [f"{k}: {cfg.flags[k]}" for k in not_reproduced if cfg.flags.get(k) not in (None, False)]
    dispatcher = cfg.get("moe_token_dispatcher_type")
    if dispatcher != fields["transformer"].get("moe_token_dispatcher_type", dispatcher):
        notes.append(f"moe_token_dispatcher_type: {dispatcher} (allgather on the CPU: alltoall needs a CUDA stream; "
                     "one expert-parallel rank routes the same)")
    return ProfileConfig(modes=("residual", mode), **fields), notes
