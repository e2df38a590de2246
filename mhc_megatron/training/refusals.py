"""Every refusal of ``mhc-pretrain-gpt`` and of the library API, one row each.

The rows are the single source of three things: the refusal tables of docs/troubleshooting.md
(generated between markers: ``python -m mhc_megatron.training.refusals --write docs/troubleshooting.md``),
the functional test that runs each launch row through the real entry point
(tests/functional/test_real_loop.py, via refusal_worker.py), and the unit test of each API row
(tests/test_refusals.py). The tests assert the row's message fragment and, for launch rows, that
the message names the row's flag first and that the refusal is raised in ``raised_in``.

Refusals of the checkout and patch routes need a Megatron-LM tree, so they are ``Route`` rows:
tests/test_refusals.py checks that each message fragment occurs in the source of its ``raised_in``
function and that the test named to trigger it exists.

Adding a refusal is one ``Launch(...)``, ``Api(...)`` or ``Route(...)`` entry below.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

_DUALPIPEV = ("--residual-mode", "mhc", "--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipev",
              "--untie-embeddings-and-output-weights")
_MHC = ("--residual-mode", "mhc")


@dataclass(frozen=True)
class Launch:
    """A refusal the command line decides, before Megatron validates, prints or builds anything.

    argv: flags added to a small GPT launch that trigger it; message: a fragment of the error
    (after ``mhc-pretrain-gpt: error: ``), which starts with ``flag``; raised_in: the function
    that decides it (module.qualname); world_size: ranks the launch claims (WORLD_SIZE).
    """

    flag: str
    condition: str
    argv: tuple[str, ...]
    message: str
    raised_in: str
    world_size: int = 1
    unless_installed: str = ""  # a module whose presence lifts the refusal (the functional test skips then)


@dataclass(frozen=True)
class Api:
    """A refusal of the Python API: ``call`` (evaluated with ``MHCSettings``, ``ops`` and ``torch``
    in scope) raises ``error`` with ``message`` in it."""

    api: str
    condition: str
    call: str
    message: str
    error: str = "ValueError"


@dataclass(frozen=True)
class Route:
    """A refusal of the checkout route (``--megatron-lm``) or of the patched ``pretrain_gpt.py``:
    ``message`` is a literal fragment of the source of ``raised_in``; ``test`` (path::name) triggers it
    on a fixture tree."""

    flag: str
    condition: str
    message: str
    raised_in: str
    test: str


_ARGS = "mhc_megatron.training.arguments.mhc_settings_from_args"
_SETTINGS = "mhc_megatron.mcore.settings.MHCSettings.__post_init__"
_NUMERICS = "mhc_megatron.mcore.settings.MHCSettings._check_upstream_numerics"
_CONFIG = "mhc_megatron.mcore.settings.check_transformer_config"
_HYBRID = "mhc_megatron.mcore.hybrid.check_hybrid_pattern"
_DPV = "mhc_megatron.training.checks.check_dualpipev_args"
_DPV_CONFIG = "mhc_megatron.pipeline.dualpipev.check_dualpipev_config"
_SCHEDULE = "mhc_megatron.training.launcher.apply_schedule_defaults"
_PROFILE = "mhc_megatron.training.profile_ranges.check_profile_ranges_args"
_CHECKOUT = "mhc_megatron.training.checkout.use_checkout"

LAUNCH = (
    Launch("--expansion-rate", "given with --residual-mode residual (one stream)", ("--expansion-rate", "4"),
           "--expansion-rate 4 needs --residual-mode hc or mhc", _ARGS),
    Launch("--expansion-rate", "not an integer >= 1", (*_MHC, "--expansion-rate", "0"),
           "--expansion-rate 0: expansion rate must be an integer >= 1", "mhc_megatron.ops._checks.check_expansion_rate"),
    Launch("--expansion-rate", "n without a Triton kernel (not 1, 2, 4 or 8) under --mhc-kernels triton",
           (*_MHC, "--expansion-rate", "3", "--mhc-kernels", "triton"),
           "--expansion-rate 3: the Triton kernels (--mhc-kernels triton) are compiled for n in (1, 2, 4, 8)",
           _SETTINGS),
    Launch("--mhc-sinkhorn-iters", "not an integer >= 1", (*_MHC, "--mhc-sinkhorn-iters", "0"),
           "--mhc-sinkhorn-iters 0: Sinkhorn iterations must be an integer >= 1", "mhc_megatron.ops._checks.check_iters"),
    Launch("--mhc-alpha-init", "negative or not finite", (*_MHC, "--mhc-alpha-init", "-1"),
           "--mhc-alpha-init -1.0: the gate init must be a finite value >= 0", _SETTINGS),
    Launch("--mhc-res-init-diag", "not finite", (*_MHC, "--mhc-res-init-diag", "inf"),
           "--mhc-res-init-diag inf: the H_res init diagonal must be finite", _SETTINGS),
    Launch("--mhc-coeff-eps", "<= 0 or not finite", (*_MHC, "--mhc-coeff-eps", "0"),
           "--mhc-coeff-eps 0.0: the coefficient norm epsilon must be a finite value > 0", _SETTINGS),
    Launch("--mhc-recompute-block-size", "not 'auto' nor an integer >= 1", (*_MHC, "--mhc-recompute-block-size", "0"),
           "--mhc-recompute-block-size 0: the recompute block size must be 'auto' or an integer >= 1", _SETTINGS),
    Launch("--mhc-log-interval", "negative", (*_MHC, "--mhc-log-interval", "-1"),
           "--mhc-log-interval -1: must be >= 0", _ARGS),
    Launch("--mhc-log-interval", "with --residual-mode residual (no H_res)", ("--mhc-log-interval", "2"),
           "--mhc-log-interval 2 logs H_res, which needs --residual-mode hc or mhc", _ARGS),
    Launch("--mhc-sinkhorn-order", "non-default, with --residual-mode residual", ("--mhc-sinkhorn-order", "rows-first"),
           "--mhc-sinkhorn-order rows-first needs --residual-mode mhc", _NUMERICS),
    Launch("--mhc-sinkhorn-order", "rows-first where the Triton kernels run (they implement cols-first)",
           (*_MHC, "--mhc-sinkhorn-order", "rows-first", "--mhc-kernels", "triton"),
           "--mhc-sinkhorn-order rows-first: implemented in the PyTorch reference ops only", _NUMERICS),
    Launch("--mhc-res-init-diag", "non-zero with --mhc-init upstream (zero biases)",
           (*_MHC, "--mhc-init", "upstream", "--mhc-res-init-diag", "4"),
           "--mhc-res-init-diag 4.0 belongs to --mhc-init ours", _NUMERICS),
    Launch("--mhc-dropout", "per-stream with --mhc-recompute",
           (*_MHC, "--mhc-dropout", "per-stream", "--mhc-recompute", "--mhc-kernels", "reference"),
           "--mhc-dropout per-stream with --mhc-recompute is not supported", _NUMERICS),
    Launch("--residual-mode", "hc/mhc with selective recompute of 'layernorm' (the mHC coefficient step)",
           (*_MHC, "--recompute-granularity", "selective", "--recompute-modules", "layernorm"),
           "drop 'layernorm' from --recompute-modules", _CONFIG),
    Launch("--residual-mode", "hc/mhc with --mhc-recompute and --recompute-granularity full",
           (*_MHC, "--mhc-recompute", "--recompute-granularity", "full", "--recompute-method", "uniform"),
           "--mhc-recompute together with --recompute-granularity full", _CONFIG),
    Launch("--residual-mode", "hc/mhc with CUDA graphs (static buffers of the residual width)",
           (*_MHC, "--cuda-graph-impl", "local"), "run without --cuda-graph-impl", _CONFIG),
    Launch("--residual-mode", "hc/mhc with --mhc-recompute and --overlap-moe-expert-parallel-comm",
           (*_MHC, "--mhc-recompute", "--overlap-moe-expert-parallel-comm"),
           "--mhc-recompute together with --overlap-moe-expert-parallel-comm", _CONFIG),
    Launch("--hybrid-layer-pattern", "a Mamba ('M') layer, with --residual-mode hc/mhc",
           (*_MHC, "--hybrid-layer-pattern", "*M*-", "--num-layers", "4"), "'M' (Mamba)", _HYBRID),
    Launch("--hybrid-layer-pattern", "multi-token prediction ('/...'), with --residual-mode hc/mhc",
           (*_MHC, "--hybrid-layer-pattern", "*-*-/*-", "--num-layers", "4"),
           "multi-token prediction in the hybrid pattern", _HYBRID),
    Launch("--mhc-recompute", "with --hybrid-layer-pattern (HybridModel)",
           (*_MHC, "--mhc-recompute", "--hybrid-layer-pattern", "*-*-", "--num-layers", "4"),
           "--mhc-recompute with HybridModel", _HYBRID),
    Launch("--transformer-impl", "local with a --hybrid-layer-pattern the TE-free hybrid stack cannot build "
           "(symbols other than *, -, E; multi-latent attention)",
           (*_MHC, "--hybrid-layer-pattern", "*-*-", "--num-layers", "4", "--multi-latent-attention"),
           "--transformer-impl local with --hybrid-layer-pattern '*-*-': the transformer-engine-free hybrid stack",
           "mhc_megatron.training.model_config.check_hybrid_stack"),
    Launch("--pipeline-schedule", "dualpipev with --pipeline-model-parallel-size 1",
           (*_MHC, "--pipeline-schedule", "dualpipev"),
           "--pipeline-schedule dualpipev needs --pipeline-model-parallel-size >= 2, got 1", _DPV),
    Launch("--pipeline-schedule", "dualpipev with --num-layers-per-virtual-pipeline-stage",
           (*_DUALPIPEV, "--num-layers-per-virtual-pipeline-stage", "1"),
           "--pipeline-schedule dualpipev sets two stages per rank itself: drop --num-layers-per-virtual-pipeline-stage",
           _SCHEDULE, 2),
    Launch("--pipeline-schedule", "dualpipev with --num-virtual-stages-per-pipeline-rank other than 2",
           (*_DUALPIPEV, "--num-virtual-stages-per-pipeline-rank", "3"),
           "got --num-virtual-stages-per-pipeline-rank 3", _SCHEDULE, 2),
    Launch("--pipeline-schedule", "dualpipev with tied embedding and output weights", _DUALPIPEV[:-1],
           "add --untie-embeddings-and-output-weights", _DPV, 2),
    Launch("--pipeline-schedule", "dualpipev with fewer than 2P micro-batches per step",
           (*_DUALPIPEV, "--global-batch-size", "2"), "needs at least 4 micro-batches per step",
           "mhc_megatron.pipeline.program.check_microbatches", 2),
    Launch("--pipeline-schedule", "dualpipev with --num-layers not a multiple of 2P",
           (*_DUALPIPEV, "--num-layers", "6"), "6 is not a multiple of 4", _DPV_CONFIG, 2),
    Launch("--pipeline-schedule", "dualpipev with --mtp-num-layers",
           (*_DUALPIPEV, "--mtp-num-layers", "1", "--position-embedding-type", "rope"), "drop --mtp-num-layers",
           _DPV_CONFIG, 2),
    Launch("--pipeline-schedule", "dualpipev with --hybrid-layer-pattern", (*_DUALPIPEV, "--hybrid-layer-pattern", "*-*-"),
           "supports GPTModel only", _DPV, 2),
    Launch("--pipeline-schedule", "dualpipev with --overlap-param-gather",
           (*_DUALPIPEV, "--overlap-param-gather", "--use-distributed-optimizer", "--overlap-grad-reduce"),
           "drop --overlap-param-gather", _DPV_CONFIG, 2),
    Launch("--tensor-model-parallel-size", "(with dualpipev) TP x PP x CP does not divide the world size",
           _DUALPIPEV, "--tensor-model-parallel-size x --pipeline-model-parallel-size x --context-parallel-size = 2 "
           "does not divide the world size 3", "mhc_megatron.training.checks.data_parallel_size", 3),
    Launch("--transformer-impl", "transformer_engine (also Megatron's default) while transformer-engine is not installed",
           ("--transformer-impl", "transformer_engine"),
           "--transformer-impl transformer_engine: transformer-engine is not installed",
           "mhc_megatron.training.launch_environment.check_launch_environment", unless_installed="transformer_engine"),
    Launch("--mhc-lr-step-decay", "with --lr-decay-style other than constant (the step schedule replaces the decay)",
           ("--mhc-lr-step-decay", "0.8:0.316,0.9:0.1", "--lr-decay-style", "linear"),
           "--mhc-lr-step-decay 0.8:0.316,0.9:0.1 replaces the decay of --lr-decay-style, got --lr-decay-style linear",
           "mhc_megatron.training.lr_schedule.check_step_decay_args"),
    Launch("--mhc-profile-ranges", "with --residual-mode residual (no mHC steps to mark)", ("--mhc-profile-ranges",),
           "--mhc-profile-ranges marks the mHC steps, which need --residual-mode hc or mhc", _PROFILE),
    Launch("--mhc-profile-ranges", "without --profile --nvtx-ranges (Megatron's NVTX ranges record nothing then)",
           (*_MHC, "--mhc-profile-ranges", "--profile"), "add --nvtx-ranges", _PROFILE),
    Launch("--sft", "with the built-in entry (mock or indexed GPT data only)", (*_MHC, "--sft"),
           "--sft needs Megatron-LM's own pretrain_gpt.py", "mhc_megatron.training.gpt_entry.check_supported"),
)

_INT = "torch.ones(2, 4, 8, dtype=torch.int64)"
API = (
    Api("MHCSettings", "expansion_rate other than the default with mode 'residual'",
        'MHCSettings(mode="residual", expansion_rate=8)', "expansion_rate=8: the residual mode has one stream"),
    Api("MHCSettings", "check_finite, recompute or post_res_stream not a bool", 'MHCSettings(check_finite="yes")',
        "check_finite='yes': must be True or False"),
    Api("MHCSettings", "coeff_eps <= 0, not finite, or not a number", 'MHCSettings(coeff_eps=float("inf"))',
        "coeff_eps=inf: the coefficient norm epsilon must be a finite value > 0"),
    Api("MHCSettings", "alpha_init negative, not finite, or a bool", "MHCSettings(alpha_init=True)",
        "alpha_init=True: the gate init must be a finite value >= 0"),
    Api("MHCSettings", "mode not residual, hc or mhc", 'MHCSettings(mode="mHC")',
        "mode='mHC': the residual mode must be one of residual, hc, mhc"),
    Api("MHCSettings", "backend 'triton' with an n that has no kernel", 'MHCSettings(mode="mhc", expansion_rate=3, backend="triton")',
        "expansion_rate=3: the Triton kernels (--mhc-kernels triton) are compiled for n in (1, 2, 4, 8)"),
    Api("ops.mhc_pre", "a non-floating input (the result would be truncated)",
        f"ops.mhc_pre({_INT}, torch.ones(2, 4, dtype=torch.int64))",
        "mhc_pre: x has dtype torch.int64; the mHC ops take floating-point tensors"),
    Api("ops.mhc_post_res", "a non-floating input", f"ops.mhc_post_res({_INT}, torch.ones(2, 8, dtype=torch.int64), "
        "torch.ones(2, 4, dtype=torch.int64), torch.ones(2, 4, 4, dtype=torch.int64))",
        "mhc_post_res: x has dtype torch.int64; the mHC ops take floating-point tensors"),
)

ROUTE = (
    Route("--megatron-lm", "PATH has no megatron/core package",
          "no megatron/core package there (not a Megatron-LM checkout)", _CHECKOUT,
          "tests/test_checkout_mode.py::test_checkout_without_megatron_is_named"),
    Route("--megatron-lm", "PATH has no pretrain_gpt.py (pretrain_hybrid.py with --hybrid-layer-pattern), or does not exist",
          "give the root of a Megatron-LM checkout", "mhc_megatron.training.launcher._checkout_script",
          "tests/test_checkout_mode.py::test_checkout_without_pretrain_gpt_is_refused_before_megatron_is_imported"),
    Route("--megatron-lm", "this process imported another megatron already (an in-process caller)",
          "run mhc-pretrain-gpt in a fresh process so that only the checkout's megatron is used", _CHECKOUT,
          "tests/test_checkout_mode.py::test_megatron_imported_already_is_refused"),
    Route("--megatron-lm", "the checkout's pretrain_gpt.py carries the mHC patch (the flags would be added twice)",
          "already adds the mHC flags", "mhc_megatron.training.patch_entry.refuse_a_second_mhc_parser",
          "tests/test_patches.py::test_launcher_names_a_patched_checkout"),
    Route("--pipeline-schedule, --mhc-log-interval, --mhc-lr-step-decay, --mhc-profile-ranges",
          "given to the patched pretrain_gpt.py (only mhc-pretrain-gpt's hooks implement them)",
          "not supported by the patched pretrain_gpt.py", "mhc_megatron.training.patch_entry._refuse",
          "tests/test_patches.py::test_patched_script_refuses_launcher_only_flags"),
)

BEGIN, END = "<!-- refusals table: generated by python -m mhc_megatron.training.refusals -->", "<!-- end of refusals table -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table() -> str:
    """The markdown that docs/troubleshooting.md holds between ``BEGIN`` and ``END``."""
    lines = ["`mhc-pretrain-gpt` refuses these before Megatron prints its arguments or builds a model "
             "(exit code 2, `mhc-pretrain-gpt: error: <message>`):", "",
             "| flag | refused when | example | message contains | raised in |", "|---|---|---|---|---|"]
    for r in LAUNCH:
        ranks = f" (world size {r.world_size})" if r.world_size > 1 else ""
        lines.append(f"| `{r.flag}` | {_cell(r.condition)} | `{_cell(' '.join(r.argv))}`{ranks} | "
                     f"`{_cell(r.message)}` | `{r.raised_in}` |")
    lines += ["", "The Python API refuses these (`from mhc_megatron import ops`, `mhc_megatron.mcore.MHCSettings`):", "",
              "| API | refused when | example | error |", "|---|---|---|---|"]
    for r in API:
        lines.append(f"| `{r.api}` | {_cell(r.condition)} | `{_cell(r.call)}` | {r.error}: `{_cell(r.message)}` |")
    lines += ["", "The checkout route (`--megatron-lm PATH`) and the patched `pretrain_gpt.py` refuse these (exit code 2 "
              "from the command line, ValueError in-process); each needs a Megatron-LM tree, so a test on a fixture "
              "tree triggers it:", "",
              "| flag | refused when | message contains | raised in | triggered by |", "|---|---|---|---|---|"]
    for r in ROUTE:
        lines.append(f"| `{r.flag}` | {_cell(r.condition)} | `{_cell(r.message)}` | `{r.raised_in}` | `{r.test}` |")
    return "\n".join(lines) + "\n"


def between_markers(text: str) -> str:
    """What a document holds between the markers (raises if they are missing)."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n") + "\n"


def write(path: str) -> None:
    text = open(path).read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    open(path, "w").write(text[:start] + "\n" + table() + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mhc_megatron.training.refusals", description=__doc__.split("\n")[0])
    parser.add_argument("--write", metavar="DOC", help="replace the table between the markers of DOC")
    args = parser.parse_args(argv)
    if args.write:
        write(args.write)
    else:
        sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
