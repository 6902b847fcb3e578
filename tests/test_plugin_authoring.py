"""Plugin authoring end to end: scaffold each kind, pip-install, list, check, train; a broken plugin.

`lmforge plugins new` writes three packages into tmp_path; they are installed, together with a
deliberately broken package (one module fails to import, one targets a future plugin API), into a
temporary --target directory, and every command runs in a subprocess with that directory on
PYTHONPATH: exactly how an installed package is found.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import packed_rows, tiny_config, write_config
from tokenizers import Tokenizer

from lmforge.cli import main

KINDS = {"architecture": "conv_lm", "objective": "smooth_lm", "task": "scorer"}

BROKEN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "lmforge-broken-example"
version = "0.0.7"

[project.entry-points.lmforge]
broken = "lmforge_broken_example.broken"
future = "lmforge_broken_example.future"

[tool.setuptools]
packages = ["lmforge_broken_example"]
"""

BROKEN_MODULE = """\
from lmforge_broken_example import helpers  # line 1: the import chain the summary shows


def never_called():
    pass
"""

HELPERS_MODULE = """\
\"\"\"Imports a library that is not installed.\"\"\"
import torch_extension_that_is_not_installed  # line 2
"""

FUTURE_MODULE = """\
from lmforge import Architecture, hookimpl


class Future(Architecture):
    name = "future_arch"
    families = ("decoder",)
    api_version = 99


@hookimpl
def lmforge_architectures():
    return [Future]
"""


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """The three scaffolded packages and the broken one, installed into one --target directory."""
    src = tmp_path_factory.mktemp("src")
    for kind, name in KINDS.items():
        assert main(["plugins", "new", name, "--kind", kind, "--output", str(src)]) == 0
    broken = src / "lmforge-broken-example"
    (broken / "lmforge_broken_example").mkdir(parents=True)
    (broken / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    (broken / "lmforge_broken_example" / "__init__.py").write_text("")
    (broken / "lmforge_broken_example" / "broken.py").write_text(BROKEN_MODULE)
    (broken / "lmforge_broken_example" / "helpers.py").write_text(HELPERS_MODULE)
    (broken / "lmforge_broken_example" / "future.py").write_text(FUTURE_MODULE)
    site = tmp_path_factory.mktemp("site")
    dirs = [str(src / f"lmforge-{name}") for name in KINDS.values()] + [str(broken)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            *dirs,
        ],
        check=True,
        cwd=tmp_path_factory.mktemp("build"),
    )
    return {"src": src, "site": site}


def lmforge(args, site, cwd, timeout=240):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def test_scaffolded_layout(tmp_path, capsys):
    assert main(["plugins", "new", "conv_lm", "--kind", "architecture", "--output", str(tmp_path)]) == 0
    assert "pip install -e ." in capsys.readouterr().out
    root = tmp_path / "lmforge-conv_lm"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "lmforge_conv_lm/__init__.py",
        "lmforge_conv_lm/architecture.py",
        "pyproject.toml",
        "tests/test_conv_lm.py",
        "train.yaml",
    ]
    pyproject = (root / "pyproject.toml").read_text()
    assert '[project.entry-points.lmforge]\nconv_lm = "lmforge_conv_lm.architecture"' in pyproject
    assert 'name = "lmforge-conv-lm"' in pyproject
    assert "class ConvLm(Architecture):" in (root / "lmforge_conv_lm" / "architecture.py").read_text()
    assert "class_path: conv_lm" in (root / "train.yaml").read_text()


def test_installed_scaffolds_are_listed_and_the_broken_package_is_reported(packages, tmp_path):
    result = lmforge(["plugins", "list", "--json"], packages["site"], tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    ok = {r["name"]: r for r in rows if r["status"] == "ok"}
    for kind, name in KINDS.items():
        assert ok[name]["kind"] == kind and ok[name]["families"] == ["decoder"]
        assert ok[name]["package"] == f"lmforge-{name.replace('_', '-')}" and ok[name]["version"] == "0.1.0"
    assert ok["gpt"]["package"] == "lmforge"  # the others still load

    broken = {r["module"]: r for r in rows if r["status"].startswith("broken")}
    failed_import = broken["lmforge_broken_example.broken"]
    assert failed_import["package"] == "lmforge-broken-example" and failed_import["version"] == "0.0.7"
    assert (
        failed_import["status"]
        == "broken: ModuleNotFoundError: No module named 'torch_extension_that_is_not_installed'"
    )
    # a summary of the last frames, plugin code only, file:line: not the whole traceback
    assert failed_import["traceback"] == [
        "lmforge_broken_example/broken.py:1 in <module>",
        "lmforge_broken_example/helpers.py:2 in <module>",
    ]
    future = broken["lmforge_broken_example.future"]
    assert future["name"] == "future_arch"
    assert "'future_arch'" in future["status"] and "lmforge-broken-example 0.0.7" in future["status"]
    assert "plugin API version 99" in future["status"] and "supports plugin API version 1" in future["status"]


def test_scaffolds_pass_the_conformance_check(packages, tmp_path):
    result = lmforge(["plugins", "check", *KINDS.values(), "--json"], packages["site"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(reports) == set(KINDS.values())
    for report in reports.values():
        assert report["ok"] and report["package"].startswith("lmforge-")
        assert not [r for r in report["results"] if r["status"] == "fail"]
    checks = {r["check"] for r in reports["conv_lm"]["results"] if r["status"] == "pass"}
    assert {
        "forward shapes",
        "finite loss",
        "backward",
        "optimizer step",
        "save/load round trip",
        "cached generation",
        "every parameter trained",
        "options rebuild the plugin",
    } <= checks
    assert {"picklable (data-loader workers)", "collate padded rows", "collate packed rows"} <= {
        r["check"] for r in reports["smooth_lm"]["results"] if r["status"] == "pass"
    }
    assert "predict_step" in {r["check"] for r in reports["scorer"]["results"] if r["status"] == "pass"}


def test_scaffolds_train_together_from_yaml_and_the_checkpoint_loads(packages, corpus, tmp_path):
    cfg = tiny_config(
        corpus, tmp_path / "run", architecture={"class_path": "conv_lm", "init_args": {"d_model": 16, "n_layer": 2}}
    )
    cfg["model"]["init_args"]["objective"] = {"class_path": "smooth_lm", "init_args": {"label_smoothing": 0.05}}
    cfg["model"]["init_args"]["task"] = {"class_path": "scorer"}
    result = lmforge(["fit", "--config", str(write_config(tmp_path / "fit.yaml", cfg))], packages["site"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    plugins = json.loads((tmp_path / "run" / "plugins.json").read_text())
    assert {(p["kind"], p["name"], p["package"]) for p in plugins} == {
        ("architecture", "conv_lm", "lmforge-conv-lm"),
        ("objective", "smooth_lm", "lmforge-smooth-lm"),
        ("task", "scorer", "lmforge-scorer"),
    }
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/nll" in header and "val/loss" in header  # the objective's extra metric is logged
    meta = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["lmforge"]
    assert (
        meta["architecture"]["init_args"]["d_model"] == 16 and meta["objective"]["init_args"]["label_smoothing"] == 0.05
    )
    assert meta["task"] == {
        "name": "scorer",
        "class_path": "lmforge_scorer.task.Scorer",
        "init_args": {"metric": "perplexity"},
    }

    # The scoring task predicts over text files: one line per batch of packed rows, in order.
    output = tmp_path / "scores.jsonl"
    result = lmforge(["predict", "--config", str(tmp_path / "fit.yaml"), "--ckpt_path", "last",
                      "--data.predict_files", str(corpus["val"]), "--output", str(output)], packages["site"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    n_rows = len(packed_rows(corpus["val"], Tokenizer.from_file(str(corpus["tokenizer"])), 32))
    assert len(lines) == math.ceil(n_rows / 4)  # batch_size 4
    assert all(set(line) == {"perplexity", "tokens"} and 1.0 < line["perplexity"] < 1000.0 for line in lines)
    assert sum(line["tokens"] for line in lines) == n_rows * 31  # every row scored once: 31 predicted tokens each


def test_using_the_broken_plugin_is_an_error_naming_its_package(packages, corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", architecture={"class_path": "broken"})
    result = lmforge(["fit", "--config", str(write_config(tmp_path / "fit.yaml", cfg))], packages["site"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "lmforge-broken-example 0.0.7" in result.stderr and "torch_extension_that_is_not_installed" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_generated_tests_pass(packages, tmp_path):
    """Each package's own test (the conformance check) passes where it was generated, uninstalled."""
    dirs = [str(packages["src"] / f"lmforge-{name}" / "tests") for name in KINDS.values()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(packages["src"] / f"lmforge-{n}") for n in KINDS.values())}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), *dirs],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 passed" in result.stdout


def test_invalid_names_and_an_existing_folder_are_refused(tmp_path, capsys):
    for bad in ("MyPlugin", "my-plugin", "2fast", "class", "_private", "with space"):
        assert main(["plugins", "new", bad, "--kind", "objective", "--output", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"Invalid plugin name '{bad}'" in err and "lowercase Python identifier" in err
    assert not list(tmp_path.iterdir())  # nothing was written
    assert main(["plugins", "new", "fresh", "--kind", "task", "--output", str(tmp_path)]) == 0
    capsys.readouterr()
    (tmp_path / "lmforge-fresh" / "README.md").write_text("mine")
    assert main(["plugins", "new", "fresh", "--kind", "objective", "--output", str(tmp_path)]) == 2
    assert "lmforge-fresh already exists; nothing was written" in capsys.readouterr().err
    assert (tmp_path / "lmforge-fresh" / "README.md").read_text() == "mine"
    assert main(["plugins", "new", "gpt", "--kind", "architecture", "--output", str(tmp_path)]) == 2
    assert "already provided by module 'lmforge_plugins.architectures.gpt'" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["decoder", "encoder", "seq2seq"])
def test_every_family_template_conforms_in_pairs(family, tmp_path, monkeypatch):
    """The architecture, objective and task templates of a family train together (no built-ins needed)."""
    from lmforge.families import FAMILY_MODULES
    from lmforge.scaffold import class_name_for, create_plugin_package
    from lmforge.testing import assert_conforms

    if family not in FAMILY_MODULES:
        pytest.fail(f"family {family} is not in FAMILY_MODULES; its templates cannot be checked")
    classes = {}
    for kind in KINDS:
        name = f"{family}_{kind}_tpl"
        root = create_plugin_package(name, kind, output=tmp_path, family=family)
        monkeypatch.syspath_prepend(str(root))
        module = importlib.import_module(f"lmforge_{name}.{kind}")
        classes[kind] = getattr(module, class_name_for(name))
    arch, objective, task = classes["architecture"], classes["objective"], classes["task"]
    report = assert_conforms(arch, partners=[objective])
    assert {r.check for r in report.results if r.status == "pass"} >= {"forward shapes", "backward", "optimizer step"}
    assert_conforms(objective, partners=[arch])
    report = assert_conforms(task, partners=[arch, objective])
    assert "predict_step" in {r.check for r in report.results if r.status == "pass"}
    for name in list(sys.modules):
        if name.startswith(f"lmforge_{family}_"):
            del sys.modules[name]


def test_readme_documents_install_check_and_train(tmp_path):
    from lmforge.scaffold import create_plugin_package

    root = create_plugin_package("ppl", "task", output=tmp_path, family="seq2seq")
    readme = (root / "README.md").read_text()
    assert "pip install -e ." in readme and "lmforge plugins check ppl" in readme
    assert textwrap.dedent((root / "train.yaml").read_text()).strip() in readme
    assert "class_path: seq2seq" in readme and "class_path: t5" in readme and "task:\n      class_path: ppl" in readme
    assert 'families = ("seq2seq",)' in (root / "lmforge_ppl" / "task.py").read_text()
