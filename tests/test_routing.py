"""Routing: Alertmanager-style matchers, ordered routes with ``continue``, the default receiver, config validation."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from alerts.routing import Matcher, RoutingConfig, receivers_for

LABELS = {"model": "cta-stenosis", "model_version": "2.1.0", "metric": "fnr", "site": "hillcrest",
          "subgroup": "sex=female", "detector": "bernoulli_cusum", "severity": "critical", "state": "firing"}

RECEIVERS = [
    {"name": "am", "kind": "alertmanager", "url": "http://127.0.0.1:9093"},
    {"name": "safety", "kind": "email", "smtp_host": "smtp.example", "from": "vigil@example.org",
     "to": ["safety@example.org"]},
    {"name": "hillcrest-chat", "kind": "chat", "url_env": "VIGIL_HILLCREST_SLACK"},
    {"name": "eqms", "kind": "webhook", "url": "https://eqms.example/hook", "secret_env": "VIGIL_EQMS_SECRET"},
]


def config(routes: list[dict], default: str | None = "am", **extra) -> RoutingConfig:
    return RoutingConfig.model_validate({"receivers": RECEIVERS, "routes": routes, "default_receiver": default,
                                         **extra})


@pytest.mark.parametrize(("text", "labels_match", "other_site_matches"), [
    ('site="hillcrest"', True, False),
    ("site=hillcrest", True, False),
    ('site!="hillcrest"', False, True),
    ('site=~"hill.*"', True, False),
    ('site=~"hill"', False, False),         # anchored like Alertmanager: "hill" does not match "hillcrest"
    ('site!~"hill.*|st-.*"', False, False),
    ('subgroup=~"sex=.*"', True, True),
    ('severity=~"warning|critical"', True, True),
])
def test_matcher_operators_follow_alertmanager(text: str, labels_match: bool, other_site_matches: bool) -> None:
    matcher = Matcher.model_validate(text)
    assert matcher.matches(LABELS) is labels_match
    assert matcher.matches({**LABELS, "site": "st-marys"}) is other_site_matches


def test_matcher_parses_name_operator_and_unquoted_value() -> None:
    m = Matcher.model_validate('  metric !~ "fnr|fpr" ')
    assert (m.name, m.op, m.value) == ("metric", "!~", "fnr|fpr")
    assert not m.matches(LABELS)
    assert m.matches({**LABELS, "metric": "outcome_rate"})


@pytest.mark.parametrize(("text", "complaint"), [
    ("site", "is not 'label=value'"),
    ('patient="x"', "not an alert label"),
    ('site=~"(unclosed"', "not a valid regular expression"),
])
def test_bad_matchers_are_refused_with_the_reason(text: str, complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        Matcher.model_validate(text)


def test_first_matching_route_wins_without_continue() -> None:
    cfg = config([
        {"matchers": ['severity="critical"'], "receiver": "safety"},
        {"matchers": ['site="hillcrest"'], "receiver": "hillcrest-chat"},
    ])
    assert receivers_for(cfg, LABELS) == ["safety"]
    assert receivers_for(cfg, {**LABELS, "severity": "warning"}) == ["hillcrest-chat"]


def test_continue_lets_later_routes_add_receivers_each_once() -> None:
    cfg = config([
        {"matchers": [], "receiver": "am", "continue": True},
        {"matchers": ['severity="critical"'], "receiver": "safety", "continue": True},
        {"matchers": ['site=~"hill.*"'], "receiver": "hillcrest-chat", "continue": True},
        {"matchers": ['metric!="unmapped_rate"'], "receiver": "am"},
        {"matchers": [], "receiver": "eqms"},   # not reached: the route before matched without continue
    ])
    assert cfg.receivers_for(LABELS) == ["am", "safety", "hillcrest-chat"]
    assert cfg.receivers_for({**LABELS, "severity": "warning", "site": "st-marys", "metric": "unmapped_rate"}) == [
        "am", "eqms"]


def test_all_matchers_of_a_route_must_match() -> None:
    cfg = config([{"matchers": ['severity="critical"', 'site="st-marys"'], "receiver": "safety"}], default="eqms")
    assert receivers_for(cfg, LABELS) == ["eqms"]
    assert receivers_for(cfg, {**LABELS, "site": "st-marys"}) == ["safety"]


def test_default_receiver_only_when_no_route_matched() -> None:
    cfg = config([{"matchers": ['detector="ewma"'], "receiver": "hillcrest-chat", "continue": True}], default="am")
    assert receivers_for(cfg, LABELS) == ["am"]
    assert receivers_for(cfg, {**LABELS, "detector": "ewma"}) == ["hillcrest-chat"]
    assert receivers_for(config([], default=None), LABELS) == []


def test_unknown_receiver_names_are_refused_naming_the_place() -> None:
    with pytest.raises(ValidationError, match=r"routing.routes\[1\].receiver: receiver 'pager' is not defined"):
        config([{"receiver": "am"}, {"receiver": "pager"}])
    with pytest.raises(ValidationError, match="routing.escalation.receiver: receiver 'boss'"):
        config([], escalation={"after": "PT30M", "receiver": "boss"})
    with pytest.raises(ValidationError, match="names must be unique, repeated: am"):
        RoutingConfig.model_validate({"receivers": [RECEIVERS[0], RECEIVERS[0]]})


def test_receiver_settings_are_validated() -> None:
    with pytest.raises(ValidationError, match="exactly one of url or url_env"):
        RoutingConfig.model_validate({"receivers": [{"name": "c", "kind": "chat"}]})
    with pytest.raises(ValidationError, match="username given but no password_env"):
        RoutingConfig.model_validate({"receivers": [{**RECEIVERS[1], "username": "vigil"}]})
    with pytest.raises(ValidationError, match="lease"):
        RoutingConfig.model_validate({"receivers": [{**RECEIVERS[0], "timeout_seconds": 90}]})


def test_escalation_and_timings_parse_iso_durations() -> None:
    cfg = config([], escalation={"after": "PT30M", "receiver": "safety", "matchers": ['severity="critical"']},
                 resend_interval="PT2M")
    assert cfg.escalation is not None and cfg.escalation.after == timedelta(minutes=30)
    assert cfg.escalation.applies(LABELS) and not cfg.escalation.applies({**LABELS, "severity": "warning"})
    assert cfg.resend_interval == timedelta(minutes=2)
    assert cfg.receiver("safety").kind == "email"
