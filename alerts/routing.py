"""Who hears about an alert: receivers, Alertmanager-style routes, escalation and re-send timing (the ``routing:`` key).

Routes work like Prometheus Alertmanager's routing tree flattened to one ordered list
(https://prometheus.io/docs/alerting/latest/configuration/#route): each route has matchers in Alertmanager's syntax
(``label=value``, ``label!=value``, ``label=~regex``, ``label!~regex``; regexes are anchored at both ends, as in
Alertmanager), routes are tried in order, the first that matches takes the alert unless it says ``continue: true``,
and an alert no route takes goes to ``default_receiver``. Matchers see the labels of ``ALERT_LABELS``.

Secrets (SMTP password, webhook HMAC key, chat URLs with tokens) are never written in the file: the config names the
environment variable that holds them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from functools import cached_property
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator, model_validator

ALERT_LABELS = ("model", "model_version", "metric", "site", "subgroup", "detector", "severity", "state")
"""The labels routes match on; every alert has all of them (site and subgroup may be "all")."""

_MATCHER = re.compile(r'^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*$')


class Matcher(BaseModel):
    """One Alertmanager matcher: ``name op value``; written in YAML as the string ``'site="hosp-a"'``."""

    model_config = ConfigDict(frozen=True)

    name: str
    op: Literal["=", "!=", "=~", "!~"]
    value: str

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: object) -> object:
        if not isinstance(data, str):
            return data
        found = _MATCHER.match(data)
        if not found:
            raise ValueError(
                f"matcher {data!r} is not 'label=value', 'label!=value', 'label=~regex' or 'label!~regex' "
                f"(labels: {', '.join(ALERT_LABELS)})"
            )
        name, op, value = found.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        return {"name": name, "op": op, "value": value}

    @field_validator("name")
    @classmethod
    def _known_label(cls, name: str) -> str:
        if name not in ALERT_LABELS:
            raise ValueError(f"matcher label {name!r} is not an alert label; use one of {', '.join(ALERT_LABELS)}")
        return name

    @model_validator(mode="after")
    def _valid_regex(self) -> Matcher:
        if self.op in ("=~", "!~"):
            try:
                re.compile(self.value)
            except re.error as exc:
                raise ValueError(f"matcher {self}: {self.value!r} is not a valid regular expression ({exc})") from None
        return self

    @cached_property
    def _pattern(self) -> re.Pattern[str]:
        return re.compile(f"^(?:{self.value})$")

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Alertmanager semantics: a missing label is the empty string."""
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        found = self._pattern.match(actual) is not None
        return found if self.op == "=~" else not found

    def __str__(self) -> str:
        return f'{self.name}{self.op}"{self.value}"'


class _Receiver(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="what routes and escalation refer to")
    timeout_seconds: float = Field(10.0, gt=0, le=120, description="network timeout for one delivery attempt")


class AlertmanagerReceiver(_Receiver):
    """Prometheus Alertmanager, API v2 (``POST {url}/api/v2/alerts``)."""

    kind: Literal["alertmanager"]
    url: AnyHttpUrl = Field(..., description="Alertmanager base URL, e.g. http://alertmanager:9093")


class EmailReceiver(_Receiver):
    """An SMTP relay (RFC 5321); STARTTLS (RFC 3207) unless the relay is on a trusted loopback."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    kind: Literal["email"]
    smtp_host: str
    smtp_port: int = Field(587, ge=1, le=65535)
    starttls: bool = True
    ca_file: str | None = Field(None, description="PEM bundle to verify the relay's certificate (default: system CAs)")
    username: str | None = None
    password_env: str | None = Field(None, description="environment variable holding the SMTP password")
    from_: str = Field(..., alias="from", description="the sender address")
    to: list[str] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _password_with_username(self) -> EmailReceiver:
        if self.username and not self.password_env:
            raise ValueError(f"email receiver {self.name!r}: username given but no password_env to read the password")
        return self


class WebhookReceiver(_Receiver):
    """A generic JSON webhook signed with HMAC-SHA256 (RFC 2104) over the timestamp and the raw body."""

    kind: Literal["webhook"]
    url: AnyHttpUrl
    secret_env: str = Field(..., description="environment variable holding the HMAC key")


class ChatReceiver(_Receiver):
    """A chat channel (Slack, Microsoft Teams, Mattermost, ...) through an apprise URL
    (https://github.com/caronc/apprise).

    The URL carries the channel's token, so give it through ``url_env``; ``url`` is for token-less targets.
    """

    kind: Literal["chat"]
    url: str | None = None
    url_env: str | None = Field(None, description="environment variable holding the apprise URL")

    @model_validator(mode="after")
    def _one_url(self) -> ChatReceiver:
        if (self.url is None) == (self.url_env is None):
            raise ValueError(f"chat receiver {self.name!r}: give exactly one of url or url_env")
        return self


Receiver = Annotated[
    AlertmanagerReceiver | EmailReceiver | WebhookReceiver | ChatReceiver, Field(discriminator="kind")
]


class Route(BaseModel):
    """Alerts whose labels satisfy every matcher go to ``receiver``; ``continue`` lets later routes match too."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    matchers: list[Matcher] = Field(default_factory=list, description="all must match; none = match everything")
    receiver: str
    continue_: bool = Field(False, alias="continue")

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(m.matches(labels) for m in self.matchers)


class Escalation(BaseModel):
    """If a firing alert that these matchers select is not acknowledged within ``after``, tell ``receiver`` too."""

    model_config = ConfigDict(extra="forbid")

    after: timedelta = Field(..., gt=timedelta(0), description="ISO 8601 duration, e.g. PT30M")
    receiver: str
    matchers: list[Matcher] = Field(default_factory=list)

    def applies(self, labels: Mapping[str, str]) -> bool:
        return all(m.matches(labels) for m in self.matchers)


class Links(BaseModel):
    """Base URLs for the links in every notification; none of them carries an identifier, only stream and ids."""

    model_config = ConfigDict(extra="forbid")

    grafana_url: AnyHttpUrl | None = Field(None, description="Grafana base URL, e.g. https://grafana.example")
    grafana_dashboard: str = Field("vigil-control-charts", description="uid of the per-stream dashboard")
    vigil_url: AnyHttpUrl | None = Field(None, description="vigil API base URL, for alert and ticket links")


class Delivery(BaseModel):
    """Outbox retry policy: exponential backoff ``base · 2^(attempts-1)`` capped at ``max_backoff``."""

    model_config = ConfigDict(extra="forbid")

    backoff: timedelta = Field(timedelta(seconds=10), gt=timedelta(0))
    max_backoff: timedelta = Field(timedelta(minutes=10), gt=timedelta(0))
    lease: timedelta = Field(
        timedelta(minutes=2), gt=timedelta(0),
        description="how long a worker owns a claimed row; must exceed the slowest receiver's timeout",
    )
    batch: int = Field(50, ge=1, le=1000, description="rows claimed per pass")


class RoutingConfig(BaseModel):
    """The ``routing:`` section of vigil.yaml."""

    model_config = ConfigDict(extra="forbid")

    receivers: list[Receiver] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    default_receiver: str | None = Field(None, description="gets alerts no route takes; none = they are not sent")
    escalation: Escalation | None = None
    resend_interval: timedelta = Field(
        timedelta(minutes=1), gt=timedelta(0),
        description="re-send still-open alerts to Alertmanager this often (it expires alerts not re-sent)",
    )
    links: Links = Links()
    delivery: Delivery = Delivery()

    @model_validator(mode="after")
    def _receivers_exist(self) -> RoutingConfig:
        names = [r.name for r in self.receivers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"routing.receivers: names must be unique, repeated: {', '.join(duplicates)}")
        wanted = [(f"routing.routes[{i}].receiver", r.receiver) for i, r in enumerate(self.routes)]
        if self.default_receiver is not None:
            wanted.append(("routing.default_receiver", self.default_receiver))
        if self.escalation is not None:
            wanted.append(("routing.escalation.receiver", self.escalation.receiver))
        for where, name in wanted:
            if name not in names:
                raise ValueError(
                    f"{where}: receiver {name!r} is not defined; defined receivers: {', '.join(names) or 'none'}"
                )
        if self.delivery.max_backoff < self.delivery.backoff:
            raise ValueError("routing.delivery.max_backoff must be at least routing.delivery.backoff")
        slowest = max((r.timeout_seconds for r in self.receivers), default=0.0)
        if self.delivery.lease.total_seconds() <= 2 * slowest:
            raise ValueError(
                f"routing.delivery.lease ({self.delivery.lease}) must exceed twice the slowest receiver timeout "
                f"({slowest} s), or two workers could send the same notification"
            )
        return self

    def receiver(self, name: str) -> AlertmanagerReceiver | EmailReceiver | WebhookReceiver | ChatReceiver:
        for r in self.receivers:
            if r.name == name:
                return r
        raise KeyError(f"receiver {name!r} is not in routing.receivers ({', '.join(r.name for r in self.receivers)})")

    def receivers_for(self, labels: Mapping[str, str]) -> list[str]:
        """The receivers of an alert with these labels, in route order, each once."""
        return receivers_for(self, labels)


def receivers_for(config: RoutingConfig, labels: Mapping[str, str]) -> list[str]:
    """Walk the routes in order: a match adds its receiver and stops the walk unless ``continue``; if nothing
    matched, the default receiver (if any). Pure: same config and labels, same answer."""
    chosen: list[str] = []
    matched = False
    for route in config.routes:
        if route.matches(labels):
            matched = True
            if route.receiver not in chosen:
                chosen.append(route.receiver)
            if not route.continue_:
                break
    if not matched and config.default_receiver is not None:
        chosen.append(config.default_receiver)
    return chosen


def secret_from_env(variable: str, what: str) -> str:
    """Read a secret named in the config; fail saying which variable to set, never what it holds."""
    value = os.environ.get(variable)
    if not value:
        raise LookupError(f"{what}: environment variable {variable} is not set (it must hold the secret)")
    return value
