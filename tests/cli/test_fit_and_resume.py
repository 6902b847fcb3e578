"""A short fit through the CLI: run directory contents, resume, refusal to overwrite, load_model."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from conftest import tiny_config, write_config

from lmforge.checkpoint import load_model, read_checkpoint
from lmforge.cli import main, run_trainer_cli


def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One 6-step run shared by the tests of this module (they only read it)."""
    root = tmp_path_factory.mktemp("fit")
    run = root / "run"
    config = write_config(root / "tiny.yaml", tiny_config(corpus, run))
    cli = run_trainer_cli(["fit", "--config", str(config)])
    return {"cli": cli, "run": run, "config": config}


def test_run_directory_holds_config_plugins_metrics_and_checkpoints(trained):
    run = trained["run"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"]["architecture"]["init_args"]["n_layer"] == 2
    assert config["model"]["init_args"]["architecture"]["init_args"]["vocab_size"] == 300  # from the tokenizer
    plugins = json.loads((run / "plugins.json").read_text())
    assert {(p["kind"], p["name"], p["package"]) for p in plugins} == {
        ("architecture", "gpt", "lmforge"),
        ("objective", "clm", "lmforge"),
    }
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    train_losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val_losses = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(train_losses) == 6 and len(val_losses) == 2
    assert all(r.get("train/lr") is not None for r in rows)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "checkpoints").glob("best-step*.ckpt"))

    meta = read_checkpoint(run / "checkpoints" / "last.ckpt")["lmforge"]
    assert meta["family"] == "decoder"
    assert meta["architecture"]["name"] == "gpt" and meta["architecture"]["init_args"]["d_model"] == 32
    assert {p["name"]: p["package"] for p in meta["plugins"]} == {"gpt": "lmforge", "clm": "lmforge"}
    assert json.loads(meta["tokenizer_json"])["model"]["type"] == "BPE"


def test_load_model_gives_the_trained_logits(trained):
    trained_model = trained["cli"].model.eval()
    loaded = load_model(trained["run"])
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), trained_model(ids), rtol=0, atol=0)
    assert loaded.tokenizer().decode(loaded.tokenizer().encode("the cat sat").ids) == "the cat sat"


def test_resume_continues_from_the_last_step(trained, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(trained["run"], run)
    config = write_config(tmp_path / "tiny.yaml", tiny_config({**_paths(trained)}, run, max_steps=9))
    cli = run_trainer_cli(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert cli.trainer.global_step == 9
    steps = [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("train/loss")]
    assert steps == list(range(9))  # the first 6 from the original run, then 6, 7, 8 appended
    assert (run / "config.yaml").read_bytes() == (trained["run"] / "config.yaml").read_bytes()  # kept, not overwritten
    assert len(list(run.glob("config.*.yaml"))) == 1  # the changed config is written beside it


def _paths(trained):
    data = yaml.safe_load(trained["config"].read_text())["data"]
    from pathlib import Path

    return {"train": Path(data["train_files"]), "val": Path(data["val_files"]), "tokenizer": Path(data["tokenizer"])}


def test_an_existing_run_is_never_trained_over(trained, capsys):
    before = snapshot(trained["run"])
    assert main(["fit", "--config", str(trained["config"])]) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "--ckpt_path last" in err
    assert snapshot(trained["run"]) == before


def test_generate_repeats_with_a_seed(trained, capsys):
    args = ["generate", "--checkpoint", str(trained["run"]), "--prompt", "the cat", "--max_new_tokens", "12"]
    outputs = []
    for seed in ("3", "3", "4"):
        assert main([*args, "--seed", seed, "--temperature", "1.5"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]
    assert all(o.startswith("the cat") for o in outputs)
