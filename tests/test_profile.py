"""mhc-megatron profile on a tiny CPU model: timings, overhead and breakdown are consistent."""

import json
import os

import pytest

from mhc_megatron.bench.profile import ProfileConfig, run_profile
from mhc_megatron.cli import main as cli_main

TINY = dict(layers=2, hidden=32, heads=2, seq_len=16, batch_size=2, steps=3, warmup=1, profile_steps=1, device="cpu")


@pytest.mark.parametrize("recompute", [False, True])
def test_profile_breakdown_checked_against_the_op_counts_of_the_model(tmp_path, recompute):
    report = run_profile(ProfileConfig(modes=("residual", "hc", "mhc"), recompute=recompute, **TINY), out_dir=str(tmp_path))
    res, hc, mhc = report["results"]
    assert res["overhead_percent"] is None
    sublayers = 2 * TINY["layers"]
    for r in (hc, mhc):
        assert r["overhead_percent"] == pytest.approx(100 * (r["step_ms_median"] / res["step_ms_median"] - 1), abs=0.5)  # ms rounded to 1 us
        # op counts, from the model's structure: the forward share is the time inside exactly these ranges
        assert r["ranges_per_step"] == {"mhc.contract": 1, "mhc.expand": 1, "mhc.post_res": sublayers, "mhc.pre": sublayers}
        b = r["breakdown_ms"]
        assert b["mhc_forward"] > 0 and b["mhc_backward"] > 0 and b["rest"] >= 0
    # the attribution is by construction only inside the ranges: a model without them has no mHC time
    # (timing bounds against the residual step are not asserted: on a shared 2-core machine the medians
    # of a few steps vary by 10x between runs)
    assert res["breakdown_ms"]["mhc_forward"] == 0 and res["breakdown_ms"]["mhc_backward"] == 0
    assert res["ranges_per_step"] == {}
    for path in report["traces"].values():
        with open(path) as f:
            assert any(e.get("name", "").startswith("mhc.") for e in json.load(f)["traceEvents"]) or path.endswith("residual.json")
    assert os.path.getsize(report["plot"]) > 1000


def test_profile_cli_json(tmp_path, capsys):
    args = ["profile", "--out", str(tmp_path), "--json"] + [
        x for k, v in TINY.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert cli_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in report["results"]] == ["residual", "mhc"]
    assert os.path.exists(tmp_path / "profile.json")


@pytest.mark.parametrize(
    "modes,match", [(("mhc",), "needs 'residual'"), (("residual", "mhcc"), "unknown mode")]
)
def test_profile_refuses_bad_modes(modes, match):
    with pytest.raises(ValueError, match=match):
        ProfileConfig(modes=modes).validate()


def _nvtx_recorder(monkeypatch):
    """torch.cuda.nvtx patched to record pushes and pops (no CUDA on CI)."""
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda msg: calls.append(("push", msg)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop", None)))
    return calls


def _tiny_mhc_step():
    import torch

    from mhc_megatron.demo.model import build_demo_model, init_single_process
    from mhc_megatron.mcore import MHCSettings

    init_single_process(torch.device("cpu"))
    model = build_demo_model(MHCSettings(mode="mhc", expansion_rate=2), layers=2, hidden=16, heads=2, seq_len=8,
                             vocab_size=32, seed=0, device=torch.device("cpu"))
    tokens = torch.randint(0, 32, (1, 8))
    model(tokens, torch.arange(8).expand_as(tokens), None, labels=tokens).float().mean().backward()


def test_mhc_nvtx_ranges_go_through_megatrons_nvtx_helpers(monkeypatch):
    from megatron.core import utils as mcore_utils

    from mhc_megatron.mcore.profiling import nvtx_regions

    calls = _nvtx_recorder(monkeypatch)
    with nvtx_regions():
        monkeypatch.setattr(mcore_utils, "_nvtx_enabled", False)
        _tiny_mhc_step()
        assert calls == []  # silent outside Megatron's NVTX window (--profile-step-start/end)
        monkeypatch.setattr(mcore_utils, "_nvtx_enabled", True)
        _tiny_mhc_step()
    pushed = [msg for kind, msg in calls if kind == "push"]
    ours = [m for m in pushed if m.startswith("mhc.")]  # beside Megatron's own ranges
    assert {m: ours.count(m) for m in set(ours)} == {"mhc.expand": 1, "mhc.pre": 4, "mhc.post_res": 4, "mhc.contract": 1}
    assert sum(kind == "pop" for kind, _ in calls) == len(pushed)  # every range closed
    calls.clear()
    _tiny_mhc_step()  # switched off again: Megatron's ranges only
    assert calls and not any(msg.startswith("mhc.") for kind, msg in calls if kind == "push")


@pytest.mark.parametrize("extra,match", [
    ([], "add --profile --nvtx-ranges"),
    (["--profile"], "add --nvtx-ranges"),
])
def test_mhc_profile_ranges_needs_megatrons_nvtx_window(extra, match):
    import argparse

    from mhc_megatron.training.profile_ranges import check_profile_ranges_args

    args = argparse.Namespace(mhc_profile_ranges=True, residual_mode="mhc", profile="--profile" in extra,
                              nvtx_ranges="--nvtx-ranges" in extra)
    with pytest.raises(ValueError, match=match):
        check_profile_ranges_args(args)
    args.profile = args.nvtx_ranges = True
    check_profile_ranges_args(args)
    args.residual_mode = "residual"
    with pytest.raises(ValueError, match="which need --residual-mode hc or mhc"):
        check_profile_ranges_args(args)


def test_mhc_pretrain_gpt_refuses_profile_ranges_without_nvtx_ranges():
    import subprocess
    import sys

    from launcher_workers import TINY_GPT_ARGS

    env = dict(os.environ, WORLD_SIZE="1", RANK="0", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-m", "mhc_megatron.training.launcher", *TINY_GPT_ARGS, "--residual-mode", "mhc",
                          "--mhc-profile-ranges", "--profile"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2
    assert "--mhc-profile-ranges records through Megatron's NVTX ranges" in out.stderr and "add --nvtx-ranges" in out.stderr


def test_launch_with_profile_ranges_switches_the_nvtx_ranges_on_and_back_off(monkeypatch):
    """The parse hook turns the ranges on for the launch; the launcher's scope restores them."""
    import argparse

    from mhc_megatron.mcore import profiling
    from mhc_megatron.training import launcher
    from mhc_megatron.training.profile_ranges import apply_profile_ranges

    seen = []
    monkeypatch.setattr(launcher, "_launch", lambda *a: (apply_profile_ranges(
        argparse.Namespace(mhc_profile_ranges=True)), seen.append(profiling._NVTX)))
    assert launcher.main(["--residual-mode", "mhc"]) == 0
    assert seen == [True] and profiling._NVTX is False


TINY_LAUNCH = """\
model: {num_layers: 4, hidden_size: 32, num_attention_heads: 2, seq_length: 16, micro_batch_size: 2, swiglu: true}
mhc: {residual_mode: mhc, expansion_rate: 2}
training: {global_batch_size: 2, lr: 1.0e-3}
"""


def test_profile_of_a_launch_config_with_a_layer_override(tmp_path, capsys):
    path = tmp_path / "launch.yaml"
    path.write_text(TINY_LAUNCH)
    assert cli_main(["profile", "--config", str(path), "--layers", "2", "--steps", "2",
                     "--warmup", "1", "--profile-steps", "1", "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"model of {path}" in out and "not reproduced from the config: swiglu: True" in out
    assert "2 layers, hidden 32, seq 16 x batch 2, n = 2" in out  # --layers over the config's 4
    rows = [line.split()[0] for line in out.splitlines() if line.startswith(("residual ", "mhc "))]
    assert rows == ["residual", "mhc"]
    report = json.loads((tmp_path / "out" / "profile.json").read_text())
    assert report["results"][1]["overhead_percent"] is not None and report["not_reproduced"] == ["swiglu: True"]


@pytest.mark.parametrize("model,parallel,match", [
    ("mtp_num_layers: 1", "", "mtp_num_layers 1 builds multi-token prediction, which mhc-megatron profile does not "
     "build yet .*drop the key from a copy of the config"),
    ("hybrid_layer_pattern: '*M*-'", "", r"--hybrid-layer-pattern '\*M\*-': mHC wraps attention \('\*'\), MLP \('-'\) "
     r"and MoE \('E'\) layers; the pattern has 'M' \(Mamba\)"),
    ("num_experts: 4, moe_shared_expert_intermediate_size: 32", "", "moe_shared_expert_intermediate_size 32 with "
     "linear biases: megatron-core's shared experts take no bias .*add disable_bias_linear: true"),
    ("num_experts: 4, moe_token_dispatcher_type: flex", "", "moe_token_dispatcher_type flex does not run in one process"),
    ("hybrid_layer_pattern: '*E*-'", "", "hybrid_layer_pattern '\\*E\\*-' has MoE layers \\('E'\\) but no num_experts"),
    ("", "tensor_model_parallel_size: 2", "tensor_model_parallel_size 2 needs 2 processes; the profile's own model runs "
     "in one process: set tensor_model_parallel_size: 1 in a copy of the config"),
    ("num_experts: 4", "expert_model_parallel_size: 4", "expert_model_parallel_size 4 needs 4 processes; .*set "
     "expert_model_parallel_size: 1 in a copy of the config"),
])
def test_profile_refuses_what_its_model_cannot_stand_in_for(tmp_path, model, parallel, match):
    from mhc_megatron.bench.profile_launch import profile_config_from_launch

    text = TINY_LAUNCH.replace("swiglu: true}", f"swiglu: true, {model}}}") if model else TINY_LAUNCH
    path = tmp_path / "launch.yaml"
    path.write_text(text + (f"parallel: {{{parallel}}}\n" if parallel else ""))
    with pytest.raises(ValueError, match=f"^--config {path}: {match}"):
        profile_config_from_launch(str(path), {})


def _profile_launch(tmp_path, model: str, *flags: str) -> tuple[str, dict]:
    path = tmp_path / "launch.yaml"
    path.write_text(TINY_LAUNCH.replace("swiglu: true}", f"{model}}}"))
    assert cli_main(["profile", "--config", str(path), "--steps", "1", "--warmup", "0", "--profile-steps", "1",
                     "--device", "cpu", "--out", str(tmp_path / "out"), *flags]) == 0
    return str(path), json.loads((tmp_path / "out" / "profile.json").read_text())


def test_profile_of_an_moe_launch_builds_its_experts(tmp_path, capsys):
    """Routed and shared experts as the launch says, counted in the built models; the 4-layer
    moe_layer_freq cut to the 2 layers profiled; one process (alltoall becomes allgather on the CPU)."""
    path, report = _profile_launch(
        tmp_path, "num_experts: 4, moe_router_topk: 2, moe_ffn_hidden_size: 16, moe_shared_expert_intermediate_size: 32, "
        "moe_layer_freq: '([0]+[1]*3)', moe_token_dispatcher_type: alltoall, moe_grouped_gemm: true, "
        "disable_bias_linear: true, normalization: RMSNorm", "--layers", "2")
    residual, mhc = (r["model"] for r in report["results"])
    for built in (residual, mhc):
        assert built["layers"] == 2 and built["moe_layers"] == 1 and built["experts_per_moe_layer"] == [4]
        assert built["shared_experts"] == 1 and built["mla_layers"] == 0
        assert built["routed_expert_parameters"] == 4 * (32 * 16 + 16 * 32)  # fc1 + fc2 per expert, no bias
    assert mhc["parameters"] > residual["parameters"]  # the same model plus the mHC coefficients
    assert report["config"]["transformer"]["moe_layer_freq"] == [0, 1]
    assert report["not_reproduced"] == ["moe_grouped_gemm: True", "moe_token_dispatcher_type: alltoall (allgather on "
                                        "the CPU: alltoall needs a CUDA stream; one expert-parallel rank routes the same)"]
    out = capsys.readouterr().out
    assert "built mhc: " in out and "2 layers, 1 MoE layers of 4 experts + a shared expert in 1" in out
    assert report["results"][1]["ranges_per_step"]["mhc.pre"] == 4  # 2 layers x (attention, MoE) sublayers


def test_profile_of_an_mla_launch_builds_multi_latent_attention(tmp_path, capsys):
    path, report = _profile_launch(tmp_path, "multi_latent_attention: true, kv_lora_rank: 16, qk_head_dim: 8, "
                                   "qk_pos_emb_head_dim: 8, v_head_dim: 8, rope_type: rope", "--layers", "2")
    heads, hidden, qk, pos, v, kv_rank = 2, 32, 8, 8, 8, 16
    per_layer = (hidden * heads * (qk + pos)  # linear_q_proj (no q_lora_rank: no query compression)
                 + hidden * (kv_rank + pos)  # linear_kv_down_proj: the latent and the shared RoPE key
                 + kv_rank * heads * (qk + v)  # linear_kv_up_proj
                 + heads * v * hidden + hidden)  # linear_proj and its bias (a dense GPT: 4 * 32 * 32 + 3 * 32 + 32)
    for r in report["results"]:
        assert r["model"]["mla_layers"] == 2 and r["model"]["moe_layers"] == 0
        assert r["model"]["mla_parameters"] == 2 * per_layer
    assert report["not_reproduced"] == []
    assert "2 multi-latent attention layers" in capsys.readouterr().out


def test_profile_of_a_hybrid_launch_builds_its_pattern(tmp_path, capsys):
    """A pattern of attention, MoE and MLP layers: a HybridModel of exactly those layers, one mHC
    sublayer each (4 pre-mixes per forward), the MoE layer with its experts."""
    path, report = _profile_launch(tmp_path, "hybrid_layer_pattern: '*E*-', num_experts: 4, moe_ffn_hidden_size: 16, "
                                   "disable_bias_linear: true")
    for r in report["results"]:
        built = r["model"]
        assert built["class"] == "HybridModel" and built["layers"] == 4
        assert built["moe_layers"] == 1 and built["experts_per_moe_layer"] == [4]
        assert built["routed_expert_parameters"] == 4 * (32 * 16 + 16 * 32)
    assert report["results"][1]["ranges_per_step"] == {"mhc.contract": 1, "mhc.expand": 1, "mhc.post_res": 4, "mhc.pre": 4}
    assert report["not_reproduced"] == []
    assert "built mhc: HybridModel" in capsys.readouterr().out
