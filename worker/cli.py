"""`catalog`: the one command-line entry point for every process of the system."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import click

from worker.config import ENV_PREFIX, ConfigError, Settings, get_settings

log = logging.getLogger("catalog")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if settings.log_level != "DEBUG":
        # Migration chatter and kombu's note about the host-less filesystem URL are noise here.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("kombu.connection").setLevel(logging.ERROR)


def _settings() -> Settings:
    from worker.pipeline import validate_steps

    try:
        settings = get_settings()
        validate_steps(settings.steps)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:  # an unknown step name
        raise click.ClickException(f"{ENV_PREFIX}STEPS: {exc}") from None
    return settings


def _ensure_schema(settings: Settings) -> None:
    """The embedded SQLite database migrates itself; Postgres is migrated by an operator
    (`catalog db upgrade`) so that many workers never race to change a production schema."""
    from db.migrate import current_revision, head_revision, upgrade

    url = settings.effective_database_url
    current, head = current_revision(url), head_revision(url)
    if current == head:
        return
    if url.startswith("sqlite"):
        log.info("migrating embedded database %s to %s", url, head)
        upgrade(url)
        return
    raise click.ClickException(
        f"database schema is at {current or 'nothing'}, this code needs {head}: run `catalog db upgrade`"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="catalog-worker")
def main() -> None:
    """catalog-worker: analyse e-commerce listing photos from events.

    \b
    Embedded mode (default, no servers):  catalog process ./photos   or   catalog demo
    Production:  CATALOG_DATABASE_URL=postgresql+psycopg2://...  CATALOG_BROKER_URL=redis://...
                 catalog db upgrade; catalog ingest; catalog worker; catalog beat

    Every setting is an environment variable with the CATALOG_ prefix: see `catalog config`.
    """


# --------------------------------------------------------------------------- config / db
@main.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def config_cmd(as_json: bool) -> None:
    """Show every setting, its environment variable and its effective value."""
    settings = _settings()
    rows = []
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        rows.append((f"{ENV_PREFIX}{name.upper()}", value, field.description or ""))
    derived = {
        "database": settings.effective_database_url,
        "broker": settings.effective_broker_url,
        "redis (events)": settings.effective_redis_url,
        "artifacts": str(settings.effective_artifact_dir),
    }
    if as_json:
        click.echo(json.dumps({"settings": {k: str(v) for k, v, _ in rows}, "effective": derived}, indent=2))
        return
    for env, value, desc in rows:
        click.echo(f"{env:34} = {value!s:40} {desc}")
    click.echo("\neffective:")
    for key, value in derived.items():
        click.echo(f"  {key:15} {value}")


@main.group("db")
def db_group() -> None:
    """Database schema (Alembic migrations; the only way the schema changes)."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION. Safe to run repeatedly and from several hosts at once
    (Postgres: an advisory lock serialises concurrent runs)."""
    from db.migrate import current_revision, upgrade

    settings = _settings()
    _setup_logging(settings)
    url = settings.effective_database_url
    before = current_revision(url)
    upgrade(url, revision)
    after = current_revision(url)
    if before == after:
        click.echo(f"database already at {after}")
    else:
        click.echo(f"database migrated from {before or 'empty'} to {after}")


@db_group.command("current")
def db_current() -> None:
    """Print the schema revision of the database and the one this code expects."""
    from db.migrate import current_revision, head_revision

    url = _settings().effective_database_url
    click.echo(f"database: {current_revision(url) or 'empty'}\ncode:     {head_revision(url)}")


@db_group.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION (e.g. `base` drops everything)."""
    from db.migrate import downgrade

    downgrade(_settings().effective_database_url, revision)
    click.echo(f"downgraded to {revision}")


# --------------------------------------------------------------------------- services
@main.command("ingest")
@click.option("--burst", is_flag=True, help="Exit once the stream has nothing new or pending.")
@click.option("--max-events", type=int, default=None, help="Exit after this many entries.")
@click.option("--consumer", default=None, help="Consumer name in the group (default host-pid).")
def ingest_cmd(burst: bool, max_events: int | None, consumer: str | None) -> None:
    """Read listing events from the Redis stream and queue their work.

    Uses a consumer group (CATALOG_EVENTS_STREAM / CATALOG_EVENTS_GROUP); run as many
    `catalog ingest` processes as you like. Invalid events go to CATALOG_DEAD_LETTER_STREAM.
    """
    from worker.ingest import run_ingest

    settings = _settings()
    _setup_logging(settings)
    stats = run_ingest(settings, burst=burst, max_events=max_events, consumer=consumer)
    click.echo(f"queued {stats.queued}, dead-lettered {stats.dead_lettered}, reclaimed {stats.reclaimed}")


@main.command("submit")
@click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=True))
def submit_cmd(files: tuple[str, ...]) -> None:
    """Queue events from JSON files (one event per line, or a JSON array; `-` = stdin).

    Works with any broker, including the embedded one, so a local `catalog worker` can be
    fed without Redis. Invalid events are recorded in the dead_letters table.
    """
    from db.session import transaction
    from worker.events import InvalidEvent, parse_event
    from worker.ingest import celery_publisher
    from worker.processing import record_dead_letter

    settings = _settings()
    _setup_logging(settings)
    _ensure_schema(settings)
    publish = celery_publisher()
    queued = rejected = 0
    for name in files:
        text = sys.stdin.read() if name == "-" else Path(name).read_text()
        stripped = text.strip()
        items = json.loads(stripped) if stripped.startswith("[") else [
            line for line in stripped.splitlines() if line.strip()
        ]
        for index, item in enumerate(items):
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


@main.command("events-schema")
def events_schema_cmd() -> None:
    """Print the JSON Schema of listing events (docs/events.schema.json)."""
    from worker.events import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


def _passthrough(name: str, help_text: str):  # noqa: ANN202
    return main.command(
        name,
        help=help_text,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                          "help_option_names": []},
        add_help_option=False,
    )


@_passthrough("worker", """Start a Celery worker; extra arguments go to `celery worker`.

\b
Default queues: ingest,gpu,cpu,train (all). Where CUDA is visible (and CATALOG_DEVICE is not
cpu) the default pool is `--pool threads --concurrency 8`: one CUDA context, one copy of each
model, concurrent tasks batched together. Typical production split:
  catalog worker -Q ingest,cpu --concurrency 8          # CPU boxes
  catalog worker -Q gpu --pool threads --concurrency 8  # one per GPU: threads share one model
                                                        # copy and feed the dynamic batcher
  catalog worker -Q train --concurrency 1               # retraining
`catalog worker --help` shows Celery's own options.""")
@click.pass_context
def worker_cmd(ctx: click.Context) -> None:
    settings = _settings()
    _setup_logging(settings)
    args = list(ctx.args)
    if "--help" in args or "-h" in args:
        click.echo(ctx.command.help)
        click.echo("\nCelery worker options:\n")
    else:
        _ensure_schema(settings)
    args = _gpu_pool(settings, args)
    settings = _share_cores(settings, args)
    from worker.celery_app import QUEUES, app

    if not any(a in ("-Q", "--queues") or a.startswith(("-Q", "--queues=")) for a in args):
        args += ["-Q", ",".join(QUEUES)]
    if not any(a.startswith(("-l", "--loglevel")) for a in args):
        args += ["--loglevel", settings.log_level]
    if settings.embedded_broker:
        # The filesystem transport has no fan-out: no gossip, mingle or heartbeats. It also
        # forgets a message once a worker took it, so the embedded worker runs the beat
        # scheduler itself: its stale-image sweep re-queues work lost with a dead worker.
        args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        if "--no-beat" in args:
            args.remove("--no-beat")
        elif not any(a in ("-B", "--beat") for a in args):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            args += ["--beat", "--schedule", str(settings.data_dir / "beat-schedule")]
    app.worker_main(["worker", *args])


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
    return _settings()


@_passthrough("beat", """Start the periodic scheduler (stale-image sweeper, and the retrain
schedule once it exists); extra arguments go to `celery beat`. Run exactly one per deployment.""")
@click.pass_context
def beat_cmd(ctx: click.Context) -> None:
    settings = _settings()
    _setup_logging(settings)
    from worker.celery_app import app

    args = list(ctx.args)
    if "--help" in args or "-h" in args:
        click.echo(ctx.command.help)
        click.echo("\nCelery beat options:\n")
    elif not any(a.startswith(("-s", "--schedule")) for a in args):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        args += ["--schedule", str(settings.data_dir / "beat-schedule")]
    app.start(["beat", *args])


# --------------------------------------------------------------------------- in-process
def _collect_images(paths: tuple[str, ...]) -> list[str]:
    refs: list[str] = []
    for raw in paths:
        if raw.startswith(("http://", "https://", "file://")):
            refs.append(raw)
            continue
        path = Path(raw).expanduser().resolve()
        if path.is_dir():
            refs.extend(str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            refs.append(str(path))
        else:
            raise click.BadParameter(f"{raw} does not exist", param_hint="IMAGE_OR_DIR")
    if not refs:
        raise click.BadParameter("no images found (looked for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    return refs


def run_in_process(settings: Settings, refs: list[str], seller: str, category: str | None,
                   listing_id: str | None, title: str = "", progress: bool = True) -> str:
    """Run the whole pipeline here, without a broker: apply an event, analyse each image."""
    from db.session import session_factory
    from worker.events import ListingEvent
    from worker.pipeline import validate_steps
    from worker.processing import analyze_image, apply_event

    validate_steps(settings.steps)
    external_id = listing_id or "local-" + hashlib.sha256("\n".join(refs).encode()).hexdigest()[:16]
    event = ListingEvent.model_validate({
        "event_id": f"local-{uuid.uuid4()}",
        "type": "listing.updated",
        "occurred_at": datetime.now(timezone.utc).isoformat(),
        "listing": {"id": external_id, "seller_id": seller, "title": title, "category": category,
                    "images": refs},
    })
    factory = session_factory(settings.effective_database_url)
    with factory() as session, session.begin():
        outcome = apply_event(session, event)
    show = progress and sys.stderr.isatty()
    from tqdm import tqdm

    for image_id in tqdm(outcome.images_to_analyze, desc="images", unit="img", disable=not show):
        with factory() as session:
            result = analyze_image(session, image_id, settings, max_attempts=settings.max_attempts)
        if not show:
            log.info("image %s: %s %s", image_id, result.status, result.detail)
    return external_id


@main.command("process")
@click.argument("paths", nargs=-1, required=True)
@click.option("--seller", default="local", show_default=True, help="Seller id stored on the listing.")
@click.option("--category", default=None, help="Category the seller claimed.")
@click.option("--listing-id", default=None, help="Listing id (default: derived from the paths).")
@click.option("--title", default="", help="Listing title.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored results as JSON.")
def process_cmd(paths: tuple[str, ...], seller: str, category: str | None, listing_id: str | None,
                title: str, as_json: bool) -> None:
    """Run the whole pipeline in this process on IMAGE_OR_DIR... (files, folders, URLs).

    Uses the configured database (default: embedded SQLite under .catalog/) and needs no
    broker. Running it again on unchanged files re-checks their bytes and keeps the results.
    """
    from worker.report import listing_report, render_report

    settings = _settings()
    _setup_logging(settings)
    _ensure_schema(settings)
    refs = _collect_images(paths)
    external_id = run_in_process(settings, refs, seller, category, listing_id, title)
    report = listing_report(settings, external_id)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render_report(report))


@main.command("show")
@click.argument("listing_id")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def show_cmd(listing_id: str, as_json: bool) -> None:
    """Show what is stored for a listing (by the platform's listing id)."""
    from worker.report import listing_report, render_report

    settings = _settings()
    _ensure_schema(settings)
    try:
        report = listing_report(settings, listing_id)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render_report(report))


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def status_cmd(as_json: bool) -> None:
    """Backlog and health: listings and images by status, failures by code, open flags by kind,
    queue depths and the event stream's pending entries and lag."""
    from worker.status import broker_status, database_status, render

    settings = _settings()
    _ensure_schema(settings)
    status = database_status(settings)
    try:
        status.update(broker_status(settings))
    except Exception as exc:  # noqa: BLE001 - still show the database side
        status["broker_error"] = f"{type(exc).__name__}: {exc}"
    click.echo(json.dumps(status, indent=2) if as_json else render(status))


@main.command("demo")
@click.option("--json", "as_json", is_flag=True, help="Print the stored results as JSON.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write the demo photos (default <data_dir>/demo-photos).")
def demo_cmd(as_json: bool, out: Path | None) -> None:
    """Process a few real photos that ship inside installed packages and show the results."""
    from worker.demo import run_demo

    settings = _settings()
    _setup_logging(settings)
    _ensure_schema(settings)
    run_demo(settings, out or settings.data_dir / "demo-photos", as_json=as_json, echo=click.echo)


def _register_optional_groups() -> None:
    """Command groups contributed by capability modules (flags queue, models, training)."""
    import importlib

    for module, attr in (("worker.cli_flags", "flags"), ("worker.cli_models", "models"),
                         ("worker.cli_train", "train")):
        try:
            group = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        main.add_command(group)


_register_optional_groups()

if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
