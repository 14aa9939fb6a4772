"""The ``trapline`` command. Each sub-module registers its commands on the app."""

from __future__ import annotations

import typer

from trapline.cli import (
    demo_cmd,
    doctor_cmd,
    image_cmd,
    job_cmd,
    pipelines_cmd,
    server_cmd,
    token_cmd,
    worker_cmd,
)

app = typer.Typer(
    name="trapline",
    help="Run ML jobs over camera-trap images on pull-based workers; every image accounted for.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for module in (
    server_cmd,
    worker_cmd,
    job_cmd,
    image_cmd,
    token_cmd,
    pipelines_cmd,
    demo_cmd,
    doctor_cmd,
):
    module.register(app)


if __name__ == "__main__":  # pragma: no cover
    app()
