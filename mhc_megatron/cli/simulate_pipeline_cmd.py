"""``mhc-megatron simulate-pipeline``: bubbles, exposed communication and memory of a schedule."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "simulate-pipeline",
        help="simulate a pipeline schedule: bubble, exposed communication, peak activations",
        description=(
            "Discrete-event simulation of one training step of a pipeline schedule, running the same "
            "per-rank programs as the DualPipeV runtime. Costs are in units of one forward pass of one "
            "stage (layers / pp) on one micro-batch; a backward pass (input and weight gradients) costs two; "
            "a stage-to-stage message costs comm-ratio x expansion-rate units (the n-stream tensor is n "
            "times the residual's). 1F1B and interleaved are modelled as Megatron runs them without "
            "--overlap-p2p-communication: each send goes out with the next receive and the schedule waits for "
            "both, so a sender waits until its message is delivered; DualPipeV sends asynchronously. Peak "
            "activations are per rank, in micro-batches x stage (1F1B's unit)."
        ),
    )
    p.add_argument("--schedule", choices=("1f1b", "interleaved", "dualpipev"), required=True, help="the schedule")
    p.add_argument("--pp", type=int, required=True, help="pipeline ranks P")
    p.add_argument("--microbatches", type=int, required=True, help="micro-batches per step M")
    p.add_argument("--expansion-rate", type=int, default=4, help="residual streams n (default %(default)s)")
    p.add_argument("--comm-ratio", type=float, default=0.1,
                   help="residual stage-tensor send time / forward time of a stage (default %(default)s)")
    p.add_argument("--vpp", type=int, default=2, help="virtual stages per rank for interleaved (default %(default)s)")
    p.add_argument("--a2a-ratio", type=float, default=0.0,
                   help="MoE expert-parallel all-to-all time of a pass / its compute (default %(default)s: none)")
    p.add_argument("--overlap-pairs", action="store_true",
                   help="DualPipeV only: run each F&B pair as one overlapped unit, as the runtime does under "
                        "--overlap-moe-expert-parallel-comm (one pass's all-to-alls hidden by the other's compute)")
    p.add_argument("--out", metavar="PNG", help="draw the timeline to this PNG file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..pipeline.simulator import simulate

    sim = simulate(args.schedule, args.pp, args.microbatches, expansion_rate=args.expansion_rate,
                   comm_ratio=args.comm_ratio, virtual_stages=args.vpp,
                   a2a_ratio=args.a2a_ratio, overlap_pairs=args.overlap_pairs)
    summary = sim.summary()
    if args.out:
        from ..pipeline.timeline import draw_timeline

        draw_timeline(sim, args.out)
        summary["timeline"] = args.out
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{args.schedule}: PP={args.pp}, {args.microbatches} micro-batches, n={args.expansion_rate}, "
          f"comm ratio {args.comm_ratio} (one n-stream message = {args.comm_ratio * args.expansion_rate:g} F)")
    print(f"step time {summary['step_time']:g} F, bubble {summary['bubble_fraction']:.1%}, "
          f"exposed communication {summary['exposed_comm_fraction']:.1%}\n")
    print(f"{'rank':>4}{'busy':>9}{'idle':>9}{'comm wait':>11}{'peak act.':>11}")
    for rank in range(args.pp):
        events = [e for e in sim.events if e.rank == rank]
        busy = sum(e.end - e.start for e in events)
        wait = sum(e.comm_wait for e in events)
        print(f"{rank:>4}{busy:>9.2f}{sim.makespan - busy:>9.2f}{wait:>11.2f}{sim.peak_activations[rank]:>11.2f}")
    if args.out:
        print(f"\ntimeline: {args.out}")
    return 0
