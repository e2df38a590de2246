"""Runs ``mhc-pretrain-gpt``'s ``main`` on each command line of a JSON file and reports, per case,
its exit code, what it printed, whether Megatron got as far as setting its global arguments
(it must not: a refusal decided by the command line comes before Megatron validates or prints),
and the function that decided the refusal (``module.qualname`` of the innermost frame of the first
ValueError in the chain, so a check whose message a caller rewrites is still named).

    python refusal_worker.py CASES.json RESULTS.json
"""

import contextlib
import io
import json
import os
import sys


def raise_site(err: BaseException) -> str:
    while isinstance(err.__context__, ValueError):  # a rewritten message: the check is where it began
        err = err.__context__
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{tb.tb_frame.f_globals['__name__']}.{code.co_qualname.split('.<locals>')[0]}"


def main(cases_path: str, results_path: str) -> int:
    import megatron.training.global_vars as global_vars

    import mhc_megatron.training.launcher as launcher

    sites = []
    launch = launcher._launch

    def traced_launch(*args, **kwargs):  # test code only: note where the refusal was raised
        try:
            return launch(*args, **kwargs)
        except ValueError as err:
            sites.append(raise_site(err))
            raise

    launcher._launch = traced_launch
    launcher_main = launcher.main
    results = []
    for case in json.load(open(cases_path)):
        os.environ.update(WORLD_SIZE=str(case.get("world_size", 1)), RANK="0", LOCAL_RANK="0")
        global_vars._GLOBAL_ARGS = None
        sites.clear()
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = launcher_main(case["argv"])
            except SystemExit as exit_:
                rc = exit_.code
            except BaseException as exc:  # a refusal must be a clean exit, not a traceback
                rc = f"raised {type(exc).__name__}: {exc}"
        results.append({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(),
                        "megatron_args_set": global_vars._GLOBAL_ARGS is not None,
                        "raised_in": sites[0] if sites else None})
    json.dump(results, open(results_path, "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
