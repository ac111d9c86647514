"""The `[limits]` config section: defaults that limit nothing, per-listener values, validation, and the limiter the
process builds from it."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.core.metrics import CoreMetrics
from tidegate.gateway.app import build_limiter
from tidegate.gateway.config import ConfigError, load_config, parse_set_option


def config_with(*settings: str, environ: dict[str, str] | None = None):
    return load_config(environ=environ or {}, overrides=[parse_set_option(s) for s in settings]).config


def test_defaults_limit_nothing():
    """Nothing but the MQTT listener's topic creation per user (10,000: `[listeners.mqtt]
    max_topics_created_per_user`, as before that limit moved into the core)."""
    from tidegate.core.security.limits import LimitSettings

    limiter = build_limiter(config_with(), MemoryReactorClock(), None, CoreMetrics())
    assert not limiter.settings.any
    assert all(not limiter.for_listener(name).any for name in ("native", "amqp"))
    assert limiter.for_listener("mqtt") == LimitSettings(max_topics_created_per_user=10_000)


def test_section_listener_values_and_environment_reach_the_limiter():
    config = config_with("limits.publish_rate=100", "limits.max_connections_per_source=50",
                         "limits.mqtt.max_connections_per_source=5",
                         environ={"TIDEGATE_LIMITS__AMQP__MAX_SUBSCRIPTIONS_PER_SESSION": "7"})
    limiter = build_limiter(config, MemoryReactorClock(), None, CoreMetrics())
    assert limiter.settings.publish_rate == 100
    assert limiter.for_listener("mqtt").max_connections_per_source == 5
    assert limiter.for_listener("native").max_connections_per_source == 50  # -1 = as [limits]
    assert limiter.for_listener("amqp").max_subscriptions_per_session == 7
    assert limiter.for_listener("amqp").publish_rate == 100


@pytest.mark.parametrize("setting, words", [
    ("limits.publish_rate=-1", "limits.publish_rate must be at least 0"),
    ("limits.mqtt.max_connections_per_source=-2", "limits.mqtt.max_connections_per_source must be at least -1"),
    ("limits.max_tracked_sources=0", "limits.max_tracked_sources must be at least 1"),
    ("limits.mqtt.publish_rate=5", "publish_rate"),  # rates are per user over every protocol: [limits] only
])
def test_bad_values_are_refused_naming_the_key(setting, words):
    with pytest.raises(ConfigError, match=words):
        config_with(setting)
