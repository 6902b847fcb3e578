"""The example third-party package under tests/example_plugin: pip-installed, listed, trained from YAML.

It is installed into a temporary target directory (not into lmforge's environment) and the CLI runs
in a subprocess with that directory on PYTHONPATH, exactly as an installed package is found.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, tiny_config, write_config

PACKAGE = REPO / "tests" / "example_plugin"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(PACKAGE)],
        check=True, cwd=build,
    )
    return target


def lmforge(args, site, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_installed_package_is_listed_with_its_version(site, tmp_path):
    result = lmforge(["plugins", "list", "--json"], site, tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["tiny_gru"]["package"] == "lmforge-example-plugin"
    assert rows["tiny_gru"]["version"] == "0.3.1"
    assert rows["tiny_gru"]["kind"] == "architecture" and rows["tiny_gru"]["families"] == ["decoder"]
    assert rows["gpt"]["package"] == "lmforge"


def test_installed_package_trains_from_yaml(site, corpus, tmp_path):
    arch = {"class_path": "tiny_gru", "init_args": {"d_model": 16}}
    config = write_config(tmp_path / "gru.yaml", tiny_config(corpus, tmp_path / "run", architecture=arch))
    result = lmforge(["fit", "--config", str(config)], site, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    plugins = json.loads((tmp_path / "run" / "plugins.json").read_text())
    assert {"kind": "architecture", "name": "tiny_gru", "package": "lmforge-example-plugin", "version": "0.3.1"} in plugins
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    # the checkpoint loads back through the registry in a fresh process
    check = lmforge(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "the", "--max_new_tokens", "3", "--seed", "0"], site, tmp_path)
    assert check.returncode == 0 and check.stdout.startswith("the"), check.stderr[-2000:]


def test_without_the_package_the_name_is_unknown(corpus, tmp_path):
    arch = {"class_path": "tiny_gru", "init_args": {"d_model": 16}}
    config = write_config(tmp_path / "gru.yaml", tiny_config(corpus, tmp_path / "run", architecture=arch))
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "fit", "--config", str(config)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "Unknown architecture 'tiny_gru'" in result.stderr and "Known architectures: " in result.stderr
    assert "gpt" in result.stderr.split("Known architectures: ")[1].split(".")[0].split(", ")
