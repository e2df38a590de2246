"""Every runtime change mhc-megatron makes to Megatron (and to torch on Megatron's behalf), in one place.

Each change is a named :class:`Hook`: the attribute it replaces, what the replacement does, why it
is needed, since which megatron-core version, and how it is undone (the original object is put
back). Hooks are installed and removed as a unit (:func:`active`), each install is idempotent, two
hooks of one attribute are never installed together, and
nothing else in the package assigns to a Megatron attribute (``tests/test_hooks.py`` checks the
source). The table in ``docs/megatron.md`` is :func:`table`'s output (tested).

The replacements themselves live beside the code they serve (the launcher, the DualPipeV glue, the
diagnostics, the meta-device build); this module only knows where they go.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Hook:
    name: str
    target: str  # "package.module:attribute" or "package.module:Class.attribute"
    what: str
    why: str
    since: str  # the megatron-core version that made it necessary
    make: Callable[[Any, Any], Any]  # (original, context) -> replacement
    when: str = "always"  # when the launcher installs it

    def owner_and_attribute(self):
        module, path = self.target.split(":")
        owner = importlib.import_module(module)
        *parents, attribute = path.split(".")
        for name in parents:  # a class attribute: the class is the owner
            owner = getattr(owner, name)
        return owner, attribute


def _launcher(name):
    def make(original, context):
        from .training import launcher

        return getattr(launcher, name)(original, context)

    return make


def _dualpipev_schedule(original, context):
    from .training.dualpipev import get_forward_backward_func

    return get_forward_backward_func


def _stream_shapes(original, context):
    from .pipeline.stream_shapes import get_forward_backward_func_hook

    return get_forward_backward_func_hook(original, context)


def _fine_grained_callables(original, context):
    from .mcore.fine_grained import build_layer_callables_hook

    return build_layer_callables_hook(original, context)


def _lr_step_decay(original, context):
    from .training.lr_schedule import step_decay_get_lr

    return step_decay_get_lr(original, context)


def _training_log(original, context):
    return context.wrap_training_log(original)


def _skip_dataset_helper_compile(original, context):
    def _compile_dependencies():
        print("> dataset index builder: using the prebuilt megatron.core.datasets.helpers_cpp", flush=True)

    return _compile_dependencies


def _cuda_device_is_meta(original, context):
    return lambda: "meta"


def _cuda_device_is_cpu(original, context):
    return lambda: "cpu"


def _no_device_sync(original, context):
    return lambda device=None: None


HOOKS: tuple[Hook, ...] = (
    Hook(
        "arguments", "megatron.training.arguments:parse_and_validate_args",
        "adds the mHC flags to the parser (after the entry's own extra_args_provider), refuses what the "
        "command line alone decides before Megatron validates or prints, then runs Megatron's",
        "pretrain() takes no extra_args_provider since 0.19; a checkout's pretrain_gpt.py calls this "
        "function itself", "0.19.0", _launcher("parse_and_validate_args_hook"),
    ),
    Hook(
        "gpt-config", "megatron.training.argument_utils:gpt_config_from_args",
        "runs Megatron's, then gives the GPT model config the mHC layer spec (and, as asked, the "
        "DualPipeV builder and the diagnostics recorder)",
        "the layer spec is chosen inside megatron.training; no flag selects a spec function", "0.19.0",
        _launcher("gpt_config_hook"),
    ),
    Hook(
        "hybrid-config", "megatron.training.argument_utils:hybrid_config_from_args",
        "runs Megatron's, then gives the HybridModel config the mHC hybrid stack spec",
        "as for gpt-config", "0.19.0", _launcher("hybrid_config_hook"),
    ),
    Hook(
        "dataset-helpers", "megatron.training.initialize:_compile_dependencies",
        "skips `make -C megatron/core/datasets` and says the prebuilt helpers are used",
        "the wheel ships the compiled helpers but no Makefile, so the make step would end the job",
        "0.17.0", _skip_dataset_helper_compile, when="built-in entry, wheel with prebuilt helpers",
    ),
    Hook(
        "dualpipev-schedule", "megatron.training.training:get_forward_backward_func",
        "returns the DualPipeV schedule (mhc_megatron.training.dualpipev.forward_backward_dualpipev)",
        "megatron.training has no setting for a schedule of one's own", "0.19.0", _dualpipev_schedule,
        when="--pipeline-schedule dualpipev",
    ),
    Hook(
        "pipeline-stream-shapes", "megatron.training.training:get_forward_backward_func",
        "wraps the schedule it returns (1F1B, interleaved) so that, when the caller brings no "
        "communicator, the schedule gets a P2PCommunicator whose receive buffers are [s, b, n*hidden]",
        "megatron.training calls its schedules without a communicator of its own; the alternative, "
        "variable_seq_lengths, synchronises the device on every stage exchange", "0.19.0", _stream_shapes,
        when="hc/mhc with --pipeline-model-parallel-size > 1 and Megatron's schedules",
    ),
    Hook(
        "fine-grained-callables", "megatron.core.models.common.fine_grained_callables:build_layer_callables",
        "runs megatron-core's builder, then gives mHC MoE layers a first schedule node that detaches each "
        "tensor of the mHC residual (n-stream x, H_post, H_res) for the combine node",
        "megatron-core's nodes detach the residual as one tensor and take layer callables from no spec",
        "0.19.0", _fine_grained_callables, when="hc/mhc with --overlap-moe-expert-parallel-comm",
    ),
    Hook(
        "lr-step-decay", "megatron.core.optimizer_param_scheduler:OptimizerParamScheduler.get_lr",
        "keeps Megatron's warm-up, then returns --lr times the factor of the last --mhc-lr-step-decay "
        "boundary passed (never below --min-lr)",
        "megatron-core's decay styles (constant, linear, cosine, inverse-square-root, WSD) have no step "
        "schedule", "0.19.0", _lr_step_decay, when="--mhc-lr-step-decay",
    ),
    Hook(
        "diagnostics-log", "megatron.training.training:training_log",
        "runs Megatron's training_log, then gathers the recorded H_res over the pipeline and writes "
        "the mhc/* scalars through Megatron's TensorBoard/W&B writers",
        "training_log is where Megatron's writers and the iteration meet, outside the schedule",
        "0.19.0", _training_log, when="--mhc-log-interval N",
    ),
    Hook(
        "meta-device-build", "torch.cuda:current_device",
        "answers 'meta' while validate-config builds a model on the meta device",
        "the MoE router and MLA's rotary embedding place tensors on torch.cuda.current_device() "
        "explicitly", "0.19.0", _cuda_device_is_meta, when="mhc-megatron validate-config, during the build",
    ),
    Hook(
        "cpu-model-device", "torch.cuda:current_device",
        "answers 'cpu' while mhc-megatron profile builds and trains an MoE or MLA model on the CPU",
        "the MoE router and MLA's rotary embedding move their tensors to torch.cuda.current_device() "
        "explicitly (at build and in the forward)", "0.19.0", _cuda_device_is_cpu,
        when="mhc-megatron profile --device cpu of an MoE or MLA model",
    ),
    Hook(
        "checkpoint-io-sync", "torch.cuda:synchronize",
        "does nothing while mhc-megatron convert-checkpoint reads and writes a checkpoint",
        "megatron-core's checkpoint writer synchronises the CUDA device unconditionally; the converter "
        "runs on the CPU with gloo", "0.19.0", _no_device_sync, when="mhc-megatron convert-checkpoint, during I/O",
    ),
    Hook(
        "checkpoint-io-device", "torch.cuda:current_device",
        "answers 'cpu' while mhc-megatron convert-checkpoint reads and writes a checkpoint",
        "megatron-core's checkpoint writer allocates a flag on torch.cuda.current_device()", "0.19.0",
        _cuda_device_is_cpu, when="mhc-megatron convert-checkpoint, during I/O",
    ),
)

BY_NAME = {hook.name: hook for hook in HOOKS}
_installed: dict[str, tuple[object, str, object, object]] = {}  # name -> (owner, attribute, original, ours)


def install(name: str, context=None) -> None:
    """Install hook ``name`` (no-op when it is installed already)."""
    if name in _installed:
        return
    hook = BY_NAME[name]
    clash = [n for n in _installed if BY_NAME[n].target == hook.target]
    if clash:
        raise RuntimeError(f"mhc-megatron hooks {name!r} and {clash[0]!r} both replace {hook.target}; install one")
    owner, attribute = hook.owner_and_attribute()
    original = getattr(owner, attribute)
    ours = hook.make(original, context)
    setattr(owner, attribute, ours)
    _installed[name] = (owner, attribute, original, ours)


def uninstall(name: str | None = None) -> None:
    """Put Megatron's original back (``None``: every installed hook, the last installed first)."""
    names = [name] if name is not None else list(reversed(_installed))
    for n in names:
        if n not in _installed:
            continue
        owner, attribute, original, ours = _installed[n]
        if getattr(owner, attribute) is not ours:
            raise RuntimeError(
                f"mhc-megatron hook {n!r}: {BY_NAME[n].target} was replaced again after us; "
                "undo that change first"
            )
        setattr(owner, attribute, original)
        del _installed[n]


def installed() -> list[str]:
    return list(_installed)


def original(name: str):
    """Megatron's own object behind hook ``name`` (the current one when not installed)."""
    if name in _installed:
        return _installed[name][2]
    owner, attribute = BY_NAME[name].owner_and_attribute()
    return getattr(owner, attribute)


@contextlib.contextmanager
def active(*names: str, context=None):
    """Install ``names`` for the block; on exit remove them and every hook installed meanwhile."""
    before = set(_installed)
    try:
        for name in names:
            install(name, context)
        yield
    finally:
        for name in reversed(list(_installed)):
            if name not in before:
                uninstall(name)


def table() -> str:
    """The Markdown table of every hook, for docs/megatron.md."""
    rows = ["| hook | replaces | what | why | needed since | installed |", "|---|---|---|---|---|---|"]
    for h in HOOKS:
        rows.append(f"| `{h.name}` | `{h.target.replace(':', '.')}` | {h.what} | {h.why} | megatron-core {h.since} | {h.when} |")
    rows.append("")
    rows.append("Each is undone by putting the original object back (`mhc_megatron.hooks.uninstall`); "
                "`mhc-pretrain-gpt` removes all of them when it returns.")
    return "\n".join(rows) + "\n"
