"""A launch configuration: one YAML file with the flags of a run, grouped in sections.

Every key of ``model``, ``mhc``, ``parallel``, ``training``, ``data``, ``logging`` and
``checkpoint`` is a command-line flag of ``mhc-pretrain-gpt`` with its dashes written as
underscores: ``true`` adds the flag, ``false`` and ``null`` leave it out, anything else is its
value. ``cluster`` (``nodes``, ``gpus_per_node``) describes the machines. :func:`check_layout`
checks that the parallel layout fits the model and the cluster before anything is started.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FLAG_SECTIONS = ("model", "mhc", "parallel", "training", "data", "logging", "checkpoint")
SECTIONS = ("cluster", *FLAG_SECTIONS)


@dataclass
class LaunchConfig:
    path: str
    flags: dict  # flag name (underscores) -> value, all sections merged
    cluster: dict = field(default_factory=dict)
    sections: dict = field(default_factory=dict)  # flag name -> the section it is written in

    def get(self, key, default=None):
        value = self.flags.get(key, default)
        return default if value is None else value

    @property
    def world_size(self) -> int:
        return int(self.cluster.get("nodes", 1)) * int(self.cluster.get("gpus_per_node", 1))

    def argv(self, drop: tuple[str, ...] = ()) -> list[str]:
        """The flags as ``mhc-pretrain-gpt`` takes them."""
        out: list[str] = []
        for key, value in self.flags.items():
            if key in drop or value is None or value is False:
                continue
            out.append("--" + key.replace("_", "-"))
            if value is not True:
                out += [str(v) for v in value] if isinstance(value, list) else [str(value)]
        return out


def load_launch_config(path: str) -> LaunchConfig:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise ValueError(f"{path}: cannot read the configuration: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{path}: not valid YAML{at}: {problem}; fix the file (indentation, quotes, colons)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}")
    flags: dict = {}
    sections: dict = {}
    for section in FLAG_SECTIONS:
        entries = data.get(section) or {}
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: section '{section}' must map flag names to values")
        for key, value in entries.items():
            if key in flags:
                raise ValueError(f"{path}: '{key}' is set in two sections")
            if key.startswith("-") or "-" in key:
                raise ValueError(f"{path}: write flag '{key}' with underscores and no leading dashes")
            flags[key] = value
            sections[key] = section
    cluster = data.get("cluster") or {}
    for key in ("nodes", "gpus_per_node"):
        value = cluster.get(key, 1)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: cluster.{key} must be an integer >= 1, got {value!r}")
    return LaunchConfig(path=path, flags=flags, cluster=cluster, sections=sections)


@dataclass(frozen=True)
class Layout:
    """Derived sizes of a run."""

    world_size: int
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    dp: int
    schedule: str  # "1f1b", "interleaved" or "dualpipev"
    vpp: int  # model chunks per pipeline rank
    microbatches: int  # per step and data-parallel rank
    layers_per_chunk: int
    expansion_rate: int  # 1 for the residual model


def _int(cfg: LaunchConfig, key: str, default: int | None) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise ValueError(f"{cfg.path}: model.{key} is missing: Megatron has no default for it; add '{key}: N' under model")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cfg.path}: {key} must be an integer >= 1, got {value!r}")
    return value


def check_layout(cfg: LaunchConfig) -> Layout:
    """Check that parallel sizes, model shape, batch and schedule fit together; the first
    mismatch raises ``ValueError`` naming the numbers and what to change."""
    from .flag_values import check_flag_values

    check_flag_values(cfg)  # every key and value against the launcher's parser first
    p = cfg.path
    world = cfg.world_size
    tp = _int(cfg, "tensor_model_parallel_size", 1)
    pp = _int(cfg, "pipeline_model_parallel_size", 1)
    cp = _int(cfg, "context_parallel_size", 1)
    ep = _int(cfg, "expert_model_parallel_size", 1)
    etp = _int(cfg, "expert_tensor_parallel_size", tp)
    layers = _int(cfg, "num_layers", None)
    hidden = _int(cfg, "hidden_size", None)
    heads = _int(cfg, "num_attention_heads", None)
    seq = _int(cfg, "seq_length", None)
    micro = _int(cfg, "micro_batch_size", 1)

    if world % (tp * pp * cp):
        raise ValueError(
            f"{p}: {world} GPUs ({cfg.cluster.get('nodes', 1)} nodes x {cfg.cluster.get('gpus_per_node', 1)}) "
            f"do not split into tensor {tp} x pipeline {pp} x context {cp} = {tp * pp * cp}: change the "
            "cluster size or the parallel sizes"
        )
    dp = world // (tp * pp * cp)
    if heads % tp:
        raise ValueError(f"{p}: {heads} attention heads do not split over tensor parallel size {tp}")
    groups = cfg.get("num_query_groups")
    if cfg.get("group_query_attention") and groups and (heads % groups or groups % tp):
        raise ValueError(f"{p}: {groups} query groups must divide {heads} heads and split over tensor parallel size {tp}")
    if not cfg.get("multi_latent_attention") and hidden % heads:
        raise ValueError(f"{p}: hidden size {hidden} is not a multiple of {heads} heads")
    if cfg.get("sequence_parallel") and seq % tp:
        raise ValueError(f"{p}: sequence parallelism splits the {seq} tokens over {tp} ranks; {seq} % {tp} != 0")
    if cp > 1 and seq % (2 * cp):
        raise ValueError(f"{p}: context parallel size {cp} needs the sequence length ({seq}) to be a multiple of {2 * cp}")
    experts = cfg.get("num_experts")
    if experts:
        if experts % ep:
            raise ValueError(f"{p}: {experts} experts do not split over expert parallel size {ep}")
        if (tp * cp * dp) % (ep * etp):
            raise ValueError(
                f"{p}: expert parallel {ep} x expert tensor parallel {etp} = {ep * etp} must divide the "
                f"{tp * cp * dp} GPUs of a pipeline stage (tensor {tp} x context {cp} x data {dp})"
            )
    elif ep > 1:
        raise ValueError(f"{p}: expert_model_parallel_size {ep} without num_experts")

    schedule_flag = cfg.get("pipeline_schedule", "default")
    vpp_flag = cfg.get("num_virtual_stages_per_pipeline_rank")
    if schedule_flag == "dualpipev":
        schedule, vpp = "dualpipev", 2
        if vpp_flag not in (None, 2):
            raise ValueError(f"{p}: DualPipeV runs two stages per rank, got num_virtual_stages_per_pipeline_rank {vpp_flag}")
        if not cfg.get("untie_embeddings_and_output_weights"):
            raise ValueError(f"{p}: DualPipeV needs untie_embeddings_and_output_weights: true")
    elif schedule_flag == "default":
        vpp = vpp_flag or 1
        schedule = "interleaved" if vpp > 1 else "1f1b"
    else:
        raise ValueError(f"{p}: pipeline_schedule must be 'default' or 'dualpipev', got {schedule_flag!r}")
    chunks = pp * vpp
    if layers % chunks:
        raise ValueError(
            f"{p}: {layers} layers do not split evenly over {chunks} pipeline stages "
            f"({pp} ranks x {vpp} stages per rank{', DualPipeV' if schedule == 'dualpipev' else ''}): "
            f"use a multiple of {chunks} layers or another pipeline size"
        )
    gbs = _int(cfg, "global_batch_size", micro * dp)
    if gbs % (micro * dp):
        raise ValueError(
            f"{p}: global batch {gbs} is not a multiple of micro-batch {micro} x data parallel {dp} = {micro * dp}"
        )
    microbatches = gbs // (micro * dp)
    if schedule == "dualpipev" and microbatches < 2 * pp:
        raise ValueError(
            f"{p}: DualPipeV over {pp} ranks needs >= {2 * pp} micro-batches per step, the layout gives "
            f"{microbatches} (global batch {gbs} / (micro-batch {micro} x data parallel {dp}))"
        )
    mode = cfg.get("residual_mode", "residual")
    n = cfg.get("expansion_rate", 4) if mode in ("hc", "mhc") else 1
    from ..mcore.settings import MHCSettings

    MHCSettings(mode=mode, expansion_rate=n)  # its own checks of mode and n
    return Layout(world, tp, pp, cp, ep, etp, dp, schedule, vpp, microbatches, layers // chunks, n)
