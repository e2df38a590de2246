"""``mhc-megatron profile --config launch.yaml``: the profile's model taken from a launch config.

The profile trains its own single-process megatron-core GPT (local spec, RMSNorm, GELU MLP), so it
takes from the launch what that model can reproduce (depth, width, heads, sequence, micro-batch,
residual mode, n, mHC recompute), lists every other model key it does not reproduce, and refuses
what would change the measured step beyond that (MoE, MLA, hybrid stacks, more than one process).
"""

from __future__ import annotations

from .profile import ProfileConfig

TAKEN = {  # launch key -> ProfileConfig field
    "num_layers": "layers", "hidden_size": "hidden", "num_attention_heads": "heads",
    "seq_length": "seq_len", "micro_batch_size": "batch_size", "expansion_rate": "expansion_rate",
}
REFUSED = {  # launch key -> why the profile's model cannot stand in for it
    "num_experts": "MoE layers", "multi_latent_attention": "multi-latent attention",
    "hybrid_layer_pattern": "a HybridModel stack", "mtp_num_layers": "multi-token prediction",
}
PARALLEL = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
            "expert_model_parallel_size")


def profile_config_from_launch(path: str, overrides: dict) -> tuple[ProfileConfig, list[str]]:
    """The profile settings for the launch at ``path`` with ``overrides`` (ProfileConfig fields
    given on the command line, None = not given) on top, and the launch's model keys that the
    profile's model does not reproduce (printed with the table)."""
    import yaml

    from ..launch.config import load_launch_config

    cfg = load_launch_config(path)
    for key, what in REFUSED.items():
        if cfg.get(key):
            raise ValueError(f"--config {path}: {key} {cfg.get(key)} builds {what}, which mhc-megatron profile "
                             "does not build yet (it profiles a dense GPT); drop the key from a copy of the config "
                             "to profile the dense equivalent")
    for key in PARALLEL:
        if int(cfg.get(key, 1)) > 1:
            raise ValueError(f"--config {path}: {key} {cfg.get(key)} needs more than one process; mhc-megatron "
                             f"profile runs one process: set {key} to 1 in a copy of the config (the per-GPU "
                             "overhead of mHC is what one process measures)")
    mode = cfg.get("residual_mode", "residual")
    if mode == "residual":
        raise ValueError(f"--config {path}: residual_mode is residual; the profile compares hc or mhc against it: "
                         "set residual_mode: mhc")
    fields = {field: cfg.get(key) for key, field in TAKEN.items() if cfg.get(key) is not None}
    fields["recompute"] = bool(cfg.get("mhc_recompute", False))
    fields.update({k: v for k, v in overrides.items() if v is not None})
    with open(path) as f:
        sections = yaml.safe_load(f)
    model_keys = {k for s in ("model", "mhc") for k in (sections.get(s) or {})}
    not_reproduced = sorted(model_keys - set(TAKEN) - {"residual_mode", "mhc_recompute", "max_position_embeddings"})
    notes = [f"{k}: {cfg.flags[k]}" for k in not_reproduced if cfg.flags.get(k) not in (None, False)]
    return ProfileConfig(modes=("residual", mode), **fields), notes
