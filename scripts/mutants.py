"""One-line mutations of the core modules, each of which the test suite must catch.

For each mutation: replace one line in the working tree, run the tests that guard that module,
put the line back, and report whether the tests failed (caught) or passed (a survivor).
Run with ``./scripts/mutants.sh`` (all) or ``./scripts/mutants.sh sinkhorn-columns`` (by name).
Exit code 1 if any mutation survives. Refuses to run on a file with uncommitted changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments that must fail


MUTANTS = (
    Mutant("sinkhorn-columns", "mhc_megatron/ops/sinkhorn.py",
           "p = p / p.sum(dim=-2, keepdim=True)  # columns", "p = p / p.sum(dim=-1, keepdim=True)  # columns",
           ("tests/test_sinkhorn.py",)),
    Mutant("sinkhorn-backward-axis", "mhc_megatron/ops/sinkhorn.py",
           "dim = -1 if t % 2 else -2", "dim = -2 if t % 2 else -1", ("tests/test_sinkhorn.py",)),
    Mutant("coefficients-post-scale", "mhc_megatron/ops/coefficients.py",
           "h_post = 2.0 * torch.sigmoid(", "h_post = 1.0 * torch.sigmoid(", ("tests/test_coefficients.py",)),
    Mutant("post-res-transposed-h-res", "mhc_megatron/ops/streams.py",
           'mixed = torch.einsum("...ij,...jc->...ic", h_res.to(dt), x.to(dt))\n    out = ',
           'mixed = torch.einsum("...ji,...jc->...ic", h_res.to(dt), x.to(dt))\n    out = ',
           ("tests/test_streams.py",)),
    Mutant("pre-mix-weights-reversed", "mhc_megatron/ops/streams.py",
           'torch.einsum("...n,...nc->...c", h_pre.to(dt), x.to(dt))',
           'torch.einsum("...n,...nc->...c", h_pre.flip(-1).to(dt), x.to(dt))', ("tests/test_streams.py",)),
    Mutant("dualpipev-no-solo-pair", "mhc_megatron/pipeline/program.py",
           "solo = i == 0 and rank == ranks - 1", "solo = False",
           ("tests/test_dualpipev.py", "tests/test_pipeline_programs.py")),
    Mutant("dualpipev-steady-state-order", "mhc_megatron/pipeline/program.py",
           "for _ in range(rank + 1):  # 2. forwards of both chunks",
           "for _ in range(rank + 2):  # 2. forwards of both chunks",
           ("tests/test_dualpipev.py", "tests/test_pipeline_programs.py")),
    Mutant("dualpipev-two-way-channels", "mhc_megatron/pipeline/dualpipev.py",
           "return f\"{kind}-{'down' if dst > src else 'up'}\"", "return kind",
           ("tests/test_nccl_replay.py",)),
    Mutant("post-res-stream-joins-at-once", "mhc_megatron/mcore/streams.py",
           "    if defer_join:\n        _PENDING[_storage(out)] = STREAMS.record_event(side)",
           "    if False:\n        _PENDING[_storage(out)] = STREAMS.record_event(side)",
           ("tests/test_post_res_stream.py",)),
    Mutant("recompute-rebuild-from-block-input", "mhc_megatron/mcore/recompute.py",
           "x = self.replays[p](x)", "x = self.replays[p](self.x[start])", ("tests/test_recompute.py",)),
    Mutant("recompute-keeps-one-use", "mhc_megatron/mcore/recompute.py",
           "self.uses[position] = self.uses.get(position, 0) + 1", "self.uses[position] = 1",
           ("tests/test_recompute.py",)),
)


def dirty(path: str) -> bool:
    return bool(subprocess.run(["git", "status", "--porcelain", "--", path], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip())


def run(m: Mutant) -> tuple[bool, float]:
    full = os.path.join(ROOT, m.path)
    original = open(full).read()
    if original.count(m.old) != 1:
        raise SystemExit(f"mutant {m.name}: its line occurs {original.count(m.old)} times in {m.path} (want 1): update MUTANTS")
    if dirty(m.path):
        raise SystemExit(f"mutant {m.name}: {m.path} has uncommitted changes; commit or stash them first")
    start = time.time()
    try:
        open(full, "w").write(original.replace(m.old, m.new))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore",
                               *m.tests], cwd=ROOT, capture_output=True, text=True)
    finally:
        open(full, "w").write(original)
    return proc.returncode != 0, time.time() - start


def main(names: list[str]) -> int:
    chosen = [m for m in MUTANTS if not names or m.name in names]
    unknown = set(names) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutant(s) {sorted(unknown)}; known: {[m.name for m in MUTANTS]}")
    survivors = []
    print(f"{'mutant':36} {'module':34} {'result':8} seconds")
    for m in chosen:
        caught, seconds = run(m)
        print(f"{m.name:36} {m.path:34} {'caught' if caught else 'SURVIVED':8} {seconds:6.0f}", flush=True)
        if not caught:
            survivors.append(m.name)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} caught" + (f"; survivors: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
