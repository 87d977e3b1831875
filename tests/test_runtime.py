"""keep_freed_memory: glibc malloc keeps freed memory, unless the user chose otherwise."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from forecast_peft import runtime

GLIBC = sys.platform.startswith("linux") and "libc.so.6" in (ctypes.util.find_library("c") or "")


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(runtime.os.environ):
        if key.startswith("MALLOC_") or key in ("LD_PRELOAD", runtime.OPT_OUT):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_applies_on_glibc(clean_env):
    assert runtime._apply() is True


@pytest.mark.parametrize(
    "key, value", [(runtime.OPT_OUT, "1"), ("MALLOC_ARENA_MAX", "2"), ("LD_PRELOAD", "/usr/lib/libjemalloc.so")]
)
def test_leaves_malloc_alone_when_the_user_chose(clean_env, key, value):
    clean_env.setenv(key, value)
    assert runtime._apply() is False


def test_opting_out_with_zero_means_not_opting_out(clean_env):
    clean_env.setenv(runtime.OPT_OUT, "0")
    assert runtime._apply() is GLIBC
