"""The launches of the functional matrix, and a scheduler that runs the ones a test session needs.

Each launch is named; tests ask for launches by name (``@uses(...)``), and the module fixture runs
exactly the launches the selected tests need, plus those they depend on (an initial checkpoint
before the runs that start from it), two CPU cores' worth at a time.

Why initial checkpoints: Megatron seeds each pipeline rank differently (``seed + 100 * pp_rank``)
and tensor/expert-parallel layouts draw their shards in another order, so two layouts of one model
start from different weights. Every layout comparison therefore starts from one checkpoint written
by a single-process launch that takes one step at learning rate 0 (weights unchanged), loaded with
``--finetune`` (weights only, iteration 0): Megatron's distributed checkpoint reshards it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from harness import TINY_GPT, Run, launch

MHC = ["--residual-mode", "mhc", "--expansion-rate", "4"]
MOE_MLA = [
    "--num-experts", "4", "--moe-router-topk", "2", "--disable-bias-linear",  # megatron-core's local
    # experts with biases fail in backward at TP=1 (an in-place add on a view), in residual mode too
    "--multi-latent-attention", "--kv-lora-rank", "32", "--q-lora-rank", "32", "--qk-head-dim", "16",
    "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16", "--position-embedding-type", "rope",
]
EP_OVERLAP_BASE = ["--num-experts", "4", "--moe-router-topk", "2", "--disable-bias-linear", "--bf16",
                   "--moe-token-dispatcher-type", "alltoall", "--expert-model-parallel-size", "2"]
HYBRID = ["--hybrid-layer-pattern", "*-*-*-*-", "--num-layers", "8", "--position-embedding-type", "none"]
INIT_STEP = ["--lr", "0", "--min-lr", "0", "--train-iters", "1", "--save-interval", "1"]  # + --save DIR


@dataclass
class Launch:
    name: str
    argv: list[str]
    nproc: int = 1
    needs: tuple[str, ...] = ()  # launches whose checkpoints this one reads
    saves: bool = False  # writes a checkpoint under its own directory (``{ckpt:NAME}``)
    env: dict = field(default_factory=dict)


def _launches() -> list[Launch]:
    L = Launch
    tp2 = ["--tensor-model-parallel-size", "2"]
    pp2 = ["--pipeline-model-parallel-size", "2"]
    pp4 = ["--pipeline-model-parallel-size", "4"]
    dualpipev = ["--pipeline-schedule", "dualpipev"]
    L8 = ["--num-layers", "8", "--micro-batch-size", "1"]
    untied = ["--untie-embeddings-and-output-weights"]
    from_init = lambda name: ["--load", f"{{ckpt:{name}}}", "--finetune"]  # noqa: E731
    save4 = ["--save", "{ckpt:self}", "--save-interval", "4", "--ckpt-format", "torch_dist"]
    return [
        # 1. residual mode = Megatron unchanged
        L("plain", ["--no-mhc-hooks"]),
        L("residual", ["--residual-mode", "residual", *save4], saves=True),
        # 2. the reference curves (8: they also log the mHC diagnostics; 7: mhc saves at 4)
        L("mhc", [*MHC, "--mhc-log-interval", "2", *save4], saves=True),
        L("hc", ["--residual-mode", "hc", "--expansion-rate", "4", "--mhc-log-interval", "2"]),
        # 3. parallel layouts of the mhc model, from its initial weights
        L("mhc_init", [*MHC, *INIT_STEP, "--save", "{ckpt:self}"], saves=True),
        L("mhc_tp2", [*MHC, *tp2, *from_init("mhc_init"), *save4], nproc=2, needs=("mhc_init",), saves=True),
        L("mhc_tp2_sp", [*MHC, *tp2, "--sequence-parallel", *from_init("mhc_init")], nproc=2, needs=("mhc_init",)),
        L("mhc_pp2", [*MHC, *pp2, *from_init("mhc_init")], nproc=2, needs=("mhc_init",)),
        L("mhc_pp2_vpp2", [*MHC, *pp2, "--num-virtual-stages-per-pipeline-rank", "2", *from_init("mhc_init")],
          nproc=2, needs=("mhc_init",)),
        L("mhc_untied", [*MHC, *untied]),
        L("mhc_untied_init", [*MHC, *untied, *INIT_STEP, "--save", "{ckpt:self}"], saves=True),
        L("mhc_dualpipev", [*MHC, *untied, *pp2, "--pipeline-schedule", "dualpipev", *from_init("mhc_untied_init")],
          nproc=2, needs=("mhc_untied_init",)),
        # DualPipeV at PP=4 and with mHC recompute against 1F1B and one process (8 layers: 2P stages;
        # micro-batch 1: at least 2P micro-batches per step)
        L("mhc8_init", [*MHC, *untied, *L8, *INIT_STEP, "--save", "{ckpt:self}"], saves=True),
        L("mhc8", [*MHC, *untied, *L8, *from_init("mhc8_init")], needs=("mhc8_init",)),
        L("mhc8_1f1b_pp4", [*MHC, *untied, *L8, *pp4, *from_init("mhc8_init")], nproc=4, needs=("mhc8_init",)),
        L("mhc8_dualpipev_pp4", [*MHC, *untied, *L8, *pp4, *dualpipev, *from_init("mhc8_init")],
          nproc=4, needs=("mhc8_init",)),
        L("mhc8_dualpipev_pp2_recompute", [*MHC, *untied, *L8, *pp2, *dualpipev, "--mhc-recompute",
                                           *from_init("mhc8_init")], nproc=2, needs=("mhc8_init",)),
        # 4. MoE + MLA across expert-parallel sizes
        L("moe_init", [*MHC, *MOE_MLA, *INIT_STEP, "--save", "{ckpt:self}"], saves=True),
        L("moe_ep1", [*MHC, *MOE_MLA, *from_init("moe_init")], needs=("moe_init",)),
        L("moe_ep2", [*MHC, *MOE_MLA, "--expert-model-parallel-size", "2", *from_init("moe_init")],
          nproc=2, needs=("moe_init",)),
        # ... and through DualPipeV (PP=2 x EP=2: four ranks)
        L("moe_untied_init", [*MHC, *MOE_MLA, *untied, *INIT_STEP, "--save", "{ckpt:self}"], saves=True),
        L("moe_untied", [*MHC, *MOE_MLA, *untied, *from_init("moe_untied_init")], needs=("moe_untied_init",)),
        L("moe_dualpipev_pp2_ep2", [*MHC, *MOE_MLA, *untied, *pp2, *dualpipev, "--expert-model-parallel-size", "2",
                                    "--micro-batch-size", "1", *from_init("moe_untied_init")],
          nproc=4, needs=("moe_untied_init",)),
        # 4. megatron-core's expert-parallel overlap (combined 1F1B; it needs bf16 and the alltoall dispatcher)
        L("moe_ep2_bf16", [*MHC, *EP_OVERLAP_BASE], nproc=2),
        L("moe_ep2_bf16_overlap", [*MHC, *EP_OVERLAP_BASE, "--overlap-moe-expert-parallel-comm"], nproc=2),
        # ... and DualPipeV's F&B pairs through it (PP=2 x EP=2), tracing the schedule nodes' order
        L("moe_dualpipev_bf16", [*MHC, *EP_OVERLAP_BASE, *untied, *pp2, *dualpipev, "--micro-batch-size", "1"], nproc=4),
        L("moe_dualpipev_bf16_overlap", [*MHC, *EP_OVERLAP_BASE, *untied, *pp2, *dualpipev, "--micro-batch-size", "1",
                                         "--overlap-moe-expert-parallel-comm"], nproc=4,
          env={"MHC_TEST_NODE_TRACE": "{ckpt:self}/trace"}),
        # 5. mHC recompute
        L("mhc_recompute_auto", [*MHC, "--mhc-recompute"]),
        L("mhc_recompute_3", [*MHC, "--mhc-recompute", "--mhc-recompute-block-size", "3"]),
        # 6. HybridModel (and its pipeline), multi-token prediction
        L("hybrid_init", [*MHC, *HYBRID, *INIT_STEP, "--save", "{ckpt:self}"], saves=True),
        L("hybrid", [*MHC, *HYBRID, *from_init("hybrid_init")], needs=("hybrid_init",)),
        L("hybrid_pp2", [*MHC, *HYBRID[:1], "*-*-|*-*-", *HYBRID[2:], *pp2, *from_init("hybrid_init")],
          nproc=2, needs=("hybrid_init",)),
        L("rope", [*MHC, "--position-embedding-type", "rope"]),
        L("mtp", [*MHC, "--position-embedding-type", "rope", "--mtp-num-layers", "1"]),
        # 7. resumes
        L("mhc_resume", [*MHC, "--load", "{ckpt:mhc}", "--ckpt-step", "4"], needs=("mhc",)),
        L("residual_resume", ["--residual-mode", "residual", "--load", "{ckpt:residual}", "--ckpt-step", "4"],
          needs=("residual",)),
        L("tp2_to_tp1_resume", [*MHC, "--load", "{ckpt:mhc_tp2}", "--ckpt-step", "4"], needs=("mhc_tp2",)),
        # 9. bf16: checkpoints of both mixed-precision optimizers (a resume of the distributed one
        # needs apex or transformer-engine in megatron-core 0.19, residual mode too: GPU images only)
        L("mhc_bf16", [*MHC, "--bf16", *save4], saves=True),
        L("mhc_bf16_resume", [*MHC, "--bf16", "--load", "{ckpt:mhc_bf16}", "--ckpt-step", "4"], needs=("mhc_bf16",)),
        L("mhc_bf16_distopt", [*MHC, "--bf16", "--use-distributed-optimizer", *save4], saves=True),
    ]


LAUNCHES = {launch_.name: launch_ for launch_ in _launches()}
CORES = 2


def uses(*names: str):
    """Mark a test with the launches it reads (the fixture runs them before the test)."""
    import pytest

    unknown = [n for n in names if n not in LAUNCHES]
    if unknown:
        raise KeyError(f"unknown launches {unknown}")
    return pytest.mark.launches(*names)


class Matrix:
    """Runs launches on demand, each once per session; ``run(name)`` waits for its result."""

    def __init__(self, root: str):
        self.root = root
        self.results: dict[str, Run] = {}
        self._futures: dict = {}
        self._lock = threading.Lock()
        self._free_cores = CORES
        self._cores = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=2 * CORES)  # waiting on a dependency holds no core

    def ckpt(self, name: str) -> str:
        return os.path.join(self.root, "ckpt", name)

    def start(self, names) -> None:
        for name in self._with_needs(names):
            self._submit(name)

    def run(self, name: str) -> Run:
        self._submit(name)
        return self._futures[name].result()

    def _with_needs(self, names) -> list[str]:
        ordered: list[str] = []

        def visit(n):
            for dep in LAUNCHES[n].needs:
                visit(dep)
            if n not in ordered:
                ordered.append(n)

        for n in names:
            visit(n)
        return ordered

    def _submit(self, name: str) -> None:
        with self._lock:
            self._submit_locked(name)

    def _submit_locked(self, name: str) -> None:
        # dependencies are submitted first, so a launch waiting for one never holds up its start
        if name in self._futures:
            return
        for dep in LAUNCHES[name].needs:
            self._submit_locked(dep)
        self._futures[name] = self._pool.submit(self._execute, name)

    def _execute(self, name: str) -> Run:
        spec = LAUNCHES[name]
        for dep in spec.needs:
            result = self._futures[dep].result()
            if result.returncode != 0:
                return Run(spec.argv, -2, f"[matrix] not run: {dep} failed (rc {result.returncode})")
        argv = [a.replace("{ckpt:self}", self.ckpt(name)) for a in spec.argv]
        for other in LAUNCHES:
            argv = [a.replace(f"{{ckpt:{other}}}", self.ckpt(other)) for a in argv]
        no_hooks = argv[:1] == ["--no-mhc-hooks"]
        full = (["--no-mhc-hooks"] if no_hooks else []) + TINY_GPT + (argv[1:] if no_hooks else argv)
        units = min(spec.nproc, CORES)
        with self._cores:  # all of a launch's cores at once (two half-started launches would wait forever)
            self._cores.wait_for(lambda: self._free_cores >= units)
            self._free_cores -= units
        try:
            env = {k: v.replace("{ckpt:self}", self.ckpt(name)) for k, v in spec.env.items()}
            return launch(full, spec.nproc, tensorboard_dir=os.path.join(self.root, "tb", name), env=env)
        finally:
            with self._cores:
                self._free_cores += units
                self._cores.notify_all()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
