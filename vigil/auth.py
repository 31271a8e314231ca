"""Who may call the REST API: bearer tokens stored hashed, roles with an explicit permission table, and a seam for OIDC.

Tokens are random 256-bit secrets (``secrets.token_urlsafe``) shown once at creation; the store keeps only their
SHA-256 (RFC 6750 bearer tokens; OWASP ASVS v4 §2.10 / §3.5: keep no plaintext secret). A presented token is hashed and
looked up by that hash, so no comparison ever touches the secret itself; the found hash is compared again with
``hmac.compare_digest``. Revoked tokens stay in the table (their names stay taken) and are refused.

Roles are not ordered: each has the permissions written out in ``ROLE_PERMISSIONS`` (DESIGN.md §Reliability and
security; issue 6, Build §4), so an engineer — who works on retraining tickets — cannot acknowledge a safety alert.

OIDC-ready: the API asks a sequence of ``Authenticator`` objects for a ``Principal``. ``TokenAuthenticator`` is the
one built in; a JWT/OIDC verifier (issuer, audience, JWKS, a role claim mapped onto ``ROLES``) plugs in beside it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from vigil import audit
from vigil.store import ROLES, ApiTokenRow, utcnow

TOKEN_PREFIX = "vigil_"
"""Marks a string as a vigil token, so secret scanners and people recognise a leaked one."""

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
"""Token names: who holds it (a person or a service), as it will appear in the audit log. Never a patient."""


class Permission(StrEnum):
    READ_ALERTS = "alerts:read"
    ACT_ON_ALERTS = "alerts:act"  # acknowledge, resolve, silence, unsilence, comment
    READ_TICKETS = "tickets:read"
    ACT_ON_TICKETS = "tickets:act"  # start, record acceptance, close, reclassify
    VERIFY_AUDIT = "audit:verify"
    MANAGE_TOKENS = "tokens:manage"


PERMISSION_TEXT: Mapping[Permission, str] = {
    Permission.READ_ALERTS: "read alerts",
    Permission.ACT_ON_ALERTS: "acknowledge, resolve, silence or comment on alerts",
    Permission.READ_TICKETS: "read retraining tickets",
    Permission.ACT_ON_TICKETS: "start, record acceptance for, close or reclassify retraining tickets",
    Permission.VERIFY_AUDIT: "verify the audit log",
    Permission.MANAGE_TOKENS: "manage API tokens",
}
"""What each permission allows, in words, for error messages."""

ROLE_PERMISSIONS: Mapping[str, frozenset[Permission]] = {
    "viewer": frozenset({Permission.READ_ALERTS, Permission.READ_TICKETS}),
    "safety_officer": frozenset({Permission.READ_ALERTS, Permission.READ_TICKETS, Permission.ACT_ON_ALERTS}),
    "engineer": frozenset({Permission.READ_ALERTS, Permission.READ_TICKETS, Permission.ACT_ON_TICKETS}),
    "admin": frozenset(Permission),
}
"""The whole authorization policy. ``tests/test_api_authz.py`` checks every endpoint against it."""

if set(ROLE_PERMISSIONS) != set(ROLES):  # the schema's CHECK constraint and this table must name the same roles
    raise RuntimeError(f"ROLE_PERMISSIONS names {sorted(ROLE_PERMISSIONS)} but the store allows {sorted(ROLES)}")


def roles_with(permission: Permission) -> tuple[str, ...]:
    """The roles granted ``permission``, in ``ROLES`` order (for "needs one of ..." errors)."""
    return tuple(role for role in ROLES if permission in ROLE_PERMISSIONS[role])


@dataclass(slots=True, frozen=True)
class Principal:
    """An authenticated caller: ``name`` is what the audit log records as the actor."""

    name: str
    role: str
    via: str = "token"

    def can(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS.get(self.role, frozenset())


@runtime_checkable
class Authenticator(Protocol):
    """Turns the credentials of an ``Authorization: Bearer`` header into a ``Principal``, or ``None`` if they are
    not valid for this authenticator (the API then tries the next one, and answers 401 if none accepts)."""

    def authenticate(self, credentials: str) -> Principal | None: ...


class TokenError(ValueError):
    """A token operation that cannot be done; the message says why and what to do."""


def hash_token(token: str) -> str:
    """SHA-256 hex of the token text: what the store keeps instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, name: str, role: str, *, actor: str) -> str:
    """Store a new token for ``name`` with ``role`` and return its plaintext — the only time it exists outside the
    caller. The creation is audit-logged (name and role; never the token or its hash)."""
    if not NAME_PATTERN.fullmatch(name):
        raise TokenError(f"token name {name!r} is not usable: 1-64 characters, letters, digits and . _ @ -, starting "
                         "with a letter or digit (name the person or service that will hold it)")
    if role not in ROLES:
        raise TokenError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    existing = session.scalar(select(ApiTokenRow).where(ApiTokenRow.name == name))
    if existing is not None:
        state = f"revoked at {existing.revoked_at.isoformat()}" if existing.revoked_at else "active"
        raise TokenError(f"a token named {name!r} already exists ({state}, role {existing.role}); names are never "
                         "reused, so the audit log stays unambiguous: pick another name")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiTokenRow(name=name, token_hash=hash_token(token), role=role))
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent create took the name
        raise TokenError(f"a token named {name!r} was created concurrently; pick another name") from exc
    audit.record(session, actor, "token.created", "api_token", name, {"role": role})
    return token


def revoke_token(session: Session, name: str, *, actor: str) -> ApiTokenRow:
    """Refuse the named token from now on (audit-logged). Revoking a revoked token is an error, so a typo shows."""
    row = session.scalar(select(ApiTokenRow).where(ApiTokenRow.name == name).with_for_update())
    if row is None:
        raise TokenError(f"no token named {name!r} (see `vigil tokens list`)")
    if row.revoked_at is not None:
        raise TokenError(f"token {name!r} was already revoked at {row.revoked_at.isoformat()}")
    row.revoked_at = utcnow()
    session.flush()
    audit.record(session, actor, "token.revoked", "api_token", name, {"role": row.role})
    return row


def verify_token(session: Session, token: str) -> Principal | None:
    """The principal holding ``token``, or ``None`` if it is unknown or revoked."""
    digest = hash_token(token)
    row = session.scalar(select(ApiTokenRow).where(ApiTokenRow.token_hash == digest))
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.token_hash, digest):
        return None
    return Principal(name=row.name, role=row.role)


def list_tokens(session: Session) -> Sequence[ApiTokenRow]:
    """Every token ever issued, oldest first (callers show name, role, dates; never the hash)."""
    return session.scalars(select(ApiTokenRow).order_by(ApiTokenRow.created_at, ApiTokenRow.id)).all()


class TokenAuthenticator:
    """The built-in ``Authenticator``: vigil's own bearer tokens, checked against the store."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def authenticate(self, credentials: str) -> Principal | None:
        if not credentials.startswith(TOKEN_PREFIX):
            return None  # not ours (e.g. a JWT for an OIDC authenticator): no database round trip
        with self._sessions() as session:
            return verify_token(session, credentials)
