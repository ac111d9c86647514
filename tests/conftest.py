"""Settings every test under tests/ shares."""

from hypothesis import HealthCheck, settings

# Property tests must not depend on how busy the machine is: Hypothesis's default 200 ms deadline per example and its
# "too slow" health check turn a loaded CI runner (2 cores, brokers of other tests running) into failures unrelated
# to the property checked. Tests that set their own settings keep them; this is the default for the rest.
settings.register_profile("tidegate", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tidegate")
