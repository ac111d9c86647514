"""Property tests carry no timing assumption (tests/conftest.py): a busy CI runner cannot fail them by slowness."""

from hypothesis import HealthCheck, settings


def test_property_tests_have_no_deadline_and_no_too_slow_check():
    assert settings.default.deadline is None
    assert HealthCheck.too_slow in settings.default.suppress_health_check
