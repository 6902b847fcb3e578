"""Plugin discovery and every plugin error, checked by message."""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest

from lmforge import Architecture, LmforgeError, Objective, hookimpl
from lmforge.cli import main
from lmforge.plugin_manager import create_registry, get_registry


def fake_entry_point(name: str, module: types.ModuleType | Exception, package: str, version: str = "1.0"):
    """An object shaped like importlib.metadata.EntryPoint whose load() returns (or raises) ``module``."""

    def load():
        if isinstance(module, Exception):
            raise module
        return module

    value = module.__name__ if isinstance(module, types.ModuleType) else f"{package}.broken"
    return SimpleNamespace(name=name, value=value, dist=SimpleNamespace(name=package, version=version), load=load)


def plugin_module(module_name: str, plugin_name: str, families=("decoder",)) -> types.ModuleType:
    """A module whose hook provides one architecture called ``plugin_name``."""
    module = types.ModuleType(module_name)
    arch = type(plugin_name.title(), (Architecture,), {"name": plugin_name, "families": families})

    @hookimpl
    def lmforge_architectures():
        return [arch]

    module.lmforge_architectures = lmforge_architectures
    return module


def test_builtins_are_found_through_the_entry_point_group():
    registry = get_registry()
    gpt = registry.get("architecture", "gpt")
    clm = registry.get("objective", "clm")
    assert gpt.source.package == "lmforge" and clm.source.package == "lmforge"
    assert gpt.cls.__module__ == "lmforge_plugins.architectures.gpt"
    assert gpt.families == ("decoder",)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(LmforgeError, match=r"Unknown architecture 'gtp'\. Did you mean 'gpt'\?"):
        get_registry().get("architecture", "gtp")
    with pytest.raises(LmforgeError, match=r"Unknown objective 'clmm'\. Did you mean 'clm'( or 'mlm')?\?"):
        get_registry().get("objective", "clmm")


def test_duplicate_entry_point_names_both_packages():
    """pluggy alone would silently keep the first of two entry points with one name."""
    eps = [
        fake_entry_point("shared", plugin_module("pkg_a.mod", "alpha"), "pkg-a", "1.0"),
        fake_entry_point("shared", plugin_module("pkg_b.mod", "beta"), "pkg-b", "2.0"),
    ]
    registry = create_registry(entry_points=eps, extra_modules=[])
    with pytest.raises(LmforgeError, match=r"entry point name 'shared' is provided twice: by .*pkg-a 1\.0.* and by .*pkg-b 2\.0"):
        registry.raise_errors()


def test_duplicate_plugin_names_both_packages():
    eps = [
        fake_entry_point("a", plugin_module("pkg_a.mod", "same"), "pkg-a"),
        fake_entry_point("b", plugin_module("pkg_b.mod", "same"), "pkg-b"),
    ]
    registry = create_registry(entry_points=eps, extra_modules=[])
    with pytest.raises(LmforgeError, match=r"architecture name 'same' is provided twice: by .*'pkg-a 1\.0'.* and by .*'pkg-b 1\.0'"):
        registry.get("architecture", "same")


def test_failed_import_is_named_with_its_package_and_does_not_stop_the_others():
    eps = [
        fake_entry_point("ok", plugin_module("good.mod", "fine"), "good-pkg"),
        fake_entry_point("broken", ModuleNotFoundError("No module named 'torch_extra'"), "bad-pkg", "0.2"),
    ]
    registry = create_registry(entry_points=eps, extra_modules=[])
    assert registry.get("architecture", "fine").source.package == "good-pkg"
    assert len(registry.broken) == 1
    with pytest.raises(LmforgeError, match=r"Error loading plugin .*'bad-pkg 0\.2'.*ModuleNotFoundError: No module named 'torch_extra'"):
        registry.get("architecture", "broken")


def test_plugin_class_without_families_is_reported_broken():
    eps = [fake_entry_point("x", plugin_module("x.mod", "nofam", families=()), "x-pkg")]
    registry = create_registry(entry_points=eps, extra_modules=[])
    assert "families must be a non-empty subset" in registry.broken[0].reason
    assert "nofam" not in registry.plugins["architecture"]


def test_incompatible_api_version_is_refused():
    module = types.ModuleType("old.mod")
    arch = type("Old", (Architecture,), {"name": "old", "families": ("decoder",), "api_version": 99})
    module.lmforge_architectures = hookimpl(lambda: [arch])
    registry = create_registry(entry_points=[fake_entry_point("old", module, "old-pkg")], extra_modules=[])
    assert "targets plugin API version 99" in registry.broken[0].reason


def test_env_var_modules_are_loaded(monkeypatch, tmp_path):
    (tmp_path / "my_env_plugin.py").write_text(
        "from lmforge import Objective, hookimpl\n"
        "class Shout(Objective):\n    name = 'shout'\n    families = ('decoder',)\n"
        "@hookimpl\ndef lmforge_objectives():\n    return [Shout]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LMFORGE_PLUGINS", "my_env_plugin")
    info = get_registry().get("objective", "shout")
    assert info.source.package == "$LMFORGE_PLUGINS"
    monkeypatch.delenv("LMFORGE_PLUGINS")
    with pytest.raises(LmforgeError, match="Unknown objective 'shout'"):
        get_registry().get("objective", "shout")
    sys.modules.pop("my_env_plugin", None)


def test_family_that_a_plugin_does_not_support_is_refused_before_compute():
    from lmforge.families import DecoderLM
    from lmforge_plugins.architectures.gpt import GPT

    class EncoderOnly(Objective):
        name = "encoder_only"
        families = ("encoder",)

    with pytest.raises(LmforgeError, match=r"objective 'encoder_only' does not support the decoder family; it supports encoder"):
        DecoderLM(architecture=GPT(vocab_size=10, n_layer=1, d_model=8, n_head=2), objective=EncoderOnly())


def test_plugins_list_json_and_table(capsys):
    assert main(["plugins", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert by_name["gpt"] == {
        "name": "gpt", "kind": "architecture", "families": ["decoder"], "package": "lmforge",
        "version": by_name["gpt"]["version"], "status": "ok",
    }
    assert by_name["clm"]["kind"] == "objective"
    assert main(["plugins", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["name", "kind", "families", "package", "version", "status"]
    assert any(line.split()[:3] == ["gpt", "architecture", "decoder"] for line in table)
