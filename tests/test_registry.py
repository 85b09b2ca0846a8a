"""The Registry behind every extension point, and lazy package exports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from zoomgym.registry import Registry


def test_registry_registers_iterates_and_rejects_duplicates():
    registry = Registry("widget")

    @registry.register("alpha")
    def alpha():
        return 1

    assert registry.lookup("alpha") is alpha
    assert list(registry) == ["alpha"] and len(registry) == 1 and "alpha" in registry
    with pytest.raises(ValueError, match="already registered"):
        registry.register("alpha")(lambda: 2)
    assert registry.lookup("alpha") is alpha  # the first registration survives
    with pytest.raises(TypeError):
        registry.register("")


def test_registry_unknown_name_lists_known_and_suggests():
    registry = Registry("widget")
    registry.register("alpha")(lambda: 1)
    registry.register("beta")(lambda: 2)
    with pytest.raises(
        ValueError, match=r"widget name in \['alpha', 'beta'\].*'alhpa'.*Did you mean 'alpha'"
    ):
        registry.lookup("alhpa")
    with pytest.raises(ValueError) as info:
        registry.lookup("zzzzzz")
    assert "Did you mean" not in str(info.value) and "'alpha', 'beta'" in str(info.value)


def test_registry_resolves_lazy_entries_on_first_lookup():
    registry = Registry("widget")
    registry.register("join", "os.path:join")
    import os.path

    assert "join" in registry and registry.lookup("join") is os.path.join and registry["join"] is os.path.join
    with pytest.raises(KeyError):
        registry["missing"]
    assert registry.pop("join") is os.path.join and "join" not in registry


def test_lazy_exports_import_on_first_use():
    code = ("import sys; from zoomgym import agents; import zoomgym.agents.models; assert 'torch' not in sys.modules; "
            "agents.OracleAgent; agents.models.TINY_SIZES; assert 'torch' not in sys.modules; "
            "assert 'LMMAgent' in dir(agents); print(agents.models.adapter_for.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "zoomgym.agents.models.qwen"
    from zoomgym import agents

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        agents.Nope  # noqa: B018
