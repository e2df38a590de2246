"""``python -m mhc_megatron.bench.stream_trace``: does the MLP post+residual kernel run on its own
stream, beside other work?

Trains a few steps of a small mHC GPT on one GPU with the high-priority post+res stream
(``--mhc-post-res-stream``) under ``torch.profiler``, exports the Chrome trace and reads it back:
on which CUDA streams the post+res forward kernels ran, and how much of their time overlapped
kernels running on another stream. GPU only; the trace analysis itself is plain Python.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

POST_RES_KERNEL = "_post_res_fwd_kernel"


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def stream_overlap(trace: dict, kernel: str = POST_RES_KERNEL) -> dict:
    """From a Chrome trace (``torch.profiler``'s ``export_chrome_trace``): the streams ``kernel``
    ran on, its launches and time there, and the part of that time during which a kernel of
    another stream ran (microseconds)."""
    kernels = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e]
    mine = [e for e in kernels if kernel in e.get("name", "")]
    streams = sorted({e["args"]["stream"] for e in mine})
    busy = 0.0
    overlapped = 0.0
    for s in streams:
        own = [(e["ts"], e["ts"] + e["dur"]) for e in mine if e["args"]["stream"] == s]
        others = _merge([(e["ts"], e["ts"] + e["dur"]) for e in kernels if e["args"]["stream"] != s])
        for start, end in own:
            busy += end - start
            overlapped += sum(max(0.0, min(end, b) - max(start, a)) for a, b in others)
    all_streams = sorted({e["args"]["stream"] for e in kernels})
    return {"kernel": kernel, "launches": len(mine), "kernel_streams": streams, "all_streams": all_streams,
            "busy_us": round(busy, 3), "overlapped_us": round(overlapped, 3),
            "overlapped_fraction": round(overlapped / busy, 4) if busy else 0.0}


def run(steps: int, out_dir: str) -> dict:
    import torch

    from ..demo.data import VOCAB_SIZE, ByteBatches
    from ..demo.model import build_demo_model, init_single_process
    from ..mcore import MHCSettings

    device = torch.device("cuda")
    init_single_process(device)
    settings = MHCSettings(mode="mhc", expansion_rate=4, post_res_stream=True)
    model = build_demo_model(settings, layers=4, hidden=1024, heads=8, seq_len=1024, vocab_size=VOCAB_SIZE,
                             seed=0, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = ByteBatches(1024, 4, 0)

    def step():
        tokens, labels = (t.to(device) for t in data.next_train())
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        loss = model(tokens, positions, None, labels=labels).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: Triton compiles, allocator settles
        step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "post_res_stream_trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        report = stream_overlap(json.load(f))
    report.update(device=torch.cuda.get_device_name(), steps=steps, trace=path)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mhc_megatron.bench.stream_trace", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="profiled training steps (default %(default)s)")
    p.add_argument("--out", default=None, help="directory for the Chrome trace (default: a temporary one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the post+res stream is a CUDA stream; on CPU the kernel runs inline)")
    report = run(args.steps, args.out or tempfile.mkdtemp(prefix="mhc-stream-trace-"))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['device']}: {report['launches']} post+res forward launches on stream(s) "
          f"{report['kernel_streams']} of {report['all_streams']}; {report['busy_us']:.0f} us, of which "
          f"{report['overlapped_us']:.0f} us ({report['overlapped_fraction']:.0%}) beside another stream's kernels")
    print(f"trace: {report['trace']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
