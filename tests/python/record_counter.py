"""How many calls took the full path: counts record_call, which only the full path runs."""

import pytest

import cudnn_flex
from cudnn_flex import api
from cudnn_flex import record_call as _record_call_module


def count_records(monkeypatch, *modules) -> list:
    """Replaces record_call where each module looks it up by a wrapper that counts its calls;
    returns the one-element list holding the count."""
    count = [0]
    real = _record_call_module.record_call

    def counted(*args):
        count[0] += 1
        return real(*args)

    for module in modules:
        monkeypatch.setattr(module, "record_call", counted)
    return count


@pytest.fixture
def records(monkeypatch):
    """How many flex_attention calls took the full path (recorded their mods) since the fixture
    started, in records[0]; the caches start empty."""
    count = count_records(monkeypatch, api)
    cudnn_flex.clear_cache()
    return count
