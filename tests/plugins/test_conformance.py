"""Every registered plugin passes the conformance check (``lmforge plugins check``).

Parametrized over the registry, so a plugin added to lmforge (or installed beside it) is checked
without touching this file.
"""

from __future__ import annotations

import pytest

from lmforge.plugin_manager import get_registry
from lmforge.testing import check_plugin

PLUGINS = get_registry().all()


@pytest.mark.parametrize("info", PLUGINS, ids=[f"{i.kind}-{i.name}" for i in PLUGINS])
def test_plugin_conforms(info):
    report = check_plugin(info.cls)
    assert report.ok, "\n" + report.format_table()
    assert report.name == info.name and report.package == info.source.package
    checked = {r.check for r in report.results if r.status == "pass"}
    assert {"registration", "build from defaults", "options rebuild the plugin"} <= checked
    # every family it claims appears in the report: checked, or skipped with the reason
    assert set(info.families) <= {r.family for r in report.results}


def test_the_builtin_decoder_pair_is_checked_in_full():
    """gpt and clm have partners, so nothing about them is skipped."""
    for name in ("gpt", "clm"):
        report = check_plugin(name)
        assert report.ok and report.count("skip") == 0, report.format_table()
    gpt = {r.check for r in check_plugin("gpt").results}
    assert {"Hugging Face name map", "Hugging Face config", "cached generation", "every parameter trained"} <= gpt
