"""A short fit through the CLI: run directory contents, resume, refusal to overwrite, load_model."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import packed_rows, tiny_config, write_config

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


def test_test_reports_the_loss_on_test_files_against_a_plain_computation(trained, tmp_path):
    test_file = tmp_path / "held_out.txt"
    test_file.write_text(_paths(trained)["val"].read_text()[:3000].rsplit("\n", 1)[0] + "\n")
    before = snapshot(trained["run"] / "checkpoints")
    cli = run_trainer_cli(["test", "--config", str(trained["config"]), "--ckpt_path", "last",
                           "--data.test_files", str(test_file)])
    model = load_model(trained["run"]).eval()
    rows = packed_rows(test_file, model.tokenizer(), 32)
    with torch.no_grad():
        logits = model(rows)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))
    assert float(cli.trainer.callback_metrics["test/loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(cli.trainer.callback_metrics["test/ppl"]) == pytest.approx(float(expected.exp()), rel=1e-4)
    assert snapshot(trained["run"] / "checkpoints") == before


def test_test_without_test_files_says_which_option_to_add(trained, capsys):
    assert main(["test", "--config", str(trained["config"]), "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err
    assert "`lmforge test` needs data.test_files" in err and "--data.test_files FILE" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluating_last_of_an_untrained_run_is_refused(trained, tmp_path, capsys, command):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(_paths(trained), tmp_path / "new-run"))
    assert main([command, "--config", str(config), "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err
    assert f"`lmforge {command} --ckpt_path last`" in err and "no committed checkpoint" in err
    assert "Train it first with `lmforge fit`" in err
    assert not list((tmp_path / "new-run").rglob("*.ckpt"))


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluating_without_weights_is_refused(trained, tmp_path, capsys, command):
    """Without --ckpt_path (or model.init_from) the model would be freshly initialised: refused, nothing written."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run, symlinks=True)
    before = snapshot(run)
    test_file = _paths(trained)["val"]
    assert main([command, "--config", str(trained["config"]), "--trainer.default_root_dir", str(run),
                 "--data.test_files", str(test_file), "--data.predict_files", str(test_file)]) == 2
    err = capsys.readouterr().err
    assert f"lmforge: error: `lmforge {command}` got no weights to use: without --ckpt_path it would run a freshly " \
           f"initialised model. Pass --ckpt_path last (the newest checkpoint of {run})" in err
    assert "model.init_from" in err
    assert snapshot(run) == before


def test_evaluation_rows_name_the_checkpoint_and_its_step(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run, symlinks=True)
    common = ["--config", str(trained["config"]), "--trainer.default_root_dir", str(run)]
    assert main(["validate", *common, "--ckpt_path", "last"]) == 0
    assert main(["validate", *common, "--model.init_from", str(run)]) == 0  # weights, but no checkpoint evaluated
    with open(run / "metrics.validate.csv") as f:
        rows = list(csv.DictReader(f))
    newest = str(run / "checkpoints" / "step-00000006" / "model.ckpt")
    assert [(r["checkpoint"], r["step"]) for r in rows] == [(newest, "6"), ("", "0")]
    assert rows[0]["val/loss"] == rows[1]["val/loss"]  # the same weights, both ways


def test_lmforge_to_hf_names_the_tokenizers_end_of_text_as_bos_and_eos(trained, tmp_path):
    out = tmp_path / "hf"
    assert main(["convert", "lmforge-to-hf", str(trained["run"]), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    eos = load_model(trained["run"]).tokenizer().token_to_id("<|endoftext|>")
    assert (config["model_type"], config["eos_token_id"], config["bos_token_id"]) == ("gpt2", eos, eos)


def test_an_unknown_stop_token_lists_the_special_tokens(trained, capsys):
    args = ["generate", "--checkpoint", str(trained["run"]), "--prompt", "the cat", "--stop_token", "<eos>"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--stop_token '<eos>' is not a token" in err and "Its special tokens: <|endoftext|>" in err


def test_a_run_without_checkpoints_is_not_mixed_with_a_new_one(trained, tmp_path, capsys):
    run = tmp_path / "run"
    config = write_config(tmp_path / "tiny.yaml", tiny_config(_paths(trained), run, max_steps=2, enable_checkpointing=False))
    assert main(["fit", "--config", str(config)]) == 0
    before = snapshot(run)
    assert main(["fit", "--config", str(config), "--model.lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "already holds another run's metrics.csv" in err and "--trainer.default_root_dir" in err
    assert snapshot(run) == before


def test_a_second_fit_into_a_run_directory_in_use_is_refused(trained, tmp_path, capsys):
    """While another process holds the run directory's lock (a running fit), fit is refused and writes
    nothing; once that process is gone the same command trains and resumes."""
    run = tmp_path / "run"
    run.mkdir()
    config = write_config(tmp_path / "tiny.yaml", tiny_config(_paths(trained), run, max_steps=2))
    holder = subprocess.Popen(  # what a running fit holds: a POSIX lock on run/.lmforge.lock
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); f.write('pid 1 on elsewhere');"
         " f.flush(); fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(run / ".lmforge.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["fit", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert "Another `lmforge fit` (pid 1 on elsewhere) is writing to the run directory" in err, err
        assert "--trainer.default_root_dir" in err
        assert sorted(p.name for p in run.iterdir()) == [".lmforge.lock"]
    finally:
        holder.communicate("", timeout=30)  # the holder exits: the kernel drops its lock
    assert main(["fit", "--config", str(config)]) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "3"]) == 0


def test_validate_best_loads_the_checkpoint_with_the_lowest_val_loss(trained, tmp_path):
    """`--ckpt_path best` is the run directory's best-step*.ckpt: validating it gives the lowest val/loss
    the fit logged (Lightning's own `best` only knows a fit of the same process)."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run, symlinks=True)  # validate appends to metrics.csv: work on a copy
    with open(run / "metrics.csv") as f:
        val_losses = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    cli = run_trainer_cli(["validate", "--config", str(trained["config"]), "--trainer.default_root_dir", str(run),
                           "--ckpt_path", "best"])
    assert cli.trainer.ckpt_path == str((run / "checkpoints").glob("best-step*.ckpt").__next__().resolve())
    assert float(cli.trainer.callback_metrics["val/loss"]) == pytest.approx(min(val_losses), rel=1e-5)


def test_a_resume_past_max_steps_says_it_trains_nothing(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run, symlinks=True)
    with pytest.warns(UserWarning, match="The checkpoint is at step 6 and trainer.max_steps is 4: this fit trains nothing"):
        assert main(["fit", "--config", str(trained["config"]), "--trainer.default_root_dir", str(run),
                     "--ckpt_path", "last", "--trainer.max_steps", "4"]) == 0


def test_a_resume_with_other_data_options_names_them(trained, tmp_path, recwarn):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run, symlinks=True)
    resume = ["fit", "--config", str(trained["config"]), "--trainer.default_root_dir", str(run), "--ckpt_path", "last"]
    # options that leave the training rows and their order alone: no warning
    other_val = tmp_path / "val.txt"
    other_val.write_text("Another validation text.\n" * 20)
    assert main([*resume, "--trainer.max_steps", "7", "--data.num_workers", "1", "--data.val_files", str(other_val)]) == 0
    assert not [w for w in recwarn if "other data options" in str(w.message)]
    with pytest.warns(UserWarning, match=r"Resuming with other data options than the checkpoint's run: "
                                         r"data.batch_size 4 -> 2, data.block_size 32 -> 16, data.val_files '/.*/val.txt' "
                                         r"-> None\. Training goes on"):
        assert main([*resume, "--trainer.max_steps", "8", "--data.batch_size", "2", "--data.block_size", "16",
                     "--data.val_files", "null"]) == 0


def test_a_resume_shows_no_lightning_notice_that_is_wrong_for_lmforge(trained, tmp_path):
    """Lightning warns that the checkpoint directory is not empty (expected on a resume; a fit that
    does not resume is refused there) and that a mid-epoch resume is unreliable (lmforge's datamodules
    resume their position): neither reaches the user."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run, symlinks=True)
    result = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "fit", "--config", str(trained["config"]), "--trainer.default_root_dir",
         str(run), "--ckpt_path", "last", "--trainer.max_steps", "7"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restored all states from the checkpoint" in result.stderr
    assert "exists and is not empty" not in result.stderr
    assert "dataloader is not resumable" not in result.stderr


def test_starting_over_keeps_an_uncommitted_attempts_metrics_apart(trained, tmp_path):
    """`--ckpt_path last` where an earlier attempt logged rows but committed no checkpoint: the fit starts
    over, and the earlier rows move to metrics.<time>.csv instead of mixing with the new ones."""
    run = tmp_path / "run"
    run.mkdir()
    earlier = (trained["run"] / "metrics.csv").read_bytes()
    (run / "metrics.csv").write_bytes(earlier)
    assert main(["fit", "--config", str(trained["config"]), "--trainer.default_root_dir", str(run),
                 "--ckpt_path", "last"]) == 0
    kept = [p for p in run.glob("metrics.*.csv")]
    assert len(kept) == 1 and kept[0].read_bytes() == earlier
    with open(run / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == sorted(set(steps)) and len(steps) == 6  # one run's rows, each step once
