"""The functional matrix: ``mhc-pretrain-gpt`` through Megatron's own ``pretrain()`` on the CPU.

Every case launches the product as a user does (torchrun, gloo) and compares the per-iteration
``lm loss`` Megatron writes to TensorBoard with a reference run. Tolerances:

* ``EXACT`` (0): the same computation in the same layout (hooks off vs residual mode, a resume vs
  the uninterrupted run, recompute vs keeping the intermediates);
* ``LAYOUT`` (5e-6 absolute, on losses near 4.5): another parallel layout of the same model from
  the same weights; only the order of float32 sums differs (measured: at most 5e-7);
* ``BF16`` (0.05): bf16 against the float32 run (measured: about 1e-3);
* ``BF16_ORDER`` (2e-3): the same bf16 model with the order of some sums changed (measured: 4e-4,
  residual mode alike).

What each case proves, and how to add one: docs/testing.md.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from harness import HERE, TINY_GPT
from plan import LAUNCHES, Matrix, uses

from mhc_megatron.training.refusals import LAUNCH as LAUNCH_REFUSALS

pytestmark = [pytest.mark.functional, pytest.mark.slow]

EXACT = 0.0
LAYOUT = 5e-6
BF16 = 0.05
BF16_ORDER = 2e-3
ITERATIONS = list(range(1, 9))


WORST: dict[tuple[str, str], float] = {}  # (launch, reference) -> worst |d lm loss|, printed by conftest.py


@pytest.fixture(scope="module")
def matrix(request, tmp_path_factory):
    """Runs the launches the selected tests of this module need (two cores' worth at a time)."""
    m = Matrix(str(tmp_path_factory.mktemp("real-loop")))
    wanted = []
    for item in request.session.items:
        if item.module is request.module:
            for mark in item.iter_markers("launches"):
                wanted.extend(mark.args)
    m.start(dict.fromkeys(wanted))
    yield m
    m.close()


def curve(matrix, name, iterations=ITERATIONS):
    run = matrix.run(name).check()
    missing = [i for i in iterations if i not in run.losses]
    assert not missing, f"{name}: no lm loss for iterations {missing}\n{run.tail()}"
    return [run.losses[i] for i in iterations]


def assert_curves_match(matrix, name, reference, tol, iterations=ITERATIONS):
    got, want = curve(matrix, name, iterations), curve(matrix, reference, iterations)
    worst = max(abs(a - b) for a, b in zip(got, want))
    WORST[(name, reference)] = worst
    assert worst <= tol, f"{name} vs {reference}: worst |d lm loss| {worst:.3g} > {tol:g}\n{got}\n{want}"
    return worst


def assert_trains(values, by=0.3):
    assert all(math.isfinite(v) for v in values), values
    assert values[-1] < values[0] - by, f"loss did not decrease by {by}: {values}"


# 1 --------------------------------------------------------------------------------------------
@uses("plain", "residual")
def test_residual_mode_is_megatron_unchanged(matrix):
    assert_curves_match(matrix, "residual", "plain", EXACT)
    assert "residual mode residual;" in matrix.run("residual").log


# 2 --------------------------------------------------------------------------------------------
@uses("mhc", "hc", "residual")
@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_reference_curves_train(matrix, mode):
    values = curve(matrix, mode)
    assert_trains(values)
    assert f"residual mode {mode}, 4 streams" in matrix.run(mode).log
    assert values != curve(matrix, "residual")  # the mode took effect


# 3 --------------------------------------------------------------------------------------------
@uses("mhc", "mhc_init")
def test_initial_checkpoint_is_the_initial_model(matrix):
    """The layout cases start from ``mhc_init``: its one lr-0 step saw the weights of ``mhc``."""
    assert curve(matrix, "mhc_init", [1]) == curve(matrix, "mhc", [1])


@uses("mhc", "mhc_tp2", "mhc_tp2_sp", "mhc_pp2", "mhc_pp2_vpp2")
@pytest.mark.parametrize("layout", ["mhc_tp2", "mhc_tp2_sp", "mhc_pp2", "mhc_pp2_vpp2"])
def test_parallel_layouts_match_the_single_process_curve(matrix, layout):
    assert_curves_match(matrix, layout, "mhc", LAYOUT)


@uses("mhc_untied", "mhc_untied_init", "mhc_dualpipev")
def test_dualpipev_matches_the_single_process_curve(matrix):
    assert curve(matrix, "mhc_untied_init", [1]) == curve(matrix, "mhc_untied", [1])
    assert_curves_match(matrix, "mhc_dualpipev", "mhc_untied", LAYOUT)
    assert_trains(curve(matrix, "mhc_dualpipev"))


@uses("mhc8", "mhc8_1f1b_pp4", "mhc8_dualpipev_pp4", "mhc8_dualpipev_pp2_recompute")
@pytest.mark.parametrize("layout", ["mhc8_1f1b_pp4", "mhc8_dualpipev_pp4", "mhc8_dualpipev_pp2_recompute"])
def test_dualpipev_at_pp4_and_with_recompute_matches_1f1b_and_one_process(matrix, layout):
    assert_curves_match(matrix, layout, "mhc8", LAYOUT)
    if "dualpipev" in layout:
        assert_curves_match(matrix, layout, "mhc8_1f1b_pp4", LAYOUT)


# 4 --------------------------------------------------------------------------------------------
@uses("moe_ep1", "moe_ep2")
def test_moe_with_mla_matches_across_expert_parallel_sizes(matrix):
    assert_curves_match(matrix, "moe_ep2", "moe_ep1", LAYOUT)
    assert_trains(curve(matrix, "moe_ep1"))


@uses("moe_untied", "moe_dualpipev_pp2_ep2")
def test_moe_with_mla_through_dualpipev_and_expert_parallel_matches_one_process(matrix):
    assert_curves_match(matrix, "moe_dualpipev_pp2_ep2", "moe_untied", LAYOUT)
    assert_trains(curve(matrix, "moe_dualpipev_pp2_ep2"))


@uses("moe_ep2_bf16", "moe_ep2_bf16_overlap")
def test_expert_parallel_overlap_computes_the_same_step(matrix):
    """--overlap-moe-expert-parallel-comm runs the mHC MoE layers as megatron-core's schedule nodes
    (combined 1F1B): the same forward, and the same training up to bf16 rounding (the nodes'
    backward sums the residual's gradients in another order)."""
    assert curve(matrix, "moe_ep2_bf16_overlap", [1]) == curve(matrix, "moe_ep2_bf16", [1])
    assert_curves_match(matrix, "moe_ep2_bf16_overlap", "moe_ep2_bf16", BF16_ORDER)
    norms = [matrix.run(n).scalars["grad-norm"][1] for n in ("moe_ep2_bf16_overlap", "moe_ep2_bf16")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-2), norms
    assert "combined_1f1b" not in matrix.run("moe_ep2_bf16").log


def _paired_units(trace: str) -> list[tuple[str, list[str]]]:
    """(unit, its schedule-node passes) for each overlapped F&B pair of a DualPipeV node trace."""
    units, current = [], None
    with open(trace) as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith("unit "):
            current = (line[5:], []) if "&" in line else None
            if current:
                units.append(current)
        elif current is not None:
            current[1].append(line)
    return units


@uses("moe_dualpipev_bf16", "moe_dualpipev_bf16_overlap")
def test_dualpipev_overlaps_its_pairs_layer_by_layer_with_the_same_step(matrix):
    """With --overlap-moe-expert-parallel-comm each DualPipeV F&B pair runs as megatron-core's
    schedule nodes with the two passes' nodes interleaved (one's all-to-all beside the other's
    compute), and trains exactly as the pairs run one after the other."""
    assert_curves_match(matrix, "moe_dualpipev_bf16_overlap", "moe_dualpipev_bf16", LAYOUT)
    norms = [matrix.run(n).scalars["grad-norm"] for n in ("moe_dualpipev_bf16_overlap", "moe_dualpipev_bf16")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5), norms
    for rank in range(4):
        units = _paired_units(os.path.join(matrix.ckpt("moe_dualpipev_bf16_overlap"), "trace", f"rank{rank}.txt"))
        assert units, f"rank {rank} ran no overlapped pair"
        for unit, nodes in units:
            passes = [n for n in nodes if not n.startswith("send")]
            layer_nodes = [n.split() for n in passes if n.split()[1] not in ("pre_process", "post_process", "loss_func")]
            kinds = "".join(kind for kind, _, _ in layer_nodes)
            assert {(kind, vp) for kind, _, vp in layer_nodes} in ({("F", "vp0"), ("B", "vp1")}, {("F", "vp1"), ("B", "vp0")}), unit
            # per layer: B combine, F attention, B experts, F dispatch, B dispatch, F experts+combine, B attention
            assert "BFBFBFFB" in kinds, (unit, kinds)
            # a forward output bound for another rank (PP=2: stages 0 and 2; stage 1 hands over in
            # memory, 3 is the loss) leaves before the backward's last pieces
            f_stage, f_mb = unit.split()[0][1:].rstrip("&").split(".")
            if f_stage in ("0", "2"):
                sends = [i for i, n in enumerate(nodes) if n == f"send act {int(f_stage) + 1}.{f_mb}"]
                last_b = max(i for i, n in enumerate(nodes) if n.startswith("B "))
                assert sends and sends[0] < last_b, (unit, nodes)


# 5 --------------------------------------------------------------------------------------------
@uses("mhc", "mhc_recompute_auto", "mhc_recompute_3")
@pytest.mark.parametrize("name", ["mhc_recompute_auto", "mhc_recompute_3"])
def test_mhc_recompute_changes_nothing(matrix, name):
    assert_curves_match(matrix, name, "mhc", LAYOUT)


# 6 --------------------------------------------------------------------------------------------
@uses("hybrid", "hybrid_pp2")
def test_hybrid_model_trains_and_pipelines(matrix):
    assert_trains(curve(matrix, "hybrid"))
    assert_curves_match(matrix, "hybrid_pp2", "hybrid", LAYOUT)


@uses("mtp", "rope")
def test_multi_token_prediction_trains_beside_the_mhc_decoder(matrix):
    # same initial weights: the main loss of the first step does not see the MTP block
    assert abs(curve(matrix, "mtp", [1])[0] - curve(matrix, "rope", [1])[0]) <= LAYOUT
    assert_trains(curve(matrix, "mtp"))
    mtp = matrix.run("mtp").scalars
    tag = next((t for t in mtp if t.startswith("mtp_1 loss") and "vs samples" not in t), None)
    assert tag, sorted(mtp)
    values = [mtp[tag][i] for i in sorted(mtp[tag])]
    assert values[-1] < values[0], values


# 7 --------------------------------------------------------------------------------------------
@uses("mhc", "mhc_resume", "residual", "residual_resume")
@pytest.mark.parametrize("mode", ["mhc", "residual"])
def test_resume_continues_exactly(matrix, mode):
    assert_curves_match(matrix, f"{mode}_resume", mode, EXACT, iterations=[5, 6, 7, 8])


@uses("mhc_tp2", "tp2_to_tp1_resume")
def test_resume_at_another_tensor_parallel_size(matrix):
    assert_curves_match(matrix, "tp2_to_tp1_resume", "mhc_tp2", LAYOUT, iterations=[5, 6, 7, 8])


# 8 --------------------------------------------------------------------------------------------
@uses("mhc", "hc")
def test_diagnostics_reach_tensorboard(matrix):
    gains = {}
    for mode in ("mhc", "hc"):
        scalars = matrix.run(mode).scalars
        for tag in ("mhc/composite_forward_gain", "mhc/composite_backward_gain"):
            assert sorted(scalars.get(tag, {})) == [2, 4, 6, 8], (mode, tag, sorted(scalars))
        assert sum(t.startswith("mhc/sublayer_") for t in scalars) == 6 * 8  # 8 sublayers
        gains[mode] = [v for i, v in sorted(scalars["mhc/composite_forward_gain"].items())]
    assert all(abs(g - 1) <= 1e-5 for g in gains["mhc"]), gains["mhc"]
    assert any(abs(g - 1) > 1e-3 for g in gains["hc"]), gains["hc"]


# 9 --------------------------------------------------------------------------------------------
@uses("mhc_bf16", "mhc_bf16_resume", "mhc_bf16_distopt", "mhc")
def test_bf16_trains_checkpoints_and_keeps_fp32_main_parameters(matrix):
    assert_curves_match(matrix, "mhc_bf16", "mhc", BF16)
    assert_curves_match(matrix, "mhc_bf16_distopt", "mhc_bf16", BF16)
    assert_curves_match(matrix, "mhc_bf16_resume", "mhc_bf16", EXACT, iterations=[5, 6, 7, 8])
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    def dtypes(name):
        meta = FileSystemReader(os.path.join(matrix.ckpt(name), "iter_0000004")).read_metadata().state_dict_metadata
        return {k: v.properties.dtype for k, v in meta.items() if hasattr(v, "properties")}

    saved = dtypes("mhc_bf16")
    phi = "decoder.layers.input_layernorm.coefficients.phi"
    # the model holds bf16 like every Megatron parameter; the optimizer its fp32 main copy and moments
    assert saved[phi] == saved["decoder.layers.self_attention.linear_qkv.weight"] == torch.bfloat16
    for state in ("fp32_param", "exp_avg", "exp_avg_sq"):
        assert saved[f"optimizer.state.{state}.{phi}"] == torch.float32, state
    assert dtypes("mhc_bf16_distopt")[phi] == torch.bfloat16


# 10 -------------------------------------------------------------------------------------------
# every refusal the command line decides: the rows of mhc_megatron.training.refusals.LAUNCH (also the
# table of docs/troubleshooting.md), each run through mhc-pretrain-gpt's main in one worker process
REFUSALS = LAUNCH_REFUSALS


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    cases = [{"argv": [*TINY_GPT, *row.argv], "world_size": row.world_size} for row in REFUSALS]
    (root / "cases.json").write_text(json.dumps(cases))
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_DEVICE_MAX_CONNECTIONS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "refusal_worker.py"), str(root / "cases.json"),
                           str(root / "results.json")], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((root / "results.json").read_text())


@pytest.mark.parametrize("index", range(len(REFUSALS)), ids=[r.message[:40] for r in REFUSALS])
def test_refused_before_megatron_validates_or_builds(refusals, index):
    row = REFUSALS[index]
    if row.unless_installed and importlib.util.find_spec(row.unless_installed):
        pytest.skip(f"{row.unless_installed} is installed here: the launch is not refused")
    result = refusals[index]
    assert result["rc"] == 2, result
    assert row.message in result["stderr"], result["stderr"]
    assert result["stderr"].startswith(f"mhc-pretrain-gpt: error: {row.flag} "), result["stderr"]  # names the flag first
    assert result["raised_in"] == row.raised_in, result["raised_in"]
    assert "------------------------ arguments ------------------------" not in result["stdout"]
    assert not result["megatron_args_set"]


def test_every_launch_is_used():
    """A launch no test reads is wasted CI time."""
    import test_real_loop

    used = set()
    for obj in vars(test_real_loop).values():
        for mark in getattr(obj, "pytestmark", []):
            if mark.name == "launches":
                used.update(mark.args)
    needed = {dep for name in used for dep in LAUNCHES[name].needs}
    assert set(LAUNCHES) == used | needed, set(LAUNCHES) - used - needed
