"""Runs ``mhc-pretrain-gpt``'s ``main`` on each command line of a JSON file and reports, per case,
its exit code, what it printed, and whether Megatron got as far as setting its global arguments
(it must not: a refusal decided by the command line comes before Megatron validates or prints).

    python refusal_worker.py CASES.json RESULTS.json
"""

import contextlib
import io
import json
import os
import sys


def main(cases_path: str, results_path: str) -> int:
    import megatron.training.global_vars as global_vars

    from mhc_megatron.training.launcher import main as launcher_main

    results = []
    for case in json.load(open(cases_path)):
        os.environ.update(WORLD_SIZE=str(case.get("world_size", 1)), RANK="0", LOCAL_RANK="0")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = launcher_main(case["argv"])
            except SystemExit as exit_:
                rc = exit_.code
            except BaseException as exc:  # a refusal must be a clean exit, not a traceback
                rc = f"raised {type(exc).__name__}: {exc}"
        results.append({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(),
                        "megatron_args_set": global_vars._GLOBAL_ARGS is not None})
    json.dump(results, open(results_path, "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
