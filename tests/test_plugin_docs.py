"""docs/plugins.md cannot drift from the code, and every hook is documented and tested.

As in datasette: the hooks are enumerated from the plugin manager (``dir(pm.hook)``), so a hook
added to lmforge/hookspecs.py without documentation or without a ``test_hook_<name>`` here fails.
"""

from __future__ import annotations

import types
from types import SimpleNamespace

import pytest

from lmforge import Architecture, Objective, Task, hookimpl
from lmforge.docs_gen import BEGIN, DEFAULT_DOC, END, generated_part, hook_names, render_reference
from lmforge.plugin_manager import create_registry
from lmforge.testing import check_plugin

DOC = DEFAULT_DOC.read_text(encoding="utf-8")


def test_committed_reference_is_the_generated_one():
    assert BEGIN in DOC and END in DOC
    assert generated_part(DOC) == render_reference(), (
        "docs/plugins.md is out of date with lmforge/hookspecs.py or lmforge/plugin_api.py: "
        "run `python -m lmforge.docs_gen` and commit the result"
    )


def test_hook_names_come_from_the_plugin_manager():
    assert hook_names() == ["lmforge_architectures", "lmforge_objectives", "lmforge_tasks"]


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_documented(hook):
    from lmforge import hookspecs

    assert (getattr(hookspecs, hook).__doc__ or "").strip(), f"hookspecs.{hook} has no docstring"
    assert f"#### `{hook}(" in generated_part(DOC), f"{hook} is missing from docs/plugins.md"


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_has_a_test(hook):
    assert callable(globals().get(f"test_hook_{hook}")), f"add test_hook_{hook} to {__file__}"


def test_the_guide_explains_every_check_the_report_can_show():
    class Echo(Task):
        name = "echo_doc"
        families = ("decoder",)

        def predict_step(self, module, batch):
            return batch

    names = {r.check for name in ("gpt", "clm", Echo) for r in check_plugin(name).results if r.status == "pass"}
    guide = DOC.split(BEGIN)[0]
    missing = sorted(n for n in names if n not in guide)
    assert not missing, f"docs/plugins.md does not explain the checks {missing}"


def test_the_guide_names_the_commands_it_walks_through():
    from lmforge.cli import HELP

    for command in ("lmforge plugins new", "lmforge plugins check", "lmforge plugins list", "--partner", "--json"):
        assert command in DOC
    assert "lmforge plugins new NAME --kind architecture|objective|task" in HELP


# -- one test per hook: what a module's implementation provides is registered ----------------------
def _registry_with(hook_name: str, returned: list):
    module = types.ModuleType(f"doc_{hook_name}")
    setattr(module, hook_name, hookimpl(lambda: returned))
    ep = SimpleNamespace(
        name="x", value=module.__name__, dist=SimpleNamespace(name="doc-pkg", version="1.2"), load=lambda: module
    )
    return create_registry(entry_points=[ep], extra_modules=[])


def _check_hook(hook_name: str, kind: str, base: type) -> None:
    plugin = type("Documented", (base,), {"name": f"doc_{kind}", "families": ("decoder",)})
    registry = _registry_with(hook_name, [plugin])
    info = registry.get(kind, f"doc_{kind}")
    assert info.cls is plugin and info.source.package == "doc-pkg" and info.source.version == "1.2"
    wrong = _registry_with(hook_name, [object])
    assert f"its {hook_name} hook returned <class 'object'>, which is not a subclass of lmforge.{base.__name__}" in (
        wrong.broken[0].reason
    )
    assert not _registry_with(hook_name, []).broken  # providing nothing is allowed


def test_hook_lmforge_architectures():
    _check_hook("lmforge_architectures", "architecture", Architecture)


def test_hook_lmforge_objectives():
    _check_hook("lmforge_objectives", "objective", Objective)


def test_hook_lmforge_tasks():
    _check_hook("lmforge_tasks", "task", Task)
