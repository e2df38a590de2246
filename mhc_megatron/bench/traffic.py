"""Memory traffic and launches of one mHC sublayer, forward + backward, counted on CPU.

Builds the product's own sublayer modules (the norm-slot :class:`MHCSublayerInput` and the
bias-dropout-add-slot :class:`MHCSublayerOutput`, Triton kernels) around an opaque sublayer
function F, runs forward and backward under :class:`~.memcount.TrafficCounter` and reports, per
kernel and per sublayer, the bytes every launch loads and stores and the number of launches.
F (the norm, attention or MLP) is excluded: a residual model moves the same bytes for it.

Per token and per call: each configuration runs at T and 2T tokens; the bytes that grow with the
token count, ``(B(2T) - B(T)) / T``, are the per-token traffic, and ``2 B(T) - B(2T)`` is what every
call moves whatever its size (the projection ``phi``, parameter gradients and their partial sums),
which a large micro-batch amortises. With ``recompute`` the sublayers run as one recompute block
of ``block_size`` sublayers; its figures are per sublayer (the block's divided by its size), and the
extra over the plain sublayer is the cost of recomputing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch

from .memcount import Launch, TrafficCounter

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KIB = 1024


@dataclass(frozen=True)
class TrafficConfig:
    tokens: int = 64
    hidden: int = 4096
    n: int = 4
    dtype: str = "bf16"
    recompute: bool = False
    block_size: int = 5
    bias: bool = False  # the sublayer's output bias (Megatron's add_bias_linear)
    dropout: float = 0.0  # hidden dropout (Megatron's GPT default: 0.1)
    fused_bda: bool = True  # Megatron's bias_dropout_fusion
    sinkhorn_iters: int = 20
    bandwidth_gbps: float = 4800.0  # H200 SXM peak HBM3e bandwidth, for the estimate only
    estimate_tokens: int = 16384
    sms: int = 132  # SMs the launch heuristics assume (an H200's): they set the token splits

    def validate(self) -> None:
        from ..kernels import SUPPORTED_STREAMS

        if self.tokens < 1 or self.tokens % 32:
            raise ValueError(f"--tokens must be a positive multiple of 32 (the token blocks), got {self.tokens}")
        if self.hidden < 1:
            raise ValueError(f"--hidden must be >= 1, got {self.hidden}")
        if self.n not in SUPPORTED_STREAMS:
            raise ValueError(f"--expansion-rate must be one of {SUPPORTED_STREAMS} (the kernels' n), got {self.n}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {self.block_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.sms < 1:
            raise ValueError(f"--sms must be >= 1, got {self.sms}")
        if self.bandwidth_gbps <= 0:
            raise ValueError(f"--bandwidth-gbps must be > 0, got {self.bandwidth_gbps}")

    @property
    def act_bytes(self) -> int:
        return torch.empty(0, dtype=DTYPES[self.dtype]).element_size()


def floors(n: int, C: int, act: int) -> dict:
    """Bytes per token and sublayer that the activation traffic cannot go below (docs/kernels.md).

    Paper (unfused): coefficients read nC; pre reads nC, writes C; post+res reads (3n+1)C, writes
    3nC. Practical floors with fused kernels: forward (4n+2)C (coefficients nC, pre (n+1)C,
    post+res (2n+1)C), backward (9n+3)C (post+res (3n+2)C, pre (3n+1)C with the x gradient
    accumulated in place, coefficients 3nC likewise); coefficient floats (a few hundred bytes) aside.
    """
    return {
        "paper_unfused_forward": (n + (n + 1) + (3 * n + 1) + 3 * n) * C * act,
        "forward": (4 * n + 2) * C * act,
        "backward": (9 * n + 3) * C * act,
        "recompute_per_replay": (2 * n + 1) * C * act,
    }


class _IdentityNorm(torch.nn.Module):
    """The inner norm belongs to F (a residual model has it too): nothing here."""

    def __init__(self, config=None, hidden_size=None, eps=None):
        super().__init__()

    def forward(self, x):
        return x


class _OpaqueF(torch.autograd.Function):
    """The sublayer function F (attention or MLP): its launches are not counted."""

    @staticmethod
    def forward(ctx, y, counter):
        ctx.counter = counter
        with counter.paused():
            return y.clone()

    @staticmethod
    def backward(ctx, g):
        with ctx.counter.paused():
            return g.clone(), None


def _modules(cfg: TrafficConfig, count: int, recompute: bool):
    from megatron.core.transformer.spec_utils import build_module

    from ..mcore import MHCSettings
    from ..mcore.portable import portable_config
    from ..mcore.recompute import BlockRecompute
    from ..mcore.specs import sublayer_input_spec, sublayer_output_spec

    config = portable_config(
        num_layers=1, hidden_size=cfg.hidden, num_attention_heads=1, hidden_dropout=cfg.dropout,
        bias_dropout_fusion=cfg.fused_bda,
    )
    settings = MHCSettings(mode="mhc", expansion_rate=cfg.n, backend="triton", sinkhorn_iters=cfg.sinkhorn_iters,
                           recompute=recompute, recompute_block_size=count)
    block = BlockRecompute(block_index=0, size=count, first_sublayer=0) if recompute else None
    layers = []
    for p in range(count):
        inp = sublayer_input_spec(_IdentityNorm, settings, p, False, (block, p) if recompute else None)
        layers.append((inp(config=config, hidden_size=cfg.hidden, eps=1e-5),
                       build_module(sublayer_output_spec(settings), config=config)))
    return config, layers


def run_once(cfg: TrafficConfig, tokens: int, count: int, recompute: bool) -> list[Launch]:
    """One forward + backward through ``count`` sublayers; the launches, counted."""
    from ..kernels import interpreter_sms

    with interpreter_sms(cfg.sms):
        return _run_once(cfg, tokens, count, recompute)


def _run_once(cfg: TrafficConfig, tokens: int, count: int, recompute: bool) -> list[Launch]:
    gen = torch.Generator().manual_seed(0)
    config, layers = _modules(cfg, count, recompute)
    dt = DTYPES[cfg.dtype]
    C, n = cfg.hidden, cfg.n
    x0 = torch.randn(tokens, 1, n * C, generator=gen).to(dt).requires_grad_()
    # each sublayer's own output bias (Megatron's linear bias, in the model dtype)
    biases = [torch.nn.Parameter(0.1 * torch.randn(C, generator=gen).to(dt)) if cfg.bias else None for _ in layers]
    g_out = torch.randn(tokens, 1, n * C, generator=gen).to(dt)
    with TrafficCounter() as counter:
        with counter.phase("forward"):
            h = x0
            for (inp, out), bias in zip(layers, biases):
                normed, residual = inp(h)
                f = _OpaqueF.apply(normed, counter)
                h = out(training=True, fused=config.bias_dropout_fusion)((f, bias), residual, config.hidden_dropout)
        with counter.phase("backward"):
            h.backward(g_out)
    return counter.launches


def _group(launches: list[Launch]) -> "OrderedDict[tuple[str, str], list[Launch]]":
    groups: OrderedDict[tuple[str, str], list[Launch]] = OrderedDict()
    for launch in launches:
        groups.setdefault((launch.phase, launch.name), []).append(launch)
    return groups


def _per_token(small: list[Launch], big: list[Launch], tokens: int, per: int) -> list[dict]:
    """Per kernel (phase, name): launches and bytes per token / per call, per sublayer."""
    a, b = _group(small), _group(big)
    if list(a) != list(b) or any(len(a[k]) != len(b[k]) for k in a):
        raise ValueError(
            "the launches at T and 2T tokens differ (at this width the projection backward splits the tokens "
            "into more parts as T grows); use more --tokens or fewer --sms"
        )
    rows = []
    fields = ("read_unique", "write_unique", "read_requested", "write_requested")
    for key, runs in a.items():
        sa = {f: sum(getattr(x, f) for x in runs) for f in fields}
        sb = {f: sum(getattr(x, f) for x in b[key]) for f in fields}
        row = {"phase": key[0], "name": key[1], "kind": runs[0].kind, "launches": len(runs) / per}
        for f in fields:
            row[f"{f}_per_token"] = (sb[f] - sa[f]) / tokens / per
            row[f"{f}_per_call"] = (2 * sa[f] - sb[f]) / per
        args = OrderedDict()
        for launch_a, launch_b in zip(runs, b[key]):
            for name, t in launch_a.args.items():
                tb = launch_b.args.get(name)
                acc = args.setdefault(name, {"read_per_token": 0.0, "write_per_token": 0.0})
                acc["read_per_token"] += ((tb.read_unique if tb else 0) - t.read_unique) / tokens / per
                acc["write_per_token"] += ((tb.write_unique if tb else 0) - t.write_unique) / tokens / per
        row["args"] = dict(args)
        rows.append(row)
    return rows


def _totals(rows: list[dict], phase: str) -> dict:
    sel = [r for r in rows if r["phase"] == phase]
    return {
        "bytes_per_token": sum(r["read_unique_per_token"] + r["write_unique_per_token"] for r in sel),
        "requested_bytes_per_token": sum(r["read_requested_per_token"] + r["write_requested_per_token"] for r in sel),
        "bytes_per_call": sum(r["read_unique_per_call"] + r["write_unique_per_call"] for r in sel),
        "launches": sum(r["launches"] for r in sel),
        "triton_launches": sum(r["launches"] for r in sel if r["kind"] == "triton"),
        "torch_launches": sum(r["launches"] for r in sel if r["kind"] == "torch"),
    }


def measure(cfg: TrafficConfig) -> dict:
    """The report ``bench traffic`` prints (its ``--json`` object)."""
    cfg.validate()
    T = cfg.tokens
    plain = _per_token(run_once(cfg, T, 1, False), run_once(cfg, 2 * T, 1, False), T, 1)
    fwd, bwd = _totals(plain, "forward"), _totals(plain, "backward")
    report = {
        "config": asdict(cfg),
        "forward_bytes_per_token": fwd["bytes_per_token"],
        "backward_bytes_per_token": bwd["bytes_per_token"],
        "forward_requested_bytes_per_token": fwd["requested_bytes_per_token"],
        "backward_requested_bytes_per_token": bwd["requested_bytes_per_token"],
        "forward_bytes_per_call": fwd["bytes_per_call"],
        "backward_bytes_per_call": bwd["bytes_per_call"],
        "launches_forward": fwd["launches"],
        "launches_backward": bwd["launches"],
        "triton_launches": {"forward": fwd["triton_launches"], "backward": bwd["triton_launches"]},
        "torch_launches": {"forward": fwd["torch_launches"], "backward": bwd["torch_launches"]},
        "recompute_extra_bytes_per_token": 0.0,
        "floors_bytes_per_token": floors(cfg.n, cfg.hidden, cfg.act_bytes),
        "kernels": plain,
    }
    if cfg.recompute:
        L = cfg.block_size
        rc = _per_token(run_once(cfg, T, L, True), run_once(cfg, 2 * T, L, True), T, L)
        rf, rb = _totals(rc, "forward"), _totals(rc, "backward")
        report["recompute"] = {
            "block_size": L,
            "forward_bytes_per_token": rf["bytes_per_token"],
            "backward_bytes_per_token": rb["bytes_per_token"],
            "launches_forward": rf["launches"],
            "launches_backward": rb["launches"],
            "kernels": rc,
        }
        report["recompute_extra_bytes_per_token"] = (
            rf["bytes_per_token"] + rb["bytes_per_token"] - fwd["bytes_per_token"] - bwd["bytes_per_token"]
        )
        report["floors_bytes_per_token"]["recompute"] = (
            (L - 1) / L * report["floors_bytes_per_token"]["recompute_per_replay"]
        )
    total = report["forward_bytes_per_token"] + report["backward_bytes_per_token"]
    report["estimate"] = {
        "what": "an estimate, not a measurement: counted bytes / bandwidth",
        "bandwidth_gbps": cfg.bandwidth_gbps,
        "tokens": cfg.estimate_tokens,
        "forward_us": report["forward_bytes_per_token"] * cfg.estimate_tokens / cfg.bandwidth_gbps / 1e3,
        "backward_us": report["backward_bytes_per_token"] * cfg.estimate_tokens / cfg.bandwidth_gbps / 1e3,
        "recompute_extra_us": report["recompute_extra_bytes_per_token"] * cfg.estimate_tokens / cfg.bandwidth_gbps / 1e3,
        "fwd_bwd_us": total * cfg.estimate_tokens / cfg.bandwidth_gbps / 1e3,
    }
    return report


def _kib(b: float) -> str:
    return f"{b / KIB:.1f}"


def _kernel_table(rows: list[dict], title: str) -> list[str]:
    lines = [title, f"{'phase':<9}{'launch':<30}{'x':>5}{'read':>9}{'write':>9}{'unique':>9}{'requested':>11}{'per call':>10}"]
    for r in rows:
        uniq = r["read_unique_per_token"] + r["write_unique_per_token"]
        req = r["read_requested_per_token"] + r["write_requested_per_token"]
        call = r["read_unique_per_call"] + r["write_unique_per_call"]
        lines.append(
            f"{r['phase']:<9}{r['name']:<30}{r['launches']:>5g}{_kib(r['read_unique_per_token']):>9}"
            f"{_kib(r['write_unique_per_token']):>9}{_kib(uniq):>9}{_kib(req):>11}{_kib(call):>10}"
        )
    lines.append("(KiB per token and sublayer, unique = compulsory bytes; requested = every lane of every program; "
                 "per call = KiB per call that do not grow with the tokens)")
    return lines


def format_report(r: dict) -> str:
    c = r["config"]
    f = r["floors_bytes_per_token"]
    head = (f"mHC sublayer, n = {c['n']}, C = {c['hidden']}, {c['dtype']} streams, fp32 coefficients, "
            f"t_max = {c['sinkhorn_iters']}; bias {'on' if c['bias'] else 'off'}, dropout {c['dropout']}"
            f"{' (fused bias-dropout-add)' if c['fused_bda'] and (c['bias'] or c['dropout']) else ''}; "
            f"counted at {c['tokens']} and {2 * c['tokens']} tokens in Triton's interpreter")
    lines = [head, ""]
    lines += _kernel_table(r["kernels"], "per launch (one sublayer)")
    lines += ["", f"{'sublayer':<22}{'KiB/token':>10}{'floor':>8}{'x floor':>9}{'requested':>11}{'launches':>10}"]
    for phase, floor in (("forward", f["forward"]), ("backward", f["backward"])):
        b = r[f"{phase}_bytes_per_token"]
        lines.append(f"{phase:<22}{_kib(b):>10}{_kib(floor):>8}{b / floor:>9.2f}"
                     f"{_kib(r[f'{phase}_requested_bytes_per_token']):>11}{r[f'launches_{phase}']:>10g}")
    tot = r["forward_bytes_per_token"] + r["backward_bytes_per_token"]
    floor = f["forward"] + f["backward"]
    lines.append(f"{'forward + backward':<22}{_kib(tot):>10}{_kib(floor):>8}{tot / floor:>9.2f}{'':>11}"
                 f"{r['launches_forward'] + r['launches_backward']:>10g}")
    lines.append(f"paper Table 2 unfused forward: {_kib(f['paper_unfused_forward'])} KiB/token; per call (not per "
                 f"token): forward {_kib(r['forward_bytes_per_call'])} KiB, backward {_kib(r['backward_bytes_per_call'])} KiB")
    if "recompute" in r:
        rc = r["recompute"]
        lines += ["", *_kernel_table(rc["kernels"], f"with recompute, block of {rc['block_size']} sublayers (per sublayer)")]
        lines.append(
            f"recompute extra: {_kib(r['recompute_extra_bytes_per_token'])} KiB/token/sublayer (floor "
            f"{_kib(f['recompute'])}: one post+res replay per sublayer but the block's last); launches "
            f"{rc['launches_forward']:g} fwd / {rc['launches_backward']:g} bwd per sublayer"
        )
    e = r["estimate"]
    lines += ["", f"H200 time ESTIMATE (counted bytes / {e['bandwidth_gbps']:.0f} GB/s, not measured), "
                  f"{e['tokens']} tokens: forward {e['forward_us']:.1f} us, backward {e['backward_us']:.1f} us"
                  + (f", recompute extra {e['recompute_extra_us']:.1f} us" if "recompute" in r else "")
                  + " per sublayer"]
    return "\n".join(lines)
