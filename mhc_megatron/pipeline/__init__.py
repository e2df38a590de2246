"""Pipeline schedules: per-rank programs, their simulator, and the DualPipeV runtime."""

from .program import SCHEDULES, Op, placement, program
from .simulator import simulate

__all__ = ["SCHEDULES", "Op", "placement", "program", "simulate"]
