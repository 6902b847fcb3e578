"""A short seq2seq fit through the CLI (t5 + span_corruption), then load_model and `lmforge generate`."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml
from conftest import tiny_config, write_config

from lmforge.checkpoint import load_model
from lmforge.cli import main, run_trainer_cli
from lmforge.data.tokenizer import add_sentinel_tokens, find_special_tokens, load_tokenizer
from lmforge.families import Seq2SeqLM
from lmforge_plugins.objectives.span_corruption import SpanCorruption

T5_ARCH = {"class_path": "t5", "init_args": {"d_model": 32, "d_ff": 64, "n_layer": 1, "n_head": 2}}


def seq2seq_config(corpus, run_dir, tokenizer, **trainer):
    config = tiny_config(corpus, run_dir, architecture=T5_ARCH, **trainer)
    config["model"]["class_path"] = "seq2seq"
    config["model"]["init_args"]["objective"] = {"class_path": "span_corruption"}
    config["model"]["init_args"]["lr"] = 3e-3
    config["data"]["tokenizer"] = str(tokenizer)
    return config


@pytest.fixture(scope="module")
def t5_run(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("t5fit")
    tokenizer = add_sentinel_tokens(load_tokenizer(corpus["tokenizer"]), count=20)
    tokenizer.save(str(root / "tokenizer.json"))
    config = write_config(root / "t5.yaml", seq2seq_config(corpus, root / "run", root / "tokenizer.json"))
    cli = run_trainer_cli(["fit", "--config", str(config)])
    return {"cli": cli, "run": root / "run", "tokenizer": root / "tokenizer.json"}


def test_fit_writes_a_seq2seq_run(t5_run):
    run, cli = t5_run["run"], t5_run["cli"]
    special = find_special_tokens(load_tokenizer(t5_run["tokenizer"]))
    arch = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["architecture"]["init_args"]
    assert arch["vocab_size"] == special.vocab_size == 300 + 1 + 20  # from the tokenizer (<mask> + sentinels)
    assert arch["decoder_start_token_id"] == special.pad_id  # the tokenizer's pad, as T5 starts from pad
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(val) == 2 and len(train) == 6 and val[1] < val[0]
    # Packed rows are longer than block_size so that the corrupted inputs fill it exactly.
    objective = cli.model.objective
    assert {len(r) for r in cli.datamodule.train_dataset["input_ids"]} == {objective.packed_length(32)}
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and "attention_mask" not in batch


def test_load_model_gives_the_trained_logits(t5_run):
    trained = t5_run["cli"].model.eval()
    loaded = load_model(t5_run["run"])
    assert isinstance(loaded, Seq2SeqLM) and isinstance(loaded.objective, SpanCorruption)
    ids, labels = torch.randint(0, 300, (2, 12)), torch.randint(0, 300, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, labels=labels), trained(ids, labels=labels), rtol=0, atol=0)


def test_generate_on_a_seq2seq_checkpoint(t5_run, capsys):
    args = ["generate", "--checkpoint", str(t5_run["run"]), "--prompt", "the cat <extra_id_0> the mat",
            "--max_new_tokens", "8"]
    outputs = []
    for extra in (["--greedy"], ["--greedy"], ["--num_beams", "3", "--length_penalty", "0.8"],
                  ["--temperature", "1.2", "--seed", "1"]):
        assert main([*args, *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    # The CLI encodes the prompt followed by EOS (as in training) and prints the decoded output.
    from lmforge.generation import generate_seq2seq

    model = load_model(t5_run["run"])
    tokenizer, special = model.tokenizer(), find_special_tokens(model.tokenizer())
    ids = torch.tensor([tokenizer.encode("the cat <extra_id_0> the mat").ids + [special.eos_id]])
    new = generate_seq2seq(model.architecture, ids, max_new_tokens=8, greedy=True, eos_id=special.eos_id)
    shown = [t for t in new[0].tolist() if t not in (special.eos_id, special.pad_id)]
    assert outputs[0] == tokenizer.decode(shown, skip_special_tokens=False) + "\n"
    assert main([*args, "--num_beams", "2", "--top_k", "5"]) == 2
    assert "--num_beams > 1" in capsys.readouterr().err


def test_a_tokenizer_without_sentinels_is_refused(corpus, tmp_path, capsys):
    config = write_config(tmp_path / "t5.yaml", seq2seq_config(corpus, tmp_path / "run", corpus["tokenizer"]))
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "span_corruption needs T5 sentinel tokens" in err and "add_sentinel_tokens" in err
