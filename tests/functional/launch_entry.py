"""What the functional tests launch (through torchrun, or as one plain process): the CPU shim,
a gloo process group, then ``mhc-pretrain-gpt``'s own ``main`` with the command line.

``--no-mhc-hooks`` as the first argument runs the plain-Megatron reference entry instead
(:mod:`plain_megatron_gpt`, no hook of ours installed). The ``__main__`` guard matters: the
torch_dist checkpoint writer starts processes that import this module again.
"""

import os
import sys


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cpu_shim

    cpu_shim.install()
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
