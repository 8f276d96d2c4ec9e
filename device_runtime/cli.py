"""Command line of the device runtime (stdlib argparse; runs on the phone).

    python -m fedblocks.device_runtime run JOB.json
    python fedblocks-runtime.pyz run JOB.json
    python -m fedblocks.device_runtime build-pyz OUT.pyz
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedblocks-runtime",
                                     description="fedblocks device runtime: train one stage, write a result bundle")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    run = sub.add_parser("run", help="run JOB.json and write its result bundle (exit 0 ok, 1 failed/oom_killed, "
                                     "4 no bundle could be written)")
    run.add_argument("job", type=Path)
    pyz = sub.add_parser("build-pyz", help="build the single-file runtime (fedblocks-runtime.pyz)")
    pyz.add_argument("out", type=Path)
    train = sub.add_parser("_train")  # internal: the supervised training child
    train.add_argument("plan")
    train.add_argument("staging")
    args = parser.parse_args(argv)

    if args.command == "run":
        import signal

        from .runner import run_job

        def terminated(signum: int, _frame: object) -> None:
            # SIGTERM (e.g. the testbed cancelling a job): unwind so the training child is killed
            # and the staging directory removed; no bundle is written for a cancelled job.
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, terminated)
        return run_job(args.job)
    if args.command == "build-pyz":
        from .pyz import build_runtime_pyz

        try:
            print(build_runtime_pyz(args.out))
        except OSError as exc:
            print(f"fedblocks-runtime: error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 4
        return 0
    from .trainer import child_main

    return child_main(args.plan, args.staging)
