"""The REST API of `vigil serve`: read and act on alerts and retraining tickets, verify the audit log (issues 6 and 7).

Every call except ``GET /healthz`` needs ``Authorization: Bearer <token>`` (RFC 6750; create tokens with
`vigil tokens create`). Missing or invalid credentials get 401 with ``WWW-Authenticate: Bearer``; a valid token whose
role lacks the permission gets 403 naming the roles that have it (``vigil.auth.ROLE_PERMISSIONS``) — also when the
body or a parameter is malformed: the caller is checked before the request is (``_refusal``).

Every read of alerts, comments or tickets appends an ``api.read`` entry to the hash-chained audit log in the same
transaction as the read — who (token name and role), which entity, when — the access record HIPAA asks for
(45 CFR 164.312(b), audit controls). If that entry cannot be written, the read fails. Alert actions go through
``vigil.alert_actions`` and ticket actions (start, acceptance, close, reclassify) through ``vigil.ticket_actions``,
like the CLI, and are audit-logged there with the caller's role. Responses hold no patient identifiers: alerts and
tickets carry none, and no endpoint exposes cases (a dataset manifest lists pseudonymous prediction resource ids and
content digests, never subject or encounter keys).

Reclassifying and recording acceptance need the model's PCCP: ``create_app(settings=...)`` names it per model
(``models[].pccp``), defaulting to the embedded example configuration.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, status
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrain_trigger.fhir_task import TaskValidationError, ticket_to_task
from retrain_trigger.lifecycle import NEXT_STATES, deployable
from retrain_trigger.manifest import ManifestError, build_manifest
from retrain_trigger.pccp import REMEDY_TYPES, PccpError
from vigil import __version__, alert_actions, audit, ticket_actions
from vigil.auth import PERMISSION_TEXT, Authenticator, Permission, Principal, TokenAuthenticator, roles_with
from vigil.domain import AlertState
from vigil.settings import Settings, load_settings
from vigil.store import (
    ALERT_STATES,
    PCCP_CATEGORIES,
    SEVERITIES,
    TICKET_STATUSES,
    AlertRow,
    TicketRow,
    session_factory,
    utcnow,
)

REALM = "vigil"
MAX_PAGE = 500
MAX_OFFSET = 1_000_000_000
"""Largest ``offset``: far beyond any store, and well inside the 64-bit integers SQLite and PostgreSQL bind (a larger
one made SQLite raise OverflowError, a 500, found by the API reliability campaign)."""

# --- response and request models (pydantic v2: the documented contract) -------------------------------------------


class ErrorOut(BaseModel):
    detail: str = Field(description="What was wrong, on which resource, and what to do.")


class TransitionErrorOut(ErrorOut):
    alert_id: str
    state: str = Field(description="The alert's current (effective) state.")
    action: str = Field(description="The action that was refused.")
    allowed_from: list[str] = Field(description="States the refused action is allowed from.")
    allowed_actions: list[str] = Field(description="Actions allowed from the current state.")


class HealthOut(BaseModel):
    status: str = Field(examples=["ok"])
    version: str


class AlertOut(BaseModel):
    """An alert: what (model, metric, detector), where (site, subgroup), since when, how much, and its lifecycle."""

    model_config = ConfigDict(from_attributes=True)

    id: str = Field(examples=["A-000001"])
    state: AlertState = Field(description="Effective state: a silence whose end has passed counts as firing.")
    severity: str = Field(examples=["warning", "critical"])
    model: str
    model_version: str
    metric: str
    site: str
    subgroup: str
    detector: str
    detected_at: datetime
    change_estimate: datetime = Field(description="Estimated time the change began.")
    last_fired_at: datetime
    fire_count: int
    statistic: float
    threshold: float
    baseline: float
    current: float
    ci_low: float = Field(description="Lower end of the 95% CI of the current value.")
    ci_high: float
    n_baseline: int
    n_current: int
    acked_by: str | None
    acked_at: datetime | None
    ack_comment: str | None
    resolved_by: str | None
    resolved_at: datetime | None
    silenced_until: datetime | None
    silenced_by: str | None
    silence_reason: str | None
    escalated_at: datetime | None
    ticket_id: str | None
    parent_id: str | None = Field(None, description="The alert of the parent stream (same metric at the site, or "
                                                    "across sites) this one is grouped under: one change, one signal.")

    @classmethod
    def of(cls, row: AlertRow, now: datetime) -> AlertOut:
        out = cls.model_validate(row)
        out.state = AlertState(alert_actions.effective_state(row, now))
        return out


class CommentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    alert_id: str
    author: str = Field(description="Token name of who wrote it.")
    at: datetime
    text: str


class AlertDetailOut(AlertOut):
    comments: list[CommentOut]
    allowed_actions: list[str] = Field(description="Actions allowed from the current state.")


class AlertPage(BaseModel):
    items: list[AlertOut]
    total: int = Field(description="Alerts matching the filters, over all pages.")
    limit: int
    offset: int


class TransitionOut(BaseModel):
    alert_id: str
    action: str
    from_state: AlertState
    to_state: AlertState
    by: str
    at: datetime
    alert: AlertOut


class TicketSummaryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(examples=["T-000001"])
    status: str
    model: str
    model_version: str
    category: str = Field(description="PCCP category (reference/pccp.md).")
    safety_overlay: bool = Field(description="Urgent safety overlay (U).")
    matched_mod: str | None
    cause: str
    cause_confidence: float
    remedy: str
    created_at: datetime
    updated_at: datetime
    alert_ids: list[str]
    deployable: bool = Field(description="C2 with a passed acceptance for the current remedy: the modification may "
                                         "be implemented under the PCCP.")


class TicketOut(TicketSummaryOut):
    rationale: list[Any] = Field(description="The classification's rule trace with citations.")
    required_actions: list[Any]
    evidence: dict[str, Any] = Field(description="Signal evidence and data lineage (no patient data).")
    acceptance: dict[str, Any] | None


class TicketActionOut(BaseModel):
    ticket_id: str
    action: str = Field(examples=["start", "acceptance", "close", "reclassify"])
    from_status: str
    to_status: str
    from_category: str
    to_category: str
    by: str = Field(description="Token name of who acted (also in the audit log).")
    at: datetime
    ticket: TicketOut


class TicketConflictOut(ErrorOut):
    ticket_id: str
    status: str | None = Field(description="The ticket's current status.")
    allowed_next: list[str] = Field(description="Statuses the ticket may move to from here.")


class TicketPage(BaseModel):
    items: list[TicketSummaryOut]
    total: int
    limit: int
    offset: int


class AuditVerifyOut(BaseModel):
    ok: bool
    checked: int = Field(description="Entries that verified, in order, before the first bad one.")
    first_bad_seq: int | None
    reason: str | None
    head_hash: str | None = Field(description="Hash of the last good entry: keep it elsewhere to detect truncation.")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoteIn(_Body):
    comment: str | None = Field(default=None, max_length=alert_actions.MAX_TEXT,
                                description="Why (stored on the alert and in the audit log).")


class SilenceIn(_Body):
    """Give exactly one of ``until`` and ``duration``."""

    until: AwareDatetime | None = Field(default=None, description="End of the silence, with a time zone.",
                                        examples=["2026-12-06T08:00:00Z"])
    duration: timedelta | None = Field(default=None, description="Length of the silence (ISO 8601, e.g. P7D, PT12H).",
                                       examples=["P7D"])
    reason: str = Field(min_length=1, max_length=alert_actions.MAX_TEXT, description="Why the alert is muted.")

    @model_validator(mode="after")
    def _one_end(self) -> SilenceIn:
        if (self.until is None) == (self.duration is None):
            raise ValueError("give exactly one of 'until' (an ISO 8601 time with zone) or 'duration' (e.g. 'P7D')")
        return self


class CommentIn(_Body):
    text: str = Field(min_length=1, max_length=alert_actions.MAX_TEXT)


class CriterionIn(_Body):
    value: float | bool | None = Field(default=None, description="The measured value (e.g. a CI bound or margin).")
    passed: bool | None = Field(default=None, description="The verdict on this criterion, if the protocol gives one.")


class AcceptanceIn(_Body):
    """The Modification Protocol's result (pccp.md §8.4 R6): pass keeps the ticket C2, fail makes it C2-F."""

    passed: bool = Field(description="The protocol's overall verdict.")
    results: dict[str, bool | float | CriterionIn] = Field(
        min_length=1, description="Criterion → value or {value, passed}. Criteria are named as in the PCCP, e.g. "
                                  "\"sensitivity equivalence vs original\", \"sensitivity [age_band=80+] vs "
                                  "last_modified\", \"full-device V&V\"; a pass needs every one, a fail must mark "
                                  "the failed ones.",
        examples=[{"sensitivity equivalence vs original": 0.01,
                   "sensitivity [age_band=80+] vs original": {"value": -0.08, "passed": False}}])
    evidence_ref: str = Field(min_length=1, max_length=alert_actions.MAX_TEXT,
                              description="The test report (document id or URL).", examples=["VV-2025-031"])

    def plain_results(self) -> dict[str, Any]:
        return {k: v.model_dump(exclude_unset=True) if isinstance(v, CriterionIn) else v
                for k, v in self.results.items()}


class CloseIn(_Body):
    comment: str = Field(min_length=1, max_length=alert_actions.MAX_TEXT,
                         description="What was done, or why nothing is (kept on the ticket and in the audit log).")


RemedyChoice = StrEnum("RemedyChoice", {r: r for r in REMEDY_TYPES})


class ReclassifyIn(_Body):
    remedy: RemedyChoice = Field(description="The remedy the engineer proposes (pccp.md §8.3 remedy types).",
                                 examples=["retrain_same_arch_new_data"])


StateFilter = StrEnum("StateFilter", {s: s for s in ALERT_STATES})
SeverityFilter = StrEnum("SeverityFilter", {s: s for s in SEVERITIES})
TicketStatusFilter = StrEnum("TicketStatusFilter", {s: s for s in TICKET_STATUSES})
CategoryFilter = StrEnum("CategoryFilter", {s: s for s in PCCP_CATEGORIES})

Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"Page size (at most {MAX_PAGE}).")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description=f"Items to skip (at most {MAX_OFFSET:,}).")]
AlertId = Annotated[str, Path(description="Alert id.", examples=["A-000001"], max_length=16)]
TicketId = Annotated[str, Path(description="Ticket id.", examples=["T-000001"], max_length=16)]

# --- authentication and authorization ---------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, bearerFormat="vigil token",
                     description="A token from `vigil tokens create NAME --role ROLE`.")

UNAUTHORIZED = {"model": ErrorOut, "description": "No bearer token, or it is unknown or revoked."}
FORBIDDEN = {"model": ErrorOut, "description": "The token's role lacks the permission; the message names the roles."}
NOT_FOUND = {"model": ErrorOut, "description": "No such alert or ticket."}
CONFLICT = {"model": TransitionErrorOut, "description": "The alert's state does not allow this action."}
TICKET_CONFLICT = {"model": TicketConflictOut,
                   "description": "The ticket's lifecycle or its PCCP does not allow this now (wrong status, a "
                                  "criterion missing or unknown, a remedy the PCCP does not cover, no PCCP "
                                  "configured for the model); the message says what to do."}
BAD_BODY = {"model": ErrorOut, "description": "The body could not be parsed (e.g. it is not UTF-8): send JSON."}
UNPROCESSABLE = {"description": "A malformed body or parameter, or the model's PCCP file is invalid (FastAPI's "
                                "validation shape: `detail` is a list of `{loc, msg, type}`)."}
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {401: UNAUTHORIZED, 403: FORBIDDEN}


def _unauthorized(detail: str, error: str | None) -> HTTPException:
    challenge = f'Bearer realm="{REALM}"' + (f', error="{error}"' if error else "")
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": challenge})


def authenticated(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    """The caller, from the bearer token; 401 if there is none or no authenticator accepts it."""
    if credentials is None:
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <token>' (an admin creates one with "
                            "`vigil tokens create NAME --role ROLE`)", None)
    for authenticator in request.app.state.authenticators:
        principal = authenticator.authenticate(credentials.credentials)
        if principal is not None:
            return principal
    raise _unauthorized("invalid or revoked bearer token: ask an admin for a new one (`vigil tokens create`)",
                        "invalid_token")


def require(permission: Permission) -> Callable[[Principal], Principal]:
    """A dependency admitting only callers whose role has ``permission`` (403 naming the roles that do).

    Extra routers (``create_app(extra_routers=...)``) use it the same way: ``Depends(require(Permission.X))``.
    """

    def dependency(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if not principal.can(permission):
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"token {principal.name!r} has role {principal.role!r}, which may not "
                                f"{PERMISSION_TEXT[permission]} ({permission.value}); "
                                f"this needs one of the roles: {', '.join(roles_with(permission))}")
        return principal

    dependency.permission = permission  # type: ignore[attr-defined]  # for _refusal and scripts/reliability/api.py
    return dependency


def _dependency_calls(dependant: Any) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _dependency_calls(sub)


async def _refusal(request: Request) -> JSONResponse | None:
    """The 401/403 a request deserves, or None when its caller may call the route.

    FastAPI parses a JSON body before it runs dependencies, so a malformed body would be answered 422 or 400 before a
    missing or revoked token is. The validation handlers ask this first: an unauthenticated caller learns only that it
    must authenticate (deny by default, OWASP ASVS v4 §4.1.5; RFC 6750 §3.1).
    """
    dependant = getattr(request.scope.get("route"), "dependant", None)
    calls = list(_dependency_calls(dependant)) if dependant is not None else []
    if authenticated not in calls:
        return None
    try:
        principal = await run_in_threadpool(authenticated, request, await _bearer(request))
        for call in calls:
            if getattr(call, "permission", None) is not None:
                call(principal)
    except HTTPException as exc:
        return await http_exception_handler(request, exc)
    return None


Reader = Annotated[Principal, Depends(require(Permission.READ_ALERTS))]
Actor = Annotated[Principal, Depends(require(Permission.ACT_ON_ALERTS))]
TicketReader = Annotated[Principal, Depends(require(Permission.READ_TICKETS))]
TicketActor = Annotated[Principal, Depends(require(Permission.ACT_ON_TICKETS))]
Auditor = Annotated[Principal, Depends(require(Permission.VERIFY_AUDIT))]

# --- the app ---------------------------------------------------------------------------------------------------------


def create_app(store_url: str, *, extra_routers: Iterable[APIRouter] = (),
               authenticators: Sequence[Authenticator] | None = None, settings: Settings | None = None) -> FastAPI:
    """The API on the store at ``store_url`` (already upgraded: `vigil serve` runs ``vigil.store.upgrade`` first).

    One engine for the app's lifetime, disposed at shutdown. ``extra_routers`` are mounted as given (the Prometheus
    ``/metrics`` and the FHIR subscription webhook plug in here); they protect themselves with ``require``.
    ``authenticators`` default to vigil's own bearer tokens; an OIDC/JWT verifier can be added to the sequence.
    ``settings`` name each model's PCCP for reclassifying and recording acceptance (default: the embedded example
    configuration, ``load_settings()``).
    """
    sessions = session_factory(store_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        sessions.kw["bind"].dispose()

    app = FastAPI(
        title="vigil",
        version=__version__,
        summary="Post-market performance monitoring for AI medical devices: drift alerts and retraining tickets.",
        description=(
            "Authenticate every call (except `/healthz`) with `Authorization: Bearer <token>`; an admin issues tokens "
            "with `vigil tokens create NAME --role viewer|safety_officer|engineer|admin`.\n\n"
            "Roles: **viewer** reads alerts and tickets; **safety_officer** also acknowledges, resolves, silences "
            "and comments on alerts; **engineer** also starts, records acceptance for, closes and reclassifies "
            "retraining tickets, but does not act on alerts; **admin** may do everything, including verifying the "
            "audit log.\n\n"
            "Every read and every action is recorded in the hash-chained audit log under the token's name. "
            "Errors are JSON `{\"detail\": \"...\"}` saying what was wrong and what to do; 422 (a malformed "
            "body or parameter, or a value that cannot be used such as a silence end in the past) uses FastAPI's "
            "validation shape `{\"detail\": [{\"loc\": [...], \"msg\": ..., \"type\": ...}]}`."
        ),
        lifespan=lifespan,
        openapi_tags=[
            {"name": "alerts", "description": "Drift alerts and their lifecycle."},
            {"name": "tickets", "description": "Retraining tickets with their PCCP category: lifecycle, FHIR Task "
                                               "export and dataset manifest."},
            {"name": "audit", "description": "The tamper-evident audit log."},
            {"name": "health", "description": "Liveness, without authentication."},
        ],
    )
    app.state.sessions = sessions
    app.state.settings = settings if settings is not None else load_settings()
    app.state.authenticators = tuple(authenticators) if authenticators is not None else (TokenAuthenticator(sessions),)

    @app.exception_handler(RequestValidationError)
    async def _malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _refusal(request) or await request_validation_exception_handler(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        if exc.status_code == status.HTTP_400_BAD_REQUEST:  # FastAPI's "error parsing the body": auth first too
            refusal = await _refusal(request)
            if refusal is not None:
                return refusal
        return await http_exception_handler(request, exc)

    @app.exception_handler(alert_actions.AlertNotFound)
    async def _not_found(_request: Request, exc: alert_actions.AlertNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status.HTTP_404_NOT_FOUND)

    @app.exception_handler(alert_actions.InvalidTransition)
    async def _conflict(_request: Request, exc: alert_actions.InvalidTransition) -> JSONResponse:
        body = TransitionErrorOut(detail=str(exc), alert_id=exc.alert_id, state=exc.state, action=exc.action,
                                  allowed_from=list(exc.allowed_from), allowed_actions=list(exc.allowed_actions))
        return JSONResponse(body.model_dump(), status.HTTP_409_CONFLICT)

    @app.exception_handler(alert_actions.InvalidInput)
    async def _invalid(_request: Request, exc: alert_actions.InvalidInput) -> JSONResponse:
        """Values that parse but cannot be used (a silence end in the past, a blank comment) get the same 422 shape
        as FastAPI's own validation errors, so a client reads every 422 one way."""
        error = {"type": "value_error", "loc": ["body", exc.field], "msg": str(exc)}
        return JSONResponse({"detail": [error]}, status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(ticket_actions.TicketNotFound)
    async def _ticket_not_found(_request: Request, exc: ticket_actions.TicketNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc).replace("`vigil tickets list`", "GET /tickets")},
                            status.HTTP_404_NOT_FOUND)

    @app.exception_handler(ticket_actions.TicketLifecycleError)
    async def _ticket_conflict(request: Request, exc: ticket_actions.TicketLifecycleError) -> JSONResponse:
        ticket_id = str(request.path_params.get("ticket_id", ""))
        with request.app.state.sessions() as session:  # the request's transaction was rolled back: read afresh
            row = session.get(TicketRow, ticket_id)
            current = row.status if row is not None else None
        body = TicketConflictOut(detail=str(exc), ticket_id=ticket_id, status=current,
                                 allowed_next=list(NEXT_STATES.get(current or "", ())))
        return JSONResponse(body.model_dump(), status.HTTP_409_CONFLICT)

    @app.exception_handler(PccpError)
    async def _bad_pccp(_request: Request, exc: PccpError) -> JSONResponse:
        """The PCCP file the configuration names for the model cannot be used: fix the file (or the config)."""
        error = {"type": "pccp_invalid", "loc": ["pccp"], "msg": str(exc)}
        return JSONResponse({"detail": [error]}, status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(ManifestError)
    async def _bad_manifest(_request: Request, exc: ManifestError) -> JSONResponse:
        error = {"type": "value_error", "loc": ["query"], "msg": str(exc)}
        return JSONResponse({"detail": [error]}, status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(TaskValidationError)
    async def _bad_task(_request: Request, exc: TaskValidationError) -> JSONResponse:
        return JSONResponse({"detail": f"{exc}; this is a vigil defect: report it with the ticket id"},
                            status.HTTP_500_INTERNAL_SERVER_ERROR)

    app.include_router(_health_router())
    app.include_router(_alerts_router())
    app.include_router(_tickets_router())
    app.include_router(_audit_router())
    for router in extra_routers:
        app.include_router(router)
    return app


@contextmanager
def _transaction(request: Request) -> Iterator[Session]:
    """One session and transaction for one request; committed before the response is built."""
    sessions: sessionmaker[Session] = request.app.state.sessions
    with sessions() as session, session.begin():
        yield session


def _access(session: Session, principal: Principal, request: Request, entity: str, entity_id: str,
            **details: Any) -> None:
    """The HIPAA access record for a read: who, what, when (the audit entry's time)."""
    audit.record(session, principal.name, "api.read", entity, entity_id,
                 {"role": principal.role, "via": principal.via,
                  "request": f"{request.method} {request.url.path}", **details})


def _context(principal: Principal) -> dict[str, str]:
    return {"role": principal.role, "via": f"api/{principal.via}"}


def _health_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", summary="Liveness and store reachability", response_model=HealthOut,
                description="No authentication. 200 when the store answers a query, 503 when it does not.",
                responses={503: {"model": ErrorOut, "description": "The store does not answer."}})
    def healthz(request: Request) -> HealthOut:
        try:
            with request.app.state.sessions() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:  # any driver error means "not healthy"; the message names the cause
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                f"store unreachable ({type(exc).__name__}); check the store URL and database") from exc
        return HealthOut(status="ok", version=__version__)

    return router


def _alerts_router() -> APIRouter:
    router = APIRouter(prefix="/alerts", tags=["alerts"], responses=AUTH_ERRORS)

    @router.get("", summary="List alerts", response_model=AlertPage,
                description="Newest detection first. `state` filters on the effective state (an expired silence is "
                            "firing). The read is recorded in the audit log with the ids returned.")
    def list_alerts(request: Request, principal: Reader, state: StateFilter | None = None, site: str | None = None,
                    metric: str | None = None, model: str | None = None, severity: SeverityFilter | None = None,
                    limit: Limit = 100, offset: Offset = 0) -> AlertPage:
        now = utcnow()
        filters = {"state": state and state.value, "site": site, "metric": metric, "model": model,
                   "severity": severity and severity.value}
        q = alert_actions.query(**filters, now=now)
        with _transaction(request) as s:
            total = s.scalar(select(func.count()).select_from(q.order_by(None).subquery())) or 0
            rows = s.scalars(q.limit(limit).offset(offset)).all()
            items = [AlertOut.of(a, now) for a in rows]
            _access(s, principal, request, "alert", "*", ids=[a.id for a in rows],
                    filters={k: v for k, v in filters.items() if v is not None}, limit=limit, offset=offset)
        return AlertPage(items=items, total=total, limit=limit, offset=offset)

    @router.get("/{alert_id}", summary="Show one alert", response_model=AlertDetailOut,
                responses={404: NOT_FOUND},
                description="The alert with its comments and the actions its state allows. Access-logged.")
    def show_alert(request: Request, principal: Reader, alert_id: AlertId) -> AlertDetailOut:
        now = utcnow()
        with _transaction(request) as s:
            row = alert_actions.get(s, alert_id)
            notes = [CommentOut.model_validate(c) for c in alert_actions.comments(s, alert_id)]
            out = AlertOut.of(row, now)
            _access(s, principal, request, "alert", alert_id)
        return AlertDetailOut(**out.model_dump(), comments=notes,
                              allowed_actions=list(alert_actions.allowed_actions(out.state.value)))

    @router.get("/{alert_id}/comments", summary="List an alert's comments", response_model=list[CommentOut],
                responses={404: NOT_FOUND}, description="Oldest first. Access-logged.")
    def list_comments(request: Request, principal: Reader, alert_id: AlertId) -> list[CommentOut]:
        with _transaction(request) as s:
            notes = [CommentOut.model_validate(c) for c in alert_actions.comments(s, alert_id)]
            _access(s, principal, request, "alert", alert_id, part="comments")
        return notes

    transition_errors: dict[int | str, dict[str, Any]] = {404: NOT_FOUND, 409: CONFLICT}
    body_errors = {**transition_errors, 400: BAD_BODY}

    def _done(t: alert_actions.Transition) -> TransitionOut:
        return TransitionOut(alert_id=t.alert.id, action=t.action, from_state=AlertState(t.from_state),
                             to_state=AlertState(t.to_state), by=t.by, at=t.at, alert=AlertOut.of(t.alert, t.at))

    @router.post("/{alert_id}/ack", summary="Acknowledge an alert", response_model=TransitionOut,
                 responses=body_errors,
                 description="Allowed from firing or silenced (acknowledging ends a silence). Records the token's "
                             "name, the time and the optional comment on the alert and in the audit log.")
    def ack(request: Request, principal: Actor, alert_id: AlertId, body: NoteIn | None = None) -> TransitionOut:
        with _transaction(request) as s:
            t = alert_actions.acknowledge(s, alert_id, principal.name, body.comment if body else None,
                                          context=_context(principal))
        return _done(t)

    @router.post("/{alert_id}/resolve", summary="Resolve an alert", response_model=TransitionOut,
                 responses=body_errors,
                 description="Allowed from firing, acknowledged or silenced; resolved is final (a new firing of the "
                             "stream opens a new alert).")
    def resolve(request: Request, principal: Actor, alert_id: AlertId, body: NoteIn | None = None) -> TransitionOut:
        with _transaction(request) as s:
            t = alert_actions.resolve(s, alert_id, principal.name, body.comment if body else None,
                                      context=_context(principal))
        return _done(t)

    @router.post("/{alert_id}/silence", summary="Silence an alert for a time", response_model=TransitionOut,
                 responses=body_errors,
                 description=f"Time-boxed: give `until` (in the future, at most {alert_actions.MAX_SILENCE.days} "
                             "days ahead) or `duration`, and a `reason`. Allowed from firing, acknowledged or "
                             "silenced (replaces the earlier silence). When the silence ends the alert is firing "
                             "again.")
    def silence(request: Request, principal: Actor, alert_id: AlertId, body: SilenceIn) -> TransitionOut:
        now = utcnow()
        until = body.until if body.until is not None else now + body.duration  # type: ignore[operator]
        try:
            with _transaction(request) as s:
                t = alert_actions.silence(s, alert_id, principal.name, until, body.reason,
                                          context=_context(principal), now=now)
        except alert_actions.InvalidInput as exc:
            if exc.field == "until" and body.duration is not None:
                exc.field = "duration"  # the end was computed from the duration the caller gave
            raise
        return _done(t)

    @router.post("/{alert_id}/unsilence", summary="End a silence early", response_model=TransitionOut,
                 responses=transition_errors, description="Allowed from silenced; the alert is firing again.")
    def unsilence(request: Request, principal: Actor, alert_id: AlertId) -> TransitionOut:
        with _transaction(request) as s:
            t = alert_actions.unsilence(s, alert_id, principal.name, context=_context(principal))
        return _done(t)

    @router.post("/{alert_id}/comments", summary="Comment on an alert", response_model=CommentOut,
                 status_code=status.HTTP_201_CREATED, responses={404: NOT_FOUND, 400: BAD_BODY},
                 description="Allowed in every state, resolved included. Stored with the token's name and recorded "
                             "in the audit log.")
    def add_comment(request: Request, principal: Actor, alert_id: AlertId, body: CommentIn) -> CommentOut:
        with _transaction(request) as s:
            row = alert_actions.comment(s, alert_id, principal.name, body.text, context=_context(principal))
            out = CommentOut.model_validate(row)
        return out

    return router


def _ticket_summary(t: TicketRow) -> dict[str, Any]:
    return {**{c.key: getattr(t, c.key) for c in TicketRow.__table__.columns}, "alert_ids": [a.id for a in t.alerts],
            "deployable": deployable(t)}


def _tickets_router() -> APIRouter:
    router = APIRouter(prefix="/tickets", tags=["tickets"], responses=AUTH_ERRORS)

    @router.get("", summary="List retraining tickets", response_model=TicketPage,
                description="By id. Without the rule trace and evidence (see GET /tickets/{id}). Access-logged.")
    def list_tickets(request: Request, principal: TicketReader, status_: Annotated[
                         TicketStatusFilter | None, Query(alias="status")] = None,
                     model: str | None = None, category: CategoryFilter | None = None,
                     limit: Limit = 100, offset: Offset = 0) -> TicketPage:
        filters = {"status": status_ and status_.value, "model": model, "category": category and category.value}
        q = select(TicketRow).order_by(TicketRow.id)
        for key, value in filters.items():
            if value is not None:
                q = q.where(getattr(TicketRow, key) == value)
        with _transaction(request) as s:
            total = s.scalar(select(func.count()).select_from(q.order_by(None).subquery())) or 0
            rows = s.scalars(q.limit(limit).offset(offset)).all()
            items = [TicketSummaryOut.model_validate(_ticket_summary(t)) for t in rows]
            _access(s, principal, request, "ticket", "*", ids=[t.id for t in rows],
                    filters={k: v for k, v in filters.items() if v is not None}, limit=limit, offset=offset)
        return TicketPage(items=items, total=total, limit=limit, offset=offset)

    @router.get("/{ticket_id}", summary="Show one ticket", response_model=TicketOut,
                responses={404: NOT_FOUND},
                description="Category, rule trace with citations, required actions, evidence and lineage. "
                            "Access-logged.")
    def show_ticket(request: Request, principal: TicketReader, ticket_id: TicketId) -> TicketOut:
        with _transaction(request) as s:
            row = s.get(TicketRow, ticket_id)
            if row is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND,
                                    f"no ticket {ticket_id} in the store (list them with GET /tickets)")
            out = TicketOut.model_validate(_ticket_summary(row))
            _access(s, principal, request, "ticket", ticket_id)
        return out

    @router.get("/{ticket_id}/fhir-task", summary="The ticket as a FHIR R4 Task", response_model=dict[str, Any],
                responses={404: NOT_FOUND, 200: {"content": {"application/fhir+json": {}},
                                                 "description": "A FHIR R4 Task, validated with fhir.resources."}},
                description="For an EMR, QMS or work queue: category and remedy as `code`/`description`, the rule "
                            "trace in `note`, the model as `focus`, evidence references (alerts, data window, "
                            "evidence and manifest hashes, reporting clocks) in `input`, a recorded acceptance in "
                            "`output` (https://hl7.org/fhir/R4/task.html). Access-logged.")
    def fhir_task(request: Request, principal: TicketReader, ticket_id: TicketId) -> JSONResponse:
        with _transaction(request) as s:
            task = ticket_to_task(ticket_actions.get(s, ticket_id))
            _access(s, principal, request, "ticket", ticket_id, part="fhir-task")
        return JSONResponse(task, media_type="application/fhir+json")

    @router.get("/{ticket_id}/manifest", summary="The ticket's dataset manifest", response_model=dict[str, Any],
                responses={404: NOT_FOUND, 422: UNPROCESSABLE},
                description="The labeled cases of the ticket's model version in its data window at its sites "
                            "(override with `start`, `end`, `site`): prediction resource ids with per-case "
                            "digests, source positions, and a SHA-256 over the cases' content, so the retraining "
                            "data can be reproduced and verified (`vigil tickets verify-manifest`). Computed now, "
                            "not stored; attach it with `vigil tickets manifest --by`. No subject or encounter "
                            "keys. Access-logged with the case count and hash.")
    def manifest(request: Request, principal: TicketReader, ticket_id: TicketId,
                 start: Annotated[AwareDatetime | None, Query(description="Window start (ISO 8601 with zone).")
                                  ] = None,
                 end: Annotated[AwareDatetime | None, Query(description="Window end (ISO 8601 with zone).")] = None,
                 site: Annotated[list[str] | None, Query(description="Sites (repeatable).")] = None,
                 ) -> dict[str, Any]:
        with _transaction(request) as s:
            data = build_manifest(s, ticket_actions.get(s, ticket_id), start=start, end=end, sites=site)
            _access(s, principal, request, "ticket", ticket_id, part="manifest", case_count=data["case_count"],
                    sha256=data["content_hash"]["sha256"])
        return data

    action_errors: dict[int | str, dict[str, Any]] = {404: NOT_FOUND, 409: TICKET_CONFLICT}

    def _acted(request: Request, principal: Principal, ticket_id: str, action: str,
               act: Callable[[Session], TicketRow]) -> TicketActionOut:
        with _transaction(request) as s:
            before = ticket_actions.get(s, ticket_id, for_update=True)  # the status this action starts from
            from_status, from_category = before.status, before.category
            row = act(s)
            out = TicketActionOut(ticket_id=row.id, action=action, from_status=from_status, to_status=row.status,
                                  from_category=from_category, to_category=row.category, by=principal.name,
                                  at=utcnow(), ticket=TicketOut.model_validate(_ticket_summary(row)))
        return out

    @router.post("/{ticket_id}/start", summary="Start work on a ticket", response_model=TicketActionOut,
                 responses=action_errors,
                 description="open → in_progress (or back to in_progress to re-test after a failed acceptance whose "
                             "root cause is unrelated to the PCCP, S3 §VII.B(3)). Audit-logged with the token's name.")
    def start(request: Request, principal: TicketActor, ticket_id: TicketId) -> TicketActionOut:
        return _acted(request, principal, ticket_id, "start",
                      lambda s: ticket_actions.start(s, ticket_id, principal.name, context=_context(principal)))

    @router.post("/{ticket_id}/acceptance", summary="Record the Modification Protocol's acceptance result",
                 response_model=TicketActionOut, responses={**action_errors, 400: BAD_BODY, 422: UNPROCESSABLE},
                 description="in_progress → acceptance_recorded. A pass must report every criterion of the matched "
                             "PCCP modification and keeps the ticket C2 (deployable); a fail must mark the failed "
                             "criteria and makes it C2-F: recorded, never implemented (pccp.md §8.4 R6, S3 "
                             "§VII.B(3)). `vigil tickets criteria ID` lists the criteria. Audit-logged.")
    def acceptance(request: Request, principal: TicketActor, ticket_id: TicketId,
                   body: AcceptanceIn) -> TicketActionOut:
        settings: Settings = request.app.state.settings
        return _acted(request, principal, ticket_id, "acceptance",
                      lambda s: ticket_actions.record_acceptance(
                          s, settings, ticket_id, principal.name, passed=body.passed, results=body.plain_results(),
                          evidence_ref=body.evidence_ref, context=_context(principal)))

    @router.post("/{ticket_id}/close", summary="Close a ticket", response_model=TicketActionOut,
                 responses={**action_errors, 400: BAD_BODY, 422: UNPROCESSABLE},
                 description="From open, in_progress or acceptance_recorded; closed is final. The comment is kept on "
                             "the ticket (evidence.closure) and in the audit log.")
    def close(request: Request, principal: TicketActor, ticket_id: TicketId, body: CloseIn) -> TicketActionOut:
        return _acted(request, principal, ticket_id, "close",
                      lambda s: ticket_actions.close(s, ticket_id, principal.name, body.comment,
                                                     context=_context(principal)))

    @router.post("/{ticket_id}/reclassify", summary="Reclassify a ticket with another remedy",
                 response_model=TicketActionOut, responses={**action_errors, 400: BAD_BODY, 422: UNPROCESSABLE},
                 description="Re-runs the PCCP classifier (pccp.md §8.4 R0–R9) on the ticket's stored evidence with "
                             "the proposed remedy, against the PCCP the configuration names for the model. The new "
                             "category, rule trace and required actions replace the old ones and the ticket returns "
                             "to open; the audit log keeps both decisions. Not for closed tickets or a passed "
                             "acceptance.")
    def reclassify(request: Request, principal: TicketActor, ticket_id: TicketId,
                   body: ReclassifyIn) -> TicketActionOut:
        settings: Settings = request.app.state.settings
        return _acted(request, principal, ticket_id, "reclassify",
                      lambda s: ticket_actions.reclassify(s, settings, ticket_id, principal.name, body.remedy.value,
                                                          context=_context(principal)))

    return router


def _audit_router() -> APIRouter:
    router = APIRouter(prefix="/audit", tags=["audit"], responses=AUTH_ERRORS)

    @router.get("/verify", summary="Verify the audit log's hash chain", response_model=AuditVerifyOut,
                description="Walks the chain from the first entry; `ok` is false and `first_bad_seq` names the first "
                            "edited, deleted or reordered entry. 200 either way: the answer is the body. The check "
                            "itself is recorded afterwards.")
    def verify(request: Request, principal: Auditor) -> AuditVerifyOut:
        with _transaction(request) as s:
            result = audit.verify(s)
            _access(s, principal, request, "audit_log", "*", ok=result.ok, checked=result.checked)
        return AuditVerifyOut(ok=result.ok, checked=result.checked, first_bad_seq=result.first_bad_seq,
                              reason=result.reason, head_hash=result.head_hash)

    return router
