import sys


def pytest_terminal_summary(terminalreporter):
    """After the run: the worst loss difference of every real-loop comparison that ran."""
    module = sys.modules.get("test_real_loop")
    worst = getattr(module, "WORST", None)
    if worst:
        terminalreporter.section("real-loop matrix: worst |d lm loss| per comparison")
        for (name, reference), value in sorted(worst.items()):
            terminalreporter.write_line(f"{name:<22} vs {reference:<12} {value:.3g}")
