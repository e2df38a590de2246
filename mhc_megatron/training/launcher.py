"""``mhc-pretrain-gpt``: Megatron-LM GPT pre-training with the mHC flags added.

    mhc-pretrain-gpt <the usual Megatron-LM GPT arguments> --residual-mode mhc --expansion-rate 4

How it plugs in (through the hooks of :mod:`mhc_megatron.hooks`, installed for the launch and
removed when it returns; listed in docs/megatron.md):

1. ``megatron.training.arguments.parse_and_validate_args`` gains our flags (chained after any
   ``extra_args_provider`` the entry script passes) and refuses what the command line decides
   before Megatron validates and prints;
2. ``megatron.training.argument_utils.gpt_config_from_args`` returns a config whose layer spec
   is the mHC block spec (:func:`~mhc_megatron.training.model_config.apply_mhc_to_gpt_config`);
   ``hybrid_config_from_args`` likewise gives HybridModel (``--hybrid-layer-pattern``) its mHC stack spec;
3. with a Megatron-LM checkout (``--megatron-lm PATH`` or ``$MEGATRON_LM``) its own
   ``pretrain_gpt.py`` then runs unchanged; without one, the built-in entry
   (:mod:`~mhc_megatron.training.gpt_entry`) runs ``pretrain`` for mock or indexed data, and the
   dataset-helper compile step, which needs the checkout's Makefile, is skipped when the wheel
   ships the compiled helpers;
4. ``--pipeline-schedule dualpipev`` adds two virtual stages per rank and installs the DualPipeV
   builder and schedule (:mod:`~mhc_megatron.training.dualpipev`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import runpy
import sys
from dataclasses import dataclass

# Nothing here imports megatron at module level: with --megatron-lm the checkout must be first
# on sys.path before the first megatron import (mhc_megatron.training.checkout).
from .. import hooks

PROG = "mhc-pretrain-gpt"

_PROFILING = "mhc_megatron.mcore.profiling"


@contextlib.contextmanager
def _nvtx_switch_scoped():
    """--mhc-profile-ranges switches the mHC NVTX ranges on for one launch (``apply_profile_ranges``):
    off at the start, put back at the end. Looked up, not imported: ``mhc_megatron.mcore`` imports
    megatron.core, which checkout mode must load from the checkout, and only when the launch does."""
    loaded = sys.modules.get(_PROFILING)
    previous = loaded.nvtx_regions_enabled() if loaded is not None else False
    if loaded is not None:
        loaded.set_nvtx_regions(False)
    try:
        yield
    finally:
        now = sys.modules.get(_PROFILING)
        if now is not None:
            now.set_nvtx_regions(previous)


@dataclass
class LaunchState:
    """What the launcher's hooks share during one launch."""

    settings: object = None
    diagnostics: object = None
    builtin_entry: bool = True  # False: a Megatron-LM checkout's pretrain_gpt.py runs


LAUNCH_HOOKS = ("arguments", "gpt-config", "hybrid-config")  # mhc_megatron.hooks entries


def install_hooks(builtin_entry: bool = True) -> LaunchState:
    """Install the launcher's hooks for a fresh launch (replacing an earlier launch's); the
    launcher's ``main`` removes them again, others call :func:`mhc_megatron.hooks.uninstall`."""
    state = LaunchState(builtin_entry=builtin_entry)
    for name in LAUNCH_HOOKS:
        hooks.uninstall(name)
        hooks.install(name, state)
    return state


def parse_and_validate_args_hook(parse, state: LaunchState):
    """Hook ``arguments``: Megatron's ``parse_and_validate_args`` with our flags and early refusals."""
    import megatron.training.arguments as arguments

    def parse_and_validate_args(extra_args_provider=None, ignore_unknown_args=False, args_defaults={}):
        # imported on call: they import megatron.core, which the entry script may not have loaded yet
        from .arguments import add_mhc_arguments, chain_args_providers, mhc_settings_from_args
        from .checks import check_launch_args
        from .patch_entry import refuse_a_second_mhc_parser
        from .profile_ranges import apply_profile_ranges

        provider = chain_args_providers(extra_args_provider, refuse_a_second_mhc_parser, add_mhc_arguments,
                                        escape_help_percent_signs)
        # refuse what the command line alone decides before Megatron validates, prints or builds
        check_launch_args(arguments.parse_args(provider, ignore_unknown_args), builtin_entry=state.builtin_entry)
        args = parse(provider, ignore_unknown_args, args_defaults)
        state.settings = mhc_settings_from_args(args)
        apply_profile_ranges(args)
        announce(args, state.settings)
        if args.pipeline_schedule == "dualpipev":
            hooks.install("dualpipev-schedule")
        elif state.settings.enabled and args.pipeline_model_parallel_size > 1:
            hooks.install("pipeline-stream-shapes")
        if args.mhc_lr_step_decay:
            hooks.install("lr-step-decay", args.mhc_lr_step_decay)
        if state.settings.enabled and getattr(args, "overlap_moe_expert_parallel_comm", False):
            hooks.install("fine-grained-callables")
        return args

    return parse_and_validate_args


def gpt_config_hook(gpt_config, state: LaunchState):
    """Hook ``gpt-config``: Megatron's GPT model config, made to build mHC layers."""

    def gpt_config_from_args(args, *rest, **kwargs):
        from .arguments import mhc_settings_from_args
        from .model_config import apply_mhc_to_gpt_config

        model_cfg = gpt_config(args, *rest, **kwargs)
        settings = state.settings or mhc_settings_from_args(args)
        model_cfg = apply_mhc_to_gpt_config(model_cfg, settings)
        if getattr(args, "pipeline_schedule", "default") == "dualpipev":
            from .dualpipev import use_dualpipev

            model_cfg = use_dualpipev(model_cfg)
        if getattr(args, "mhc_log_interval", 0) and settings.enabled:
            from .diagnostics_log import attach_diagnostics_log

            state.diagnostics = attach_diagnostics_log(args.mhc_log_interval, model_cfg)
        return model_cfg

    return gpt_config_from_args


def hybrid_config_hook(hybrid_config, state: LaunchState):
    """Hook ``hybrid-config``: Megatron's HybridModel config, made to build mHC layers."""

    def hybrid_config_from_args(args, *rest, **kwargs):
        from .arguments import mhc_settings_from_args
        from .model_config import apply_mhc_to_hybrid_config

        settings = state.settings or mhc_settings_from_args(args)
        return apply_mhc_to_hybrid_config(hybrid_config(args, *rest, **kwargs), settings)

    return hybrid_config_from_args


def announce(args, settings) -> None:
    """One log line saying what this launch runs: the residual mode and which Megatron."""
    import megatron.core

    if getattr(args, "rank", 0) != 0:
        return
    mode = settings.mode if not settings.enabled else (
        f"{settings.mode}, {settings.expansion_rate} streams, {settings.sinkhorn_iters} Sinkhorn iterations, "
        f"kernels {settings.backend}" if settings.mode == "mhc" else f"hc, {settings.expansion_rate} streams")
    version = getattr(megatron.core, "__version__", "unknown version")
    where = os.path.dirname(os.path.dirname(os.path.abspath(megatron.core.__file__)))
    print(f"{PROG}: residual mode {mode}; megatron-core {version} from {where}", flush=True)


def escape_help_percent_signs(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """megatron-core 0.19.2 has a help string with a bare '%' ('10%'), which makes argparse's
    --help crash; escape such signs so --help works."""
    for action in parser._actions:
        if action.help and "%" in action.help:
            action.help = re.sub(r"(?<!%)%(?![(%])", "%%", action.help)
    return parser


def skip_dataset_helper_compile_if_prebuilt() -> bool:
    """The wheel has the compiled dataset helpers but no Makefile, so Megatron's
    ``_compile_dependencies`` (``make -C megatron/core/datasets``) would exit the job: hook
    ``dataset-helpers``."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return False
    makefile = os.path.join(os.path.dirname(helpers_cpp.__file__), "Makefile")
    if os.path.exists(makefile):
        return False
    hooks.install("dataset-helpers")
    return True


def _split_launcher_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM"))
    return pre.parse_known_args(argv)


def apply_schedule_defaults(argv: list[str]) -> list[str]:
    """``--pipeline-schedule dualpipev`` means two virtual stages per rank: add
    ``--num-virtual-stages-per-pipeline-rank 2`` unless given, refuse anything else."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--pipeline-schedule", default="default")
    pre.add_argument("--num-virtual-stages-per-pipeline-rank", type=int)
    pre.add_argument("--num-layers-per-virtual-pipeline-stage", type=int)
    known, _ = pre.parse_known_args(argv)
    if known.pipeline_schedule != "dualpipev":
        return argv
    if known.num_layers_per_virtual_pipeline_stage is not None:
        raise ValueError("--pipeline-schedule dualpipev sets two stages per rank itself: drop "
                         "--num-layers-per-virtual-pipeline-stage")
    vpp = known.num_virtual_stages_per_pipeline_rank
    if vpp is None:
        return [*argv, "--num-virtual-stages-per-pipeline-rank", "2"]
    if vpp != 2:
        raise ValueError(f"--pipeline-schedule dualpipev runs two stages per rank, got "
                         f"--num-virtual-stages-per-pipeline-rank {vpp}: drop it or set 2")
    return argv


def _print_help_header() -> None:
    print(
        f"{PROG}: Megatron-LM GPT pre-training with Manifold-Constrained Hyper-Connections.\n"
        "Every Megatron-LM argument is accepted, plus the 'mHC (mhc-megatron)' group below and\n"
        "  --megatron-lm PATH    run PATH/pretrain_gpt.py (a Megatron-LM checkout; default $MEGATRON_LM)\n"
        "                        instead of the built-in entry (mock or indexed GPT data only)\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher, megatron_argv = _split_launcher_args(argv)
    wants_help = "-h" in megatron_argv or "--help" in megatron_argv
    if wants_help:
        _print_help_header()
    state = LaunchState(builtin_entry=not launcher.megatron_lm)
    try:
        script = None
        if launcher.megatron_lm:
            script = _checkout_script(launcher.megatron_lm, megatron_argv)
            _use_checkout(launcher.megatron_lm)  # before anything imports megatron
        with hooks.active(*LAUNCH_HOOKS, context=state), _nvtx_switch_scoped():
            _launch(script, megatron_argv, wants_help)
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _checkout_script(path: str, megatron_argv: list[str]) -> str:
    name = "pretrain_hybrid.py" if "--hybrid-layer-pattern" in megatron_argv else "pretrain_gpt.py"
    script = os.path.join(path, name)
    if not os.path.isfile(script):
        where = "there" if os.path.isdir(path) else "there (no such directory)"
        raise ValueError(f"--megatron-lm {path}: no {name} {where}; give the root of a Megatron-LM checkout "
                         f"(the directory holding {name} and megatron/, e.g. from git clone "
                         "https://github.com/NVIDIA/Megatron-LM), or drop --megatron-lm (and unset $MEGATRON_LM) "
                         "to run the built-in entry")
    return script


def _use_checkout(path: str) -> None:
    """Checkout mode: the checkout's megatron for everything, said in the launch log."""
    from .checkout import use_checkout

    version, where = use_checkout(path)
    print(f"{PROG}: Megatron-LM checkout {os.path.abspath(path)}: megatron-core {version} from {where}", flush=True)


def _launch(script: str | None, megatron_argv: list[str], wants_help: bool) -> None:
    sys.argv = [PROG, *apply_schedule_defaults(megatron_argv)]
    # --help: our parser's help (the same Megatron flags): Megatron-LM main's pretrain_gpt.py parses
    # --help in its in-process-restart wrapper, outside our hooks, and its help crashes on a bare '%'
    if script and not wants_help:
        runpy.run_path(script, run_name="__main__")
    else:
        _run_builtin_entry()


def _run_builtin_entry() -> None:
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import (
        gpt_config_from_args,
        hybrid_config_from_args,
        pretrain_cfg_container_from_args,
    )
    from megatron.training.arguments import parse_and_validate_args

    from . import gpt_entry

    args = parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    # Megatron's convention: --hybrid-layer-pattern selects HybridModel (same data and forward step)
    model_cfg = hybrid_config_from_args(args) if args.hybrid_layer_pattern else gpt_config_from_args(args)
    skip_dataset_helper_compile_if_prebuilt()
    pretrain(
        pretrain_cfg_container_from_args(args, model_cfg),
        gpt_entry.train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        gpt_entry.forward_step,
    )


if __name__ == "__main__":
    sys.exit(main())
