"""A broken or incompatible plugin is reported by name, package and cause; the others still load.

In-process counterparts of the installed-package test in test_plugin_authoring.py: plugin modules
are real files in tmp_path, loaded through ``$LMFORGE_PLUGINS`` or fake entry points.
"""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest

from lmforge import MIN_SUPPORTED_API_VERSION, PLUGIN_API_VERSION, Architecture, LmforgeError, hookimpl
from lmforge import plugin_manager
from lmforge.cli import main
from lmforge.plugin_manager import create_registry, get_registry, summarize_traceback


def entry_point(name: str, module: types.ModuleType, package: str, version: str = "1.0"):
    return SimpleNamespace(
        name=name, value=module.__name__, dist=SimpleNamespace(name=package, version=version), load=lambda: module
    )


def versioned(name: str, api_version) -> types.ModuleType:
    module = types.ModuleType(f"{name}_module")
    attrs = {"name": name, "families": ("decoder",), "api_version": api_version, "__module__": module.__name__}
    arch = type(name.title(), (Architecture,), attrs)
    module.lmforge_architectures = hookimpl(lambda: [arch])
    return module


@pytest.fixture
def broken_modules(tmp_path, monkeypatch):
    """Three plugin modules on LMFORGE_PLUGINS: one fails deep in an import, one in its hook, one works."""
    (tmp_path / "iso_deep.py").write_text("import iso_helper  # line 1\n")
    (tmp_path / "iso_helper.py").write_text("x = 1\n\n\nraise RuntimeError('GPU kernels not built')  # line 4\n")
    (tmp_path / "iso_hook.py").write_text(
        "from lmforge import hookimpl\n\n@hookimpl\ndef lmforge_objectives():\n    return [undefined_name]  # line 5\n"
    )
    (tmp_path / "iso_fine.py").write_text(
        "from lmforge import Objective, hookimpl\n\n"
        "class Fine(Objective):\n    name = 'iso_fine'\n    families = ('decoder',)\n\n"
        "@hookimpl\ndef lmforge_objectives():\n    return [Fine]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LMFORGE_PLUGINS", "iso_deep,iso_hook,iso_fine")
    yield tmp_path
    for name in ("iso_deep", "iso_helper", "iso_hook", "iso_fine"):
        sys.modules.pop(name, None)


def test_a_failed_import_keeps_the_last_frames_of_the_plugin_code(broken_modules):
    registry = get_registry()
    assert registry.get("objective", "iso_fine").source.module == "iso_fine"  # the others still load
    broken = {b.source.module: b for b in registry.broken}
    deep = broken["iso_deep"]
    assert deep.reason == "RuntimeError: GPU kernels not built"
    assert deep.frames == ("iso_deep.py:1 in <module>", "iso_helper.py:4 in <module>")  # no importlib frames
    assert deep.one_line() == "RuntimeError: GPU kernels not built (at iso_helper.py:4)"
    assert "Traceback (most recent call last)" in deep.details  # the whole traceback is kept too
    hook = broken["iso_hook"]
    assert hook.reason == "NameError: name 'undefined_name' is not defined"
    assert hook.frames == ("iso_hook.py:5 in lmforge_objectives",)
    with pytest.raises(
        LmforgeError,
        match=r"Error loading plugin module 'iso_deep' of package '\$LMFORGE_PLUGINS -'"
        r": RuntimeError: GPU kernels not built",
    ):
        registry.get("architecture", "iso_deep")


def test_plugins_list_shows_broken_modules_with_a_one_line_reason_and_json_traceback(broken_modules, capsys):
    assert main(["plugins", "list"]) == 0
    captured = capsys.readouterr()
    lines = {line.split()[0]: line for line in captured.out.splitlines()[1:]}
    assert lines["iso_deep"].endswith("broken: RuntimeError: GPU kernels not built (at iso_helper.py:4)")
    assert "iso_fine" in lines and lines["gpt"].split()[-1] == "ok"
    assert "2 plugin module(s) failed to load" in captured.err
    assert main(["plugins", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["iso_deep"]["traceback"] == ["iso_deep.py:1 in <module>", "iso_helper.py:4 in <module>"]
    assert rows["iso_deep"]["status"] == "broken: RuntimeError: GPU kernels not built"
    assert rows["iso_hook"]["package"] == "$LMFORGE_PLUGINS" and rows["iso_hook"]["module"] == "iso_hook"
    assert "traceback" not in rows["iso_fine"]  # healthy rows keep their shape


def test_traceback_summary_is_limited_to_the_last_frames():
    def a():
        b()

    def b():
        c()

    def c():
        raise ValueError("deep")

    try:
        a()
    except ValueError as exc:
        frames = summarize_traceback(exc, limit=2)
    assert [f.split(" in ")[1] for f in frames] == ["b", "c"]
    assert frames[-1].startswith("tests/test_plugin_isolation.py:") or frames[-1].startswith(
        "test_plugin_isolation.py:"
    )


@pytest.mark.parametrize(
    "api_version, fix",
    [
        (PLUGIN_API_VERSION + 1, "Upgrade lmforge"),
        (MIN_SUPPORTED_API_VERSION - 1, "Upgrade the plugin to the current contract"),
        ("1", "Set `api_version` to an integer"),
    ],
)
def test_an_incompatible_api_version_names_the_plugin_its_package_and_both_versions(api_version, fix):
    eps = [
        entry_point("ok", versioned("current", PLUGIN_API_VERSION), "current-pkg"),
        entry_point("bad", versioned("outdated", api_version), "outdated-pkg", "3.2"),
    ]
    registry = create_registry(entry_points=eps, extra_modules=[])
    assert registry.get("architecture", "current").source.package == "current-pkg"
    [broken] = registry.broken
    assert broken.names == ("outdated",)
    expected = (
        f"The architecture 'outdated' (outdated_module.Outdated) from package 'outdated-pkg 3.2' targets plugin API "
        f"version {api_version!r}, but lmforge 0.1.0 supports plugin API version {PLUGIN_API_VERSION}. {fix}"
    )
    assert broken.reason.startswith(expected), broken.reason
    # using it by name is an error that says why, not "unknown architecture"
    with pytest.raises(
        LmforgeError,
        match=r"Error loading plugin module 'outdated_module' of package 'outdated-pkg 3\.2'"
        r".*targets plugin API version",
    ):
        registry.get("architecture", "outdated")


def test_an_incompatible_plugin_is_listed_as_broken(monkeypatch, capsys):
    eps = [entry_point("bad", versioned("future_thing", 7), "future-pkg", "0.9")]
    monkeypatch.setattr(plugin_manager, "_registry", create_registry(entry_points=eps, extra_modules=[]))
    monkeypatch.setattr(plugin_manager, "_registry_env", "")
    monkeypatch.delenv("LMFORGE_PLUGINS", raising=False)
    assert main(["plugins", "list", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["name"] == "future_thing" and row["package"] == "future-pkg" and row["version"] == "0.9"
    assert row["status"].startswith("broken: The architecture 'future_thing'") and "version 7" in row["status"]
    assert row["traceback"] == []  # refused by lmforge, not an exception in the plugin's code
