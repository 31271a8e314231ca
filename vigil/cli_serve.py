"""`vigil serve` (the REST API under uvicorn) and `vigil tokens create|list|revoke` (its bearer tokens).

Mount with ``vigil.cli_serve.mount(app)``. Token plaintext is printed once, at creation; the store keeps its SHA-256
only (``vigil.auth``), and `tokens list` shows names, roles and dates — never a hash.
"""

from __future__ import annotations

import getpass
import logging
from typing import Annotated

import typer
from rich.table import Table

from vigil import auth
from vigil.cli_common import ConfigOpt, JsonOpt, StoreOpt, console, err, existing_store, print_json, store_url
from vigil.settings import DEFAULT_CONFIG, load_settings
from vigil.store import ROLES, session_factory, upgrade

tokens_app = typer.Typer(help="Bearer tokens for the REST API (shown once; stored hashed).", no_args_is_help=True)

ByOpt = Annotated[str, typer.Option("--by", help="Who issues or revokes the token (recorded in the audit log); "
                                                "default: your login name.")]


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except OSError:  # no login name in some containers
        return "vigil-cli"


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on (loopback by default; put TLS in front).")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    config: ConfigOpt = DEFAULT_CONFIG,
    store: StoreOpt = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the REST API (OpenAPI docs at /docs): alerts, tickets, audit verify; bearer tokens with roles; /metrics;
    the FHIR subscription endpoints of ``fhir-subscription`` sources (resources forwarded to Kafka for `vigil run`).
    With receivers under ``routing:``, also delivers the notification outbox (retries, escalation).
    Refuses to start (exit 2) if a subscription source has no ``secret_env`` (see
    ``ingest.subscription.check_authentication``)."""
    import uvicorn
    from fastapi import Depends

    from ingest.subscription import SubscriptionConfig, check_authentication
    from vigil import notify, ticket_feed
    from vigil.api import create_app, require
    from vigil.auth import Permission
    from vigil.observability import JsonFormatter, metrics_router
    from vigil.webhook import SubscriptionForwarder

    settings = load_settings(config, store_url=store)
    hooks = [src for src in settings.sources if isinstance(src, SubscriptionConfig)]
    if refused := [reason for src in hooks if (reason := check_authentication(src))]:
        for reason in refused:
            err.print(f"[red]error[/]: {config}: {reason}", highlight=False)
        raise typer.Exit(2)
    for src in hooks:
        if src.allow_unauthenticated and not src.secret_env:
            err.print(f"[yellow]warning[/]: {config}: source {src.name!r} accepts notifications without a secret "
                      "(allow_unauthenticated: true) — for local testing only")
    url = settings.store_url
    upgrade(url)
    scheduler = feed_worker = None
    forwarders: list = []
    if settings.routing.receivers:
        notify.notify_on_transitions(settings.routing)
        scheduler = notify.start_scheduler(session_factory(url), settings.routing)
    if settings.ticket_feed is not None:
        ticket_feed.publish_ticket_events(settings.ticket_feed)
        feed_worker = ticket_feed.FeedWorker(session_factory(url), settings.ticket_feed)
    console.print(f"vigil API on http://{host}:{port} (docs at /docs), store {url}"
                  + (f", notifying {len(settings.routing.receivers)} receivers" if scheduler else ""))
    try:
        metrics = metrics_router(url, dependencies=[Depends(require(Permission.READ_ALERTS))])
        forwarders += [SubscriptionForwarder(src) for src in hooks]
        routers = [metrics, *(f.router() for f in forwarders)]
        json_logs = any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
        uvicorn.run(create_app(url, extra_routers=routers, settings=settings), host=host, port=port,
                    log_level=log_level, log_config=None if json_logs else uvicorn.config.LOGGING_CONFIG)
    finally:
        if scheduler is not None:
            scheduler.shutdown()
        if feed_worker is not None:
            feed_worker.shutdown()
        for forwarder in forwarders:
            forwarder.close()


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="Who holds the token (person or service); it is the audit actor.")],
    role: Annotated[str, typer.Option(help=f"One of: {', '.join(ROLES)}.")],
    by: ByOpt = "",
    store: StoreOpt = None,
    json: JsonOpt = False,
) -> None:
    """Issue a token and print it once: it cannot be shown again (only its hash is stored)."""
    url = store_url(store)
    upgrade(url)
    sessions = session_factory(url)
    try:
        with sessions() as s, s.begin():
            token = auth.create_token(s, name, role, actor=by or _default_actor())
    except auth.TokenError as exc:
        raise typer.BadParameter(str(exc), param_hint="NAME / --role") from None
    finally:
        sessions.kw["bind"].dispose()
    if json:
        print_json({"name": name, "role": role, "token": token})
        return
    console.print(f"token for [bold]{name}[/] ({role}) — shown only now, store it in a secret manager:")
    console.print(token, markup=False, highlight=False, soft_wrap=True)


@tokens_app.command("list")
def tokens_list(store: StoreOpt = None, json: JsonOpt = False) -> None:
    """Every token issued: name, role, created, revoked (never the token or its hash)."""
    url = existing_store(store)
    upgrade(url)
    sessions = session_factory(url)
    try:
        with sessions() as s:
            rows = [{"name": t.name, "role": t.role, "created_at": t.created_at.isoformat(),
                     "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None} for t in auth.list_tokens(s)]
    finally:
        sessions.kw["bind"].dispose()
    if json:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} API tokens")
    for col in ("name", "role", "created", "revoked"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["role"], r["created_at"][:19], (r["revoked_at"] or "-")[:19])
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    name: Annotated[str, typer.Argument(help="The token's name (see `vigil tokens list`).")],
    by: ByOpt = "",
    store: StoreOpt = None,
) -> None:
    """Refuse a token from now on (its name stays taken, so the audit log stays unambiguous)."""
    url = existing_store(store)
    upgrade(url)
    sessions = session_factory(url)
    try:
        with sessions() as s, s.begin():
            auth.revoke_token(s, name, actor=by or _default_actor())
    except auth.TokenError as exc:
        err.print(f"[red]error[/]: {exc}")
        raise typer.Exit(2) from None
    finally:
        sessions.kw["bind"].dispose()
    console.print(f"token {name} revoked")


def mount(app: typer.Typer) -> None:
    """Add `serve` and `tokens` to the top-level `vigil` app."""
    app.command("serve")(serve)
    app.add_typer(tokens_app, name="tokens")
