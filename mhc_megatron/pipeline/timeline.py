"""Draw a simulated schedule: one row per rank, forwards and backwards coloured."""

from __future__ import annotations

from .simulator import Simulation

_COLOURS = {"F": "#4c72b0", "B": "#55a868"}


def draw_timeline(sim: Simulation, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8.0, sim.makespan / 3), 0.6 * sim.num_ranks + 1.4))
    for e in sim.events:
        y = sim.num_ranks - 1 - e.rank
        ax.broken_barh([(e.start, e.end - e.start)], (y - 0.4, 0.8), facecolors=_COLOURS[e.op.kind],
                       edgecolor="white", linewidth=0.5)
        if e.end - e.start >= 0.3:
            ax.text((e.start + e.end) / 2, y, str(e.op.microbatch), ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(sim.num_ranks), [f"rank {r}" for r in reversed(range(sim.num_ranks))])
    ax.set_xlabel("time (forward of one stage = 1)")
    s = sim.summary()
    ax.set_title(f"{sim.schedule}, PP={sim.num_ranks}, {sim.microbatches} micro-batches, n={sim.expansion_rate}, "
                 f"comm ratio {sim.comm_ratio}: bubble {s['bubble_fraction']:.1%}, "
                 f"exposed comm {s['exposed_comm_fraction']:.1%}", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLOURS.values()]
    ax.legend(handles, ["forward", "backward"], loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
