"""The long-running processes: `catalog ingest`, `worker`, `beat`, and `submit`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from worker.cli.common import cli_settings, ensure_schema, setup_logging, wait_for_database
from worker.cli.preflight import preflight_or_exit
from worker.config import ENV_PREFIX, Settings

log = logging.getLogger("catalog")


@click.command("ingest")
@click.option("--burst", is_flag=True, help="Exit once the stream has nothing new or pending.")
@click.option("--max-events", type=int, default=None, help="Exit after this many entries.")
@click.option("--consumer", default=None, help="Consumer name in the group (default host-pid).")
def ingest_cmd(burst: bool, max_events: int | None, consumer: str | None) -> None:
    """Read listing events from the Redis stream and queue their work.

    Uses a consumer group (CATALOG_EVENTS_STREAM / CATALOG_EVENTS_GROUP); run as many
    `catalog ingest` processes as you like. Invalid events go to CATALOG_DEAD_LETTER_STREAM.
    """
    from worker.intake.ingest import run_ingest

    settings = cli_settings()
    setup_logging(settings)
    preflight_or_exit(settings, runs_models=False)
    _start_ingest_metrics(settings)
    stats = run_ingest(settings, burst=burst, max_events=max_events, consumer=consumer)
    click.echo(f"queued {stats.queued}, dead-lettered {stats.dead_lettered}, reclaimed {stats.reclaimed}, "
               f"dead consumers removed {stats.consumers_removed}")


@click.command("submit")
@click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=True))
def submit_cmd(files: tuple[str, ...]) -> None:
    """Queue events from JSON files (one event per line, or a JSON array; `-` = stdin).

    Works with any broker, including the embedded one, so a local `catalog worker` can be
    fed without Redis. Invalid events are recorded in the dead_letters table.
    """
    from db.session import transaction
    from worker.intake.events import InvalidEvent, parse_event
    from worker.intake.ingest import celery_publisher
    from worker.pipeline.events import record_dead_letter

    settings = cli_settings()
    setup_logging(settings)
    ensure_schema(settings)
    publish = celery_publisher()
    queued = rejected = 0
    for name in files:
        text = sys.stdin.read() if name == "-" else Path(name).read_text()
        items = _submitted_items(name, text.strip())
        for index, item in enumerate(items, start=1):  # numbered as an editor numbers lines
            try:
                event = parse_event(item)
            except InvalidEvent as exc:
                with transaction(settings.effective_database_url) as session:
                    payload = item if isinstance(item, str) else json.dumps(item)
                    record_dead_letter(session, f"{name}#{index}", payload, str(exc))
                click.echo(f"{name}#{index}: rejected: {exc}", err=True)
                rejected += 1
                continue
            publish(event)
            queued += 1
    click.echo(f"queued {queued} event(s), rejected {rejected}")
    if rejected:
        raise SystemExit(1)  # scripts feeding events must notice the rejected ones


def _start_ingest_metrics(settings: Settings) -> None:
    from worker.celery_app import QUEUES
    from worker.observe.service import start_metrics

    start_metrics(settings, "ingest", QUEUES)


def _submitted_items(name: str, stripped: str) -> list[Any]:
    """The events of one file: a JSON array, or one event per line (each parsed, with its
    size and depth limits, by ``parse_event``). An array that cannot be read -- malformed,
    nested too deep for the parser, not a list -- makes the whole file invalid."""
    if not stripped.startswith("["):
        return [line for line in stripped.splitlines() if line.strip()]
    try:
        items = json.loads(stripped)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise click.ClickException(f"{name}: not a valid JSON array of events "
                                   f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(items, list):
        raise click.ClickException(f"{name}: not a JSON array of events")
    return items


def _passthrough(name: str, help_text: str):
    return click.command(
        name,
        help=help_text,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                          "help_option_names": []},
        add_help_option=False,
    )


@_passthrough("worker", """Start a Celery worker; extra arguments go to `celery worker`.

\b
Default queues: ingest,gpu,cpu,train (all): one `catalog worker` on any host, CPU-only
included, does every kind of work. Image analysis travels on the `gpu` queue on every host;
`-Q images` is an alias for it. Where CUDA is visible (and CATALOG_DEVICE is not
cpu) the default pool is `--pool threads --concurrency 8`: one CUDA context, one copy of each
model, concurrent tasks batched together. Typical production split:
  catalog worker -Q ingest,images,cpu --concurrency 4   # CPU-only deployment: events and images
  catalog worker -Q ingest,cpu --concurrency 8          # CPU boxes next to GPU workers
  catalog worker -Q images --pool threads --concurrency 8  # one per GPU: threads share one
                                                        # model copy and feed the dynamic batcher
  catalog worker -Q train --concurrency 1               # retraining
`catalog status` warns about a queue with work and no consumer.
`catalog worker --help` shows Celery's own options.""")
@click.pass_context
def worker_cmd(ctx: click.Context) -> None:
    settings = cli_settings()
    args = list(ctx.args)
    helping = "--help" in args or "-h" in args
    if not helping:  # no log lines in the middle of the help text
        setup_logging(settings)
    if helping:
        click.echo(ctx.command.help)
        click.echo("\nCelery worker options:\n")
    else:
        args = _resolve_queues(args)
        preflight_or_exit(settings, runs_models=_runs_images(args))
        wait_for_database(settings)  # a worker may start before its database
        ensure_schema(settings)
    args = _gpu_pool(settings, args)
    settings = _share_cores(settings, args)
    from worker.celery_app import QUEUES, app

    if not any(a in ("-Q", "--queues") or a.startswith(("-Q", "--queues=")) for a in args):
        args += ["-Q", ",".join(QUEUES)]
    log.info("consuming queues %s", _option_value(args, "-Q", "--queues"))
    if not any(a.startswith(("-l", "--loglevel")) for a in args):
        args += ["--loglevel", settings.log_level]
    if settings.embedded_broker:
        # The filesystem transport has no fan-out: no gossip, mingle or heartbeats. It also
        # forgets a message once a worker took it; every worker's own sweeper (tasks/maintenance)
        # re-queues the images of a dead one. The embedded worker still runs the beat scheduler
        # itself, for the periodic tasks a deployment's `catalog beat` would run.
        args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        if "--no-beat" in args:
            args.remove("--no-beat")
        elif not any(a in ("-B", "--beat") for a in args):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            args += ["--beat", "--schedule", str(settings.data_dir / "beat-schedule")]
    if not helping:
        from worker.observe.service import worker_arguments

        args = worker_arguments(settings, args, QUEUES)  # task events, /metrics, log format in children
    app.worker_main(args if not helping else ["worker", *args])


def _resolve_queues(args: list[str]) -> list[str]:
    """``args`` with the -Q/--queues value expanded (aliases: ``images`` = the gpu queue that
    image analysis travels on, whatever the device) or, without one, every queue; an unknown
    queue name stops start-up (a worker on it would wait for work that never comes)."""
    from worker.celery_app import QUEUES, expand_queues

    value = _option_value(args, "-Q", "--queues")
    try:
        queues = list(QUEUES) if value is None else expand_queues(value)
    except ValueError as exc:
        raise click.ClickException(f"catalog worker --queues {value}: {exc}") from None
    rest, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg in ("-Q", "--queues") and i + 1 < len(args):
            skip = True
        elif not (arg.startswith("--queues=") or (arg.startswith("-Q") and len(arg) > 2)):
            rest.append(arg)
    return [*rest, "-Q", ",".join(queues)]


def _runs_images(args: list[str]) -> bool:
    """Whether the worker consumes a queue that analyses images (gpu, cpu; the default all)."""
    queues = _option_value(args, "-Q", "--queues")
    return queues is None or bool({"gpu", "cpu"} & {q.strip() for q in queues.split(",")})


def _cuda_visible() -> bool:
    # NVML-based check: does not initialise CUDA in this (possibly forking) parent process.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch.cuda.is_available()


def _gpu_pool(settings: Settings, args: list[str], cuda: bool | None = None) -> list[str]:
    """On a GPU, default to one process with a threads pool: prefork would give every child its
    own CUDA context and model copies, and threads are what feed the dynamic batcher."""
    if _option_value(args, "-P", "--pool") is not None or settings.device == "cpu":
        return args
    if not (_cuda_visible() if cuda is None else cuda):
        return args
    extra = ["--pool", "threads"]
    if _option_value(args, "-c", "--concurrency") is None:
        extra += ["--concurrency", str(max(8, settings.batch_max_size or 8))]
    log.info("CUDA visible: using %s (pass --pool to choose otherwise)", " ".join(extra))
    return [*args, *extra]


def _option_value(args: list[str], short: str, long: str) -> str | None:
    for i, arg in enumerate(args):
        if arg in (short, long) and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(long + "="):
            return arg.split("=", 1)[1]
        if arg.startswith(short) and len(arg) > len(short) and not arg.startswith("--"):
            return arg[len(short):]
    return None


def _share_cores(settings: Settings, args: list[str]) -> Settings:
    """Unless CATALOG_TORCH_THREADS is set, give each prefork child cores/concurrency intra-op
    threads: N children each running torch's default (= all cores) oversubscribe the CPU,
    which was 5-15x slower in our benchmarks. A threads pool shares one process: all cores."""
    if settings.torch_threads is not None:
        return settings
    from worker.config import reset_settings

    cores = os.cpu_count() or 1
    pool = _option_value(args, "-P", "--pool") or "prefork"
    concurrency = int(_option_value(args, "-c", "--concurrency") or cores)
    threads = cores if pool in ("threads", "solo") else max(1, cores // max(1, concurrency))
    os.environ[f"{ENV_PREFIX}TORCH_THREADS"] = str(threads)
    reset_settings()
    log.info("torch intra-op threads per worker process: %d (%s pool, concurrency %d, %d cores)",
             threads, pool, concurrency, cores)
    return cli_settings()


@_passthrough("beat", """Start the periodic scheduler: the stale-image sweep, and the retrain of the
learnt models on CATALOG_RETRAIN_SCHEDULE (crontab, UTC; default nightly at 03:00, queue train).
Extra arguments go to `celery beat`. Run exactly one per deployment.""")
@click.pass_context
def beat_cmd(ctx: click.Context) -> None:
    settings = cli_settings()
    setup_logging(settings)
    from worker.celery_app import app

    args = list(ctx.args)
    if "--help" in args or "-h" in args:
        click.echo(ctx.command.help)
        click.echo("\nCelery beat options:\n")
    elif not any(a.startswith(("-s", "--schedule")) for a in args):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        args += ["--schedule", str(settings.data_dir / "beat-schedule")]
    from worker.observe.logs import celery_arguments

    app.start(celery_arguments(settings.log_format, "beat", args))  # the log format in Celery's loggers
