"""`catalog api`: the review service (HTTP API, OpenAPI, web review pages) on this database."""

from __future__ import annotations

from pathlib import Path

import click

from worker.cli.common import allow_local, cli_settings, ensure_schema, setup_logging
from worker.cli.preflight import preflight_or_exit


@click.command("api")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--secure-cookies/--no-secure-cookies", default=None,
              help="Mark the login cookie Secure [default: when the request came over https].")
@click.option("--proxy-headers", is_flag=True,
              help="Trust X-Forwarded-For/-Proto from --forwarded-allow-ips (behind a TLS proxy).")
@click.option("--forwarded-allow-ips", default="127.0.0.1", show_default=True)
@click.option("--photos", "photo_dirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Also show photos read from this directory (besides CATALOG_FETCH_ALLOW_DIRS); "
              "repeatable. The embedded database adds <data_dir>/demo-photos when it exists.")
def api_cmd(host: str, port: int, secure_cookies: bool | None, proxy_headers: bool,
            forwarded_allow_ips: str, photo_dirs: tuple[str, ...]) -> None:
    """Serve the HTTP API and the review pages.

    \b
    API:     http://HOST:PORT/api/v1/...   (bearer token: catalog users token NAME)
    Schema:  http://HOST:PORT/openapi.json and /docs
    Review:  http://HOST:PORT/review       (log in: catalog users add NAME --role reviewer)
    Probes:  /healthz, /readyz
    Set CATALOG_API_SECRET (32+ random bytes) so that logins survive restarts and are shared
    by several service processes.
    """
    import uvicorn

    from worker.api.app import create_app

    settings = cli_settings()
    setup_logging(settings)
    preflight_or_exit(settings, runs_models=False)
    ensure_schema(settings)
    dirs = [str(Path(d).resolve()) for d in photo_dirs]
    demo = settings.data_dir / "demo-photos"
    if settings.database_url is None and demo.is_dir():  # `catalog demo` wrote its photos there
        dirs.append(str(demo.resolve()))
    settings = allow_local(settings, dirs)
    app = create_app(settings, secure_cookies=secure_cookies)
    from uvicorn.config import LOGGING_CONFIG

    # JSON logs: uvicorn configures no handlers of its own, its lines go through the root logger.
    log_config = None if settings.log_format == "json" else LOGGING_CONFIG
    uvicorn.run(app, host=host, port=port, proxy_headers=proxy_headers,
                forwarded_allow_ips=forwarded_allow_ips, log_level=settings.log_level.lower(),
                log_config=log_config)
