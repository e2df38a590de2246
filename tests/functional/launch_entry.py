"""What the functional tests launch (through torchrun, or as one plain process): the CPU shim,
a gloo process group, then ``mhc-pretrain-gpt``'s own ``main`` with the command line.

``--no-mhc-hooks`` as the first argument runs the plain-Megatron reference entry instead
(:mod:`plain_megatron_gpt`, no hook of ours installed). ``MHC_TEST_NODE_TRACE=DIR`` writes, per
rank, the order in which megatron-core's schedule nodes and the DualPipeV units ran
(:func:`trace_schedule_nodes`). The ``__main__`` guard matters: the
torch_dist checkpoint writer starts processes that import this module again.
"""

import os
import sys


def trace_schedule_nodes(directory: str) -> None:
    """Log every schedule-node pass (``F``/``B``, node name, chunk), every DualPipeV unit and send to
    ``DIR/rank<N>.txt``, in the order they run (test instrumentation, this process only)."""
    from megatron.core.pipeline_parallel.utils import ScheduleNode

    from mhc_megatron.pipeline.dualpipev import DualPipeV

    path = os.path.join(directory, f"rank{os.environ.get('RANK', '0')}.txt")
    os.makedirs(directory, exist_ok=True)

    def log(line):
        with open(path, "a") as f:
            f.write(line + "\n")

    def traced(method, kind):
        def run(node, *args, **kwargs):
            state = getattr(node, "chunk_state", None)
            log(f"{kind} {node.name} vp{getattr(getattr(state, 'model', None), 'vp_stage', '?')}")
            return method(node, *args, **kwargs)
        return run

    ScheduleNode.forward = traced(ScheduleNode.forward, "F")
    ScheduleNode.backward = traced(ScheduleNode.backward, "B")
    run_unit = DualPipeV._run

    def unit(runner, ops):
        log("unit " + " ".join(f"{op}{'&' if op.paired else ''}" for op in ops))
        return run_unit(runner, ops)

    DualPipeV._run = unit
    isend = DualPipeV._isend

    def sent(runner, m, tensor):
        log(f"send {m.kind} {m.stage}.{m.microbatch}")
        return isend(runner, m, tensor)

    DualPipeV._isend = sent


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cpu_shim

    cpu_shim.install()
    if os.environ.get("MHC_TEST_NODE_TRACE"):
        trace_schedule_nodes(os.environ["MHC_TEST_NODE_TRACE"])
    import torch.distributed as dist

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", os.environ.get("MHC_TEST_PORT", "29511"))
    dist.init_process_group("gloo")
    argv = sys.argv[1:]
    try:
        if argv and argv[0] == "--no-mhc-hooks":
            import plain_megatron_gpt

            return plain_megatron_gpt.main(argv[1:])
        from mhc_megatron.training.launcher import main as launcher_main

        return launcher_main(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
