"""Send one rendered notification to one receiver; raise ``NotificationError`` saying what failed and what to do.

One small class per receiver kind, each with ``send(payload) -> None`` and a timeout on every network call:
Prometheus Alertmanager API v2 and the signed JSON webhook over httpx, email over SMTP with the standard library's
smtplib (RFC 5321, STARTTLS per RFC 3207), chat channels through apprise. Retries are not done here: the outbox
(``vigil.notify``) retries with backoff, so a failure must simply raise.

The webhook signature follows the common "timestamp.body" HMAC scheme (RFC 2104, SHA-256): the receiver recomputes
``HMAC(secret, f"{timestamp}." + raw body)``, compares in constant time, and refuses timestamps outside a tolerance,
so a captured request cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import ssl
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, Protocol

import apprise
import httpx

from alerts.routing import (
    AlertmanagerReceiver,
    ChatReceiver,
    EmailReceiver,
    WebhookReceiver,
    secret_from_env,
)

SIGNATURE_HEADER = "X-Vigil-Signature"
TIMESTAMP_HEADER = "X-Vigil-Timestamp"
DELIVERY_HEADER = "X-Vigil-Delivery"
DEFAULT_TOLERANCE_SECONDS = 300


class NotificationError(RuntimeError):
    """A delivery attempt failed; the message names the receiver, the target and the remedy (never message content)."""


class SignatureError(ValueError):
    """A webhook request whose signature or timestamp does not verify."""


class Notifier(Protocol):
    name: str

    def send(self, payload: dict[str, Any]) -> None: ...


def _http_error(kind: str, name: str, url: str, exc: Exception | httpx.Response) -> NotificationError:
    if isinstance(exc, httpx.Response):
        detail = f"HTTP {exc.status_code}: {exc.text[:200].strip()}"
        remedy = "check the receiver's URL and that it accepts this request"
    elif isinstance(exc, httpx.TimeoutException):
        detail, remedy = f"timed out ({type(exc).__name__})", "check that the receiver is up and reachable"
    else:
        detail, remedy = f"{type(exc).__name__}: {exc}", "check that the receiver is up and reachable"
    return NotificationError(f"{kind} receiver {name!r} at {url}: {detail}; {remedy} (the outbox will retry)")


class AlertmanagerNotifier:
    """``POST {url}/api/v2/alerts`` with the JSON array of alert objects (reference/interop.md §6)."""

    def __init__(self, receiver: AlertmanagerReceiver) -> None:
        self.name = receiver.name
        self.endpoint = f"{str(receiver.url).rstrip('/')}/api/v2/alerts"
        self.timeout = receiver.timeout_seconds

    def send(self, payload: dict[str, Any]) -> None:
        try:
            response = httpx.post(self.endpoint, json=payload["alerts"], timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise _http_error("alertmanager", self.name, self.endpoint, exc) from exc
        if response.status_code != 200:
            raise _http_error("alertmanager", self.name, self.endpoint, response)


class EmailNotifier:
    """One email per notification, ``multipart/alternative`` with the plain-text and HTML bodies."""

    def __init__(self, receiver: EmailReceiver) -> None:
        self.name = receiver.name
        self.receiver = receiver

    def message(self, payload: dict[str, Any]) -> EmailMessage:
        r = self.receiver
        msg = EmailMessage()
        msg["Subject"] = payload["subject"]
        msg["From"] = r.from_
        msg["To"] = ", ".join(r.to)
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain=r.from_.rpartition("@")[2] or None)
        msg.set_content(payload["text"])
        msg.add_alternative(payload["html"], subtype="html")
        return msg

    def send(self, payload: dict[str, Any]) -> None:
        r = self.receiver
        where = f"email receiver {self.name!r} via SMTP {r.smtp_host}:{r.smtp_port}"
        password = secret_from_env(r.password_env, where) if r.username and r.password_env else None
        try:
            with smtplib.SMTP(r.smtp_host, r.smtp_port, timeout=r.timeout_seconds) as smtp:
                if r.starttls:
                    smtp.starttls(context=ssl.create_default_context(cafile=r.ca_file))
                if r.username and password is not None:
                    smtp.login(r.username, password)
                refused = smtp.send_message(self.message(payload))
        except smtplib.SMTPAuthenticationError as exc:
            raise NotificationError(
                f"{where}: login as {r.username!r} refused ({exc.smtp_code}); check the password in "
                f"${r.password_env}") from exc
        except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
            raise NotificationError(
                f"{where}: {type(exc).__name__}: {exc}; check the relay address, port and STARTTLS setting "
                "(the outbox will retry)") from exc
        if refused:
            raise NotificationError(f"{where}: the relay refused recipients {sorted(refused)}; fix routing 'to'")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Vigil-Signature`` value: ``sha256=`` + hex HMAC-SHA256 over ``timestamp`` + ``.`` + body."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(secret: str, body: bytes, timestamp: str | None, signature: str | None, *,
                     now: float | None = None, tolerance: float = DEFAULT_TOLERANCE_SECONDS) -> None:
    """For webhook receivers: raise ``SignatureError`` unless the request is authentic and fresh."""
    if not timestamp or not signature:
        raise SignatureError(f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header")
    try:
        sent = int(timestamp)
    except ValueError:
        raise SignatureError(f"{TIMESTAMP_HEADER} {timestamp!r} is not a Unix time in seconds") from None
    age = (time.time() if now is None else now) - sent
    if abs(age) > tolerance:
        raise SignatureError(f"{TIMESTAMP_HEADER} is {age:.0f} s from now (tolerance {tolerance:.0f} s): replay?")
    if not hmac.compare_digest(sign(secret, timestamp, body), signature):
        raise SignatureError(f"{SIGNATURE_HEADER} does not match the body: wrong secret or altered request")


def canonical_body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class WebhookNotifier:
    """``POST url`` with the JSON body, signed; any 2xx is success. ``delivery_id`` in the payload (set by the outbox)
    goes out as ``X-Vigil-Delivery`` so a receiver can drop the rare at-least-once duplicate."""

    def __init__(self, receiver: WebhookReceiver) -> None:
        self.name = receiver.name
        self.url = str(receiver.url)
        self.secret_env = receiver.secret_env
        self.timeout = receiver.timeout_seconds

    def send(self, payload: dict[str, Any]) -> None:
        secret = secret_from_env(self.secret_env, f"webhook receiver {self.name!r}")
        body = canonical_body(payload)
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: timestamp,
                   SIGNATURE_HEADER: sign(secret, timestamp, body)}
        if payload.get("delivery_id"):
            headers[DELIVERY_HEADER] = str(payload["delivery_id"])
        try:
            response = httpx.post(self.url, content=body, headers=headers, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise _http_error("webhook", self.name, self.url, exc) from exc
        if not response.is_success:
            raise _http_error("webhook", self.name, self.url, response)


class ChatNotifier:
    """A chat message through apprise (Slack ``slack://``, Teams ``workflow://``/``msteams://``, ``json://``, ...)."""

    def __init__(self, receiver: ChatReceiver) -> None:
        self.name = receiver.name
        self.receiver = receiver

    def _service(self) -> Any:
        r = self.receiver
        url = r.url if r.url is not None else secret_from_env(r.url_env or "", f"chat receiver {self.name!r}")
        service = apprise.Apprise.instantiate(url, suppress_exceptions=True)
        if service is None:
            source = f"${r.url_env}" if r.url_env else "its url"
            raise NotificationError(f"chat receiver {self.name!r}: {source} is not an apprise URL apprise can use "
                                    "(see https://github.com/caronc/apprise/wiki); fix routing.receivers")
        service.socket_connect_timeout = r.timeout_seconds
        service.socket_read_timeout = r.timeout_seconds
        return service

    def send(self, payload: dict[str, Any]) -> None:
        service = self._service()
        with apprise.LogCapture(level=apprise.logging.WARNING) as log:
            ok = service.notify(body=payload["body"], title=payload["title"])
            detail = " ".join(log.getvalue().split())[:300]
        if not ok:
            raise NotificationError(f"chat receiver {self.name!r} ({service.service_name}): not delivered: "
                                    f"{detail or 'no reason given'}; check the channel URL and that it is reachable "
                                    "(the outbox will retry)")


def notifier_for(receiver: AlertmanagerReceiver | EmailReceiver | WebhookReceiver | ChatReceiver) -> Notifier:
    """The notifier for a configured receiver."""
    if isinstance(receiver, AlertmanagerReceiver):
        return AlertmanagerNotifier(receiver)
    if isinstance(receiver, EmailReceiver):
        return EmailNotifier(receiver)
    if isinstance(receiver, WebhookReceiver):
        return WebhookNotifier(receiver)
    return ChatNotifier(receiver)
