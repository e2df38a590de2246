"""mhc-megatron convert-checkpoint against upstream Megatron-LM's layout and formulas.

The upstream checkpoints are written by the test helper :mod:`upstream_reference` (upstream's keys,
global shapes and TP shard cuts; no upstream code) and its outputs computed by the transcription of
upstream's formulas there. Float64; tolerances stated per test.
"""

import os
import subprocess
import sys

import pytest
import torch

from mcore_helpers import SEQ, VOCAB, local_block_spec, tiny_config
from mhc_megatron.cli import main as cli
from mhc_megatron.mcore import MHCSettings
from upstream_reference import GATES, HC, upstream_gpt_logits, upstream_gpt_weights, write_upstream_checkpoint

pytestmark = pytest.mark.usefixtures("megatron_world")

UPSTREAM_NUMERICS = dict(sinkhorn_order="rows-first", norm_eps_placement="outside", dropout="per-stream",
                         backend="reference")


def _our_gpt(settings, seed=5):
    from megatron.core.models.gpt import GPTModel

    cfg = tiny_config()
    torch.manual_seed(seed)
    return GPTModel(cfg, local_block_spec(cfg, settings), vocab_size=VOCAB, max_sequence_length=SEQ,
                    share_embeddings_and_output_weights=False)


def _load(model, directory):
    from megatron.core import dist_checkpointing

    from mhc_megatron.checkpoints.torch_dist import cpu_checkpoint_io, locate

    iteration_dir, _ = locate(directory)
    sharded = model.sharded_state_dict()
    with cpu_checkpoint_io():
        state = dist_checkpointing.load(sharded, iteration_dir)
    model.load_state_dict({k: state[k] for k in sharded}, strict=True)  # (load adds the common state)
    return model


def _plain(directory):
    """Every tensor of a checkpoint, unsharded (through megatron-core, not the converter)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from mhc_megatron.checkpoints.torch_dist import cpu_checkpoint_io, locate

    iteration_dir, _ = locate(directory)
    with cpu_checkpoint_io():
        meta = dist_checkpointing.load_tensors_metadata(iteration_dir)
        loaded = dist_checkpointing.load(meta, iteration_dir, validate_access_integrity=False)
    return {k: loaded[k] for k, v in meta.items() if isinstance(v, ShardedTensor)}


def _logits(model, tokens):
    model.eval()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), 1)
    with torch.no_grad():
        return model(tokens, positions, mask)


@pytest.fixture(scope="module")
def upstream_tp2(tmp_path_factory):
    """An upstream-mHC checkpoint (save directory with a tracker, shards of a TP=2 run)."""
    root = tmp_path_factory.mktemp("upstream")
    weights = upstream_gpt_weights()
    write_upstream_checkpoint(str(root / "in"), weights, tp=2, iteration=7)
    assert cli(["convert-checkpoint", "--from", "upstream-mhc", "--to", "mhc-megatron", str(root / "in"),
                str(root / "ours")]) == 0
    return weights, root


def test_upstream_checkpoint_converted_and_loaded_reproduces_upstream(upstream_tp2):
    """Our model with the upstream-numerics options on the converted checkpoint = upstream's
    formulas on the original tensors: logits within 1e-12 (float64; measured 2.4e-15 at logits of about 4).
    Our default numerics on the same weights differ by more than 1e-6 (H_res logits far from
    uniform, Sinkhorn not converged at 20 iterations)."""
    weights, root = upstream_tp2
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    ref = upstream_gpt_logits(weights, tokens)
    model = _load(_our_gpt(MHCSettings(mode="mhc", expansion_rate=4, **UPSTREAM_NUMERICS)).double(), str(root / "ours"))
    got = _logits(model, tokens)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    ours = _load(_our_gpt(MHCSettings(mode="mhc", expansion_rate=4, backend="reference")).double(), str(root / "ours"))
    assert (_logits(ours, tokens) - ref).abs().max() > 1e-6


def test_converted_checkpoint_carries_the_metadata_and_structure(upstream_tp2):
    from megatron.core import dist_checkpointing
    from megatron.core.safe_globals import register_safe_globals

    _, root = upstream_tp2
    register_safe_globals()
    assert (root / "ours" / "latest_checkpointed_iteration.txt").read_text() == "7"
    common = dist_checkpointing.load_common_state_dict(str(root / "ours" / "iter_0000007"))
    args = common["args"]
    assert (args.residual_mode, args.expansion_rate, args.mhc_sinkhorn_iters) == ("mhc", 4, 20)
    assert (args.mhc_sinkhorn_order, args.mhc_norm_eps_placement, args.mhc_dropout) == ("rows-first", "outside", "per-stream")
    assert args.enable_mhc_connections is False and args.num_layers == 2 and common["iteration"] == 7
    # the optimizer and RNG state are not carried, and the args say so
    assert args.no_save_optim is True and args.no_save_rng is True and "opt_param_scheduler" not in common
    keys = set(dist_checkpointing.load_tensors_metadata(str(root / "ours" / "iter_0000007")))
    assert keys and not any(k.startswith("optimizer.") for k in keys)
    assert common["mhc_conversion"]["from"] == "upstream-mhc" and common["mhc_conversion"]["expansion_rate"] == 4


def test_round_trip_ours_upstream_ours_is_bit_identical(tmp_path):
    """Ours -> upstream -> ours: every tensor the same bits; the upstream checkpoint holds what the
    helper's own reading of upstream's layout expects (transposed phi, split gates, final norm key)."""
    from megatron.core import dist_checkpointing

    from mhc_megatron.checkpoints.torch_dist import cpu_checkpoint_io

    model = _our_gpt(MHCSettings(mode="mhc", expansion_rate=4))
    with torch.no_grad():  # away from the initial values, so that a swapped gate or slot would show
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    (tmp_path / "a").mkdir()
    with cpu_checkpoint_io():
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path / "a"))
    assert cli(["convert-checkpoint", "--from", "mhc-megatron", "--to", "upstream-mhc", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert cli(["convert-checkpoint", "--from", "upstream-mhc", "--to", "mhc-megatron", str(tmp_path / "b"), str(tmp_path / "c")]) == 0
    a, b, c = _plain(str(tmp_path / "a")), _plain(str(tmp_path / "b")), _plain(str(tmp_path / "c"))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) and a[k].dtype == c[k].dtype for k in a)
    expected = {}
    for k, t in a.items():
        for slot, hc in zip(("input_layernorm", "pre_mlp_layernorm"), HC):
            if k == f"decoder.layers.{slot}.coefficients.phi":
                expected[f"decoder.layers.{hc}.mapping_proj.weight"] = t.transpose(1, 2)
            elif k == f"decoder.layers.{slot}.coefficients.bias":
                expected[f"decoder.layers.{hc}.bias"] = t
            elif k == f"decoder.layers.{slot}.coefficients.alpha":
                expected.update({f"decoder.layers.{hc}.{g}": t[:, i:i + 1] for i, g in enumerate(GATES)})
        if ".coefficients." not in k:
            expected[k.replace("decoder.final_layernorm.norm.", "decoder.final_layernorm.")] = t
    assert b.keys() == expected.keys() and all(torch.equal(b[k], expected[k]) for k in b)
    # and the upstream checkpoint loads strictly into ours again, computing what the original does
    loaded = _load(_our_gpt(MHCSettings(mode="mhc", expansion_rate=4), seed=99), str(tmp_path / "c"))
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    torch.testing.assert_close(_logits(loaded, tokens), _logits(model, tokens), rtol=0, atol=0)


def _save_ours(directory, settings, model_kwargs=None):
    from megatron.core import dist_checkpointing

    from mhc_megatron.checkpoints.torch_dist import cpu_checkpoint_io

    model = _our_gpt(settings) if model_kwargs is None else model_kwargs()
    os.makedirs(directory)
    with cpu_checkpoint_io():
        dist_checkpointing.save(model.sharded_state_dict(), directory)


def _convert(*argv):
    return cli(["convert-checkpoint", *argv])


def test_not_an_mhc_checkpoint_is_named(tmp_path, capsys):
    _save_ours(str(tmp_path / "res"), MHCSettings(mode="residual"))
    assert _convert("--from", "upstream-mhc", "--to", "mhc-megatron", str(tmp_path / "res"), str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "neither an mhc-megatron nor an upstream-mHC checkpoint" in err
    assert "decoder keys such as" in err and "a residual (non-mHC) model" in err
    assert not (tmp_path / "o").exists()


def test_wrong_direction_and_bad_directories_are_named(tmp_path, capsys):
    _save_ours(str(tmp_path / "ours"), MHCSettings(mode="mhc", expansion_rate=2))
    assert _convert("--from", "upstream-mhc", "--to", "mhc-megatron", str(tmp_path / "ours"), str(tmp_path / "o")) == 2
    assert "is an mhc-megatron checkpoint (n = 2), not upstream-mhc: use --from mhc-megatron" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.bin").write_text("x")
    assert _convert("--from", "mhc-megatron", "--to", "upstream-mhc", str(tmp_path / "junk"), str(tmp_path / "o")) == 2
    assert "is not a Megatron distributed checkpoint: no metadata.json" in capsys.readouterr().err
    (tmp_path / "legacy" / "mp_rank_00").mkdir(parents=True)
    assert _convert("--from", "mhc-megatron", "--to", "upstream-mhc", str(tmp_path / "legacy"), str(tmp_path / "o")) == 2
    assert "legacy 'torch' format" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert _convert("--from", "mhc-megatron", "--to", "upstream-mhc", str(tmp_path / "ours"), str(tmp_path / "full")) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_what_upstream_cannot_hold_is_refused(tmp_path, capsys):
    _save_ours(str(tmp_path / "hc"), MHCSettings(mode="hc", expansion_rate=4))
    assert _convert("--from", "mhc-megatron", "--to", "upstream-mhc", str(tmp_path / "hc"), str(tmp_path / "o")) == 2
    assert "it is --residual-mode hc (upstream has mHC only)" in capsys.readouterr().err

    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from mhc_megatron.mcore.attention import SDPACoreAttention
    from mhc_megatron.mcore.hybrid import local_hybrid_stack_spec, mhc_hybrid_stack_spec

    def hybrid():
        spec = mhc_hybrid_stack_spec(local_hybrid_stack_spec(SDPACoreAttention), MHCSettings(mode="mhc"), "*-")
        return HybridModel(tiny_config(num_layers=2), spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                           hybrid_layer_pattern="*-", position_embedding_type="none")

    _save_ours(str(tmp_path / "hybrid"), None, hybrid)
    assert _convert("--from", "mhc-megatron", "--to", "upstream-mhc", str(tmp_path / "hybrid"), str(tmp_path / "o2")) == 2
    assert "it is a HybridModel (upstream Megatron-LM main has no mHC HybridModel layer" in capsys.readouterr().err


def test_command_line_end_to_end(upstream_tp2, tmp_path):
    """The installed entry point: exit 0 and the flags to continue with."""
    _, root = upstream_tp2
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, "-m", "mhc_megatron.cli", "convert-checkpoint", "--from", "upstream-mhc", "--to",
         "mhc-megatron", str(root / "in"), str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "(upstream-mhc, GPT, n = 4, C = 32, 20 Sinkhorn iterations)" in out.stdout
    assert ("continue with: --residual-mode mhc --expansion-rate 4 --mhc-sinkhorn-iters 20 --mhc-sinkhorn-order "
            "rows-first --mhc-norm-eps-placement outside --mhc-dropout per-stream") in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("save_layout,load_layout", [((2, 1), (1, 2)), ((1, 2), (2, 1))], ids=["tp2-to-pp2", "pp2-to-tp2"])
def test_any_layout_on_either_side(tmp_path, save_layout, load_layout):
    """Ours saved at one TP/PP layout -> upstream -> ours, loaded at another layout and saved again:
    every tensor the same bits as saved (compared unsharded through megatron-core)."""
    from checkpoint_workers import load_and_save_at, save_at
    from mcore_helpers import run_distributed

    for name in ("a", "d"):
        (tmp_path / name).mkdir()
    run_distributed(save_at, 2, *save_layout, str(tmp_path / "a"))
    assert _convert("--from", "mhc-megatron", "--to", "upstream-mhc", str(tmp_path / "a"), str(tmp_path / "b")) == 0
    assert _convert("--from", "upstream-mhc", "--to", "mhc-megatron", str(tmp_path / "b"), str(tmp_path / "c")) == 0
    run_distributed(load_and_save_at, 2, *load_layout, str(tmp_path / "c"), str(tmp_path / "d"))
    a, d = _plain(str(tmp_path / "a")), _plain(str(tmp_path / "d"))
    assert a.keys() == d.keys() and len(a) == 20  # embeddings, 16 layer-stacked, final norm, output layer
    assert all(torch.equal(a[k], d[k]) for k in a), [k for k in a if not torch.equal(a[k], d[k])]


def test_json_report(upstream_tp2, tmp_path, capsys):
    import json

    _, root = upstream_tp2
    assert _convert("--from", "upstream-mhc", "--to", "mhc-megatron", str(root / "in"), str(tmp_path / "o"), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["found"]["expansion_rate"] == 4 and report["target"] == "mhc-megatron"
    assert report["converted"] == 20 and "--mhc-sinkhorn-order" in report["continue_flags"]
    assert report["continue_flags"][-2:] == ["--no-load-optim", "--no-load-rng"]
    assert sorted(report["not_carried"]) == ["common:opt_param_scheduler", "optimizer.state.exp_avg.output_layer.weight",
                                             "rng_state/shard_0.0_1.2", "rng_state/shard_0.1_1.2"]
    from mhc_megatron.checkpoints.layouts import FORMATS
    from mhc_megatron.cli.convert_checkpoint_cmd import FORMATS as CLI_FORMATS

    assert CLI_FORMATS == FORMATS
