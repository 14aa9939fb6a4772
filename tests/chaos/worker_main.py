"""A worker subprocess running the test pipelines: ``python -m tests.chaos.worker_main``.

The same in-process entry point as ``trapline worker`` (``run_worker`` with
signal handling; exit code from the report), with :mod:`tests.chaos.pipelines`
as the pipeline factory, since test pipelines are not installed entry points.
Settings other than the flags come from ``TRAPLINE_*`` variables as usual.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from tests.chaos.pipelines import ONE_BOX, factory
from trapline.cli.logs import configure_logging
from trapline.errors import TraplineError
from trapline.settings import WorkerSettings
from trapline.worker import run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.worker_main")
    parser.add_argument("--server", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--pipeline", default=ONE_BOX)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--service-name", default="chaos-worker")
    parser.add_argument("--drain", action="store_true")
    parser.add_argument("--compute-s", type=float, default=0.0, help="sleep per batch")
    parser.add_argument("--fail-ids", default="", help="comma-separated image ids to fail")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, rich=False)
    settings = WorkerSettings(
        server_url=args.server,
        token=args.token,
        batch_size=args.batch_size,
        state_dir=args.state_dir,
        service_name=args.service_name,
    )
    fail_ids = frozenset(i for i in args.fail_ids.split(",") if i)
    try:
        report = asyncio.run(
            run_worker(
                settings,
                [args.pipeline],
                drain=args.drain,
                handle_signals=True,
                pipeline_factory=factory(args.compute_s, fail_ids),
            )
        )
    except TraplineError as exc:
        logging.getLogger(__name__).error("%s", exc)
        return 2
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
