"""glibc malloc settings at start (`process.malloc_*`, gateway/memory_tuning.py): each setting above 0 becomes one
mallopt call, 0 leaves glibc's dynamic default, a refused call is reported and skipped, no glibc means nothing is
changed and nothing fails; the configuration validates the values and `tidegate serve` applies them at start."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from tidegate.gateway.config import ConfigError, ProcessSection, load_config, parse_set_option
from tidegate.gateway.memory_tuning import (
    M_MMAP_THRESHOLD,
    M_TOP_PAD,
    M_TRIM_THRESHOLD,
    MAX_MMAP_THRESHOLD_BYTES,
    find_mallopt,
    tune_malloc,
)
from tidegate.gateway.testing import BrokerProcess


def recording_mallopt(result: int = 1):
    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return result

    return calls, mallopt


def test_each_setting_above_zero_is_one_mallopt_call_with_its_value() -> None:
    calls, mallopt = recording_mallopt()
    settings = ProcessSection(malloc_trim_threshold_bytes=1 << 26, malloc_top_pad_bytes=1 << 24,
                              malloc_mmap_threshold_bytes=1 << 23)
    applied = tune_malloc(settings, find=lambda: mallopt)
    assert calls == [(M_TRIM_THRESHOLD, 1 << 26), (M_TOP_PAD, 1 << 24), (M_MMAP_THRESHOLD, 1 << 23)]
    assert applied == {"M_TRIM_THRESHOLD": 1 << 26, "M_TOP_PAD": 1 << 24, "M_MMAP_THRESHOLD": 1 << 23}


def test_zero_keeps_glibcs_dynamic_default_and_all_zero_does_not_even_look_for_glibc() -> None:
    calls, mallopt = recording_mallopt()
    assert tune_malloc(ProcessSection(malloc_trim_threshold_bytes=0, malloc_top_pad_bytes=4096,
                                      malloc_mmap_threshold_bytes=0), find=lambda: mallopt) == {"M_TOP_PAD": 4096}
    assert calls == [(M_TOP_PAD, 4096)]

    def must_not_look() -> None:
        raise AssertionError("looked for mallopt with nothing to set")

    none = ProcessSection(malloc_trim_threshold_bytes=0, malloc_top_pad_bytes=0, malloc_mmap_threshold_bytes=0)
    assert tune_malloc(none, find=must_not_look) == {}


def test_the_mmap_threshold_is_capped_at_what_glibc_accepts() -> None:
    calls, mallopt = recording_mallopt()
    tune_malloc(ProcessSection(malloc_trim_threshold_bytes=0, malloc_top_pad_bytes=0,
                               malloc_mmap_threshold_bytes=1 << 30), find=lambda: mallopt)
    assert calls == [(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD_BYTES)]


def test_a_refused_setting_is_logged_and_left_out(caplog) -> None:
    calls, mallopt = recording_mallopt(result=0)
    with caplog.at_level("WARNING", logger="tidegate.process"):
        assert tune_malloc(ProcessSection(), find=lambda: mallopt) == {}
    assert len(calls) == 3 and "refused" in caplog.text


def test_without_glibc_nothing_is_changed_and_nothing_fails(caplog) -> None:
    with caplog.at_level("INFO", logger="tidegate.process"):
        assert tune_malloc(ProcessSection(), find=lambda: None) == {}
    assert "skipped" in caplog.text


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_on_linux_with_glibc_the_real_mallopt_accepts_the_defaults() -> None:
    assert find_mallopt() is not None
    defaults = ProcessSection()
    assert tune_malloc(defaults) == {"M_TRIM_THRESHOLD": defaults.malloc_trim_threshold_bytes,
                                     "M_TOP_PAD": defaults.malloc_top_pad_bytes,
                                     "M_MMAP_THRESHOLD": defaults.malloc_mmap_threshold_bytes}


def test_the_configuration_has_defaults_and_refuses_negative_or_oversized_values() -> None:
    config = load_config(environ={}).config
    assert config.process.malloc_trim_threshold_bytes == 64 * 1024 * 1024
    assert config.process.malloc_top_pad_bytes == 16 * 1024 * 1024
    assert config.process.malloc_mmap_threshold_bytes == 8 * 1024 * 1024
    assert load_config(environ={}, overrides=[parse_set_option("process.malloc_top_pad_bytes=0")]
                       ).config.process.malloc_top_pad_bytes == 0
    for bad in ("-1", str(2**31)):
        with pytest.raises(ConfigError, match="process.malloc_trim_threshold_bytes"):
            load_config(environ={}, overrides=[parse_set_option(f"process.malloc_trim_threshold_bytes={bad}")])


def test_the_log_page_cache_setting_is_off_by_default_and_refuses_negative_values() -> None:
    assert load_config(environ={}).config.storage.log_page_cache_bytes == 0  # the OS decides unless asked
    assert load_config(environ={}, overrides=[parse_set_option("storage.log_page_cache_bytes=268435456")]
                       ).config.storage.log_page_cache_bytes == 256 * 1024 * 1024
    with pytest.raises(ConfigError, match="storage.log_page_cache_bytes"):
        load_config(environ={}, overrides=[parse_set_option("storage.log_page_cache_bytes=-1")])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_serve_applies_the_malloc_settings_at_start_and_says_so(tmp_path: Path) -> None:
    process = BrokerProcess(tmp_path / "data", "--set", "process.malloc_top_pad_bytes=0", "--log-level", "info",
                            log_path=tmp_path / "serve.log").spawn()
    try:
        process.wait_for_listeners()  # the malloc line is logged before the listeners start
        line = next(li for li in process.log().splitlines() if "malloc:" in li)
        assert "M_TRIM_THRESHOLD=67108864" in line and "M_MMAP_THRESHOLD=8388608" in line
        assert "M_TOP_PAD" not in line
    finally:
        assert process.stop() == 0, process.log()
