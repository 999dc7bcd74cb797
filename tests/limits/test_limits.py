"""Tests for llmbatch.limits._config: the limits of a quota (:class:`Limits`) and what they
allow in requests."""

from __future__ import annotations

from typing import Any

import pytest

from llmbatch.limits import Limits, refunds, request_burst, request_rate


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rpm": 0}, "Limits.rpm must be positive"),
        ({"tpm": -5}, "Limits.tpm must be positive"),
        ({"max_concurrency": 0}, "max_concurrency must be >= 1"),
        ({"initial_fill": 1.5}, "initial_fill must be within"),
        ({"headroom": 0.9}, "headroom must be within"),
    ],
)
def test_limits_validation(kwargs: dict[str, Any], message: str) -> None:
    """Nonsensical limits are refused when built."""
    with pytest.raises(ValueError, match=message):
        Limits(**kwargs)


def test_limits_auto_and_copy() -> None:
    """auto() learns from headers with AIMD; copy() tweaks without mutating."""
    auto = Limits.auto(max_concurrency=16)
    assert (True, True, 16) == (auto.learn, auto.aimd, auto.max_concurrency)
    tweaked = auto.copy(rpm=100)
    assert (None, 100) == (auto.rpm, tweaked.rpm)


@pytest.mark.parametrize(
    ("configured", "provider_rule", "expected"),
    [
        (None, True, True),  # the provider refunds (Anthropic)
        (None, False, False),  # the provider keeps its reservation (OpenAI)
        (None, None, False),  # no rule given: nothing comes back
        (False, True, False),  # Limits.refund_unused=False wins
        (True, False, True),  # Limits.refund_unused=True wins
    ],
)
def test_refunds_follow_the_providers_rule_unless_configured(
    configured: bool | None, provider_rule: bool | None, expected: bool
) -> None:
    """The unused part of a reservation comes back by the provider's rule, unless
    Limits.refund_unused decides."""
    assert expected == refunds(Limits(refund_unused=configured), provider_rule)


@pytest.mark.parametrize(
    ("limits", "mean_cost", "rate", "burst"),
    [
        ({"rpm": 600}, {}, 10.0, 600.0),
        ({"rpm": 600, "tpm": 60_000}, {"tokens": 1_000}, 1.0, 60.0),  # tokens bind
        ({"tpm": 60_000}, {}, None, 0.0),  # no cost known: no pace from tokens
        ({"rpm": 600, "rpd": 100}, {}, 10.0, 600.0),  # a day's limit is a budget
        ({}, {"tokens": 10}, None, 0.0),
    ],
)
def test_what_limits_allow_in_requests(
    limits: dict[str, float], mean_cost: dict[str, float], rate: float | None, burst: float
) -> None:
    """request_rate(): requests per second the per-minute limits allow at a mean cost;
    request_burst(): requests the per-minute buckets hold at once (here: full ones)."""
    assert rate == request_rate(limits, mean_cost)
    assert burst == request_burst(limits, mean_cost)
