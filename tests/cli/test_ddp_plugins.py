"""Plugins named with --plugins load the same way in spawned DDP ranks and data-loader workers."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import tiny_config, write_config
from ports import free_port

PROBE = '''
import os
from lmforge import hookimpl
from lmforge_plugins.objectives.clm import CLM


class ProbeCLM(CLM):
    """CLM that records which processes built its batches."""

    name = "probe_clm"

    def collate(self, examples, special):
        with open(os.environ["PROBE_LOG"], "a") as f:
            f.write(f"{os.getpid()} {os.environ.get('LOCAL_RANK', '0')}\\n")
        return super().collate(examples, special)


@hookimpl
def lmforge_objectives():
    return [ProbeCLM]
'''


def test_two_process_ddp_with_a_plugin_module_and_workers(corpus, tmp_path):
    (tmp_path / "probe_plugin.py").write_text(PROBE)
    cfg = tiny_config(corpus, tmp_path / "run", accelerator="cpu", devices=2, strategy="ddp", max_steps=4)
    cfg["model"]["init_args"]["objective"] = {"class_path": "probe_clm"}
    cfg["data"]["num_workers"] = 1
    config = write_config(tmp_path / "ddp.yaml", cfg)
    env_log = tmp_path / "probe.log"
    result = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "fit", "--config", str(config), "--plugins", "probe_plugin"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env={**__import__("os").environ, "PROBE_LOG": str(env_log), "MASTER_PORT": str(free_port())},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line.split() for line in env_log.read_text().splitlines()]
    ranks = {rank for _pid, rank in lines}
    assert ranks == {"0", "1"}  # both ranks' workers built batches with the plugin's collate
    assert len({pid for pid, _ in lines}) >= 2
    plugins = json.loads((tmp_path / "run" / "plugins.json").read_text())
    assert {"kind": "objective", "name": "probe_clm", "package": "$LMFORGE_PLUGINS", "version": "-"} in plugins
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_a_module_in_the_working_directory_loads_by_env_var_as_by_flag(tmp_path):
    """`LMFORGE_PLUGINS=probe_plugin` finds ./probe_plugin.py exactly as `--plugins probe_plugin` does."""
    import os

    (tmp_path / "probe_plugin.py").write_text(PROBE)
    listings = {}
    for how, extra_args, extra_env in (("flag", ["--plugins", "probe_plugin"], {}),
                                       ("env", [], {"LMFORGE_PLUGINS": "probe_plugin"})):
        env = {k: v for k, v in os.environ.items() if k != "LMFORGE_PLUGINS"}
        result = subprocess.run([sys.executable, "-m", "lmforge.cli", "plugins", "list", "--json", *extra_args],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**env, **extra_env})
        assert result.returncode == 0, result.stderr[-2000:]
        listings[how] = json.loads(result.stdout)
    assert listings["env"] == listings["flag"]
    assert any(p["name"] == "probe_clm" and p["status"] == "ok" for p in listings["env"])
