"""Config mistakes are one clear paragraph naming the key, before anything is created."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_config, write_config

from lmforge.cli import main


@pytest.fixture
def config(corpus, tmp_path):
    return write_config(tmp_path / "tiny.yaml", tiny_config(corpus, tmp_path / "run"))


def run_cli(args, capsys):
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "override, expected",
    [
        (["--trainer.max_stepz", "3"], r"Unknown config key 'trainer.max_stepz'. Did you mean 'trainer.max_steps'"),
        (["--data.batch_sz", "3"], r"Unknown config key 'data.batch_sz'. Did you mean 'data.batch_size'"),
        (["--model.architecture.n_layr", "3"], r"'model.architecture.n_layr': GPT has no option 'n_layr'. Did you mean 'n_layer'"),
        (["--model.architecture.n_layer", "three"], r"'model.architecture.n_layer' \(GPT\): Expected a <class 'int'>. Got value: three"),
        (["--trainer.precision", "13"], r"'trainer.precision': 13 is not one of 64, 32, 16, .*'bf16-mixed', '32-true'.*null\."),
        (["--model.architecture.position", "absolute"], r"'model.architecture.position' \(GPT\): Expected a typing.Literal\['learned', 'rotary'\]"),
        (["--model.architecture", "gtp"], r"Unknown architecture 'gtp'. Did you mean 'gpt'\?"),
        (["--model.objective", "mlmm"], r"Unknown objective 'mlmm'"),
        (["--model", "decodr"], r"Unknown model family 'decodr'. Did you mean 'decoder'"),
        (["--model.lr", "-1"], r"model.lr must be a positive, finite learning rate, not -1.0"),
        (["--trainer.devices", "0"], r"The trainer options are not valid: `Trainer\(devices='0'\)` value is not a valid"),
        (["--trainer.strategy", "nosuch"], r"The trainer options are not valid: .*invalid strategy name: `strategy='nosuch'`"),
        (["--data.block_size", "64"], r"data.block_size is 64 tokens, but the GPT architecture accepts at most 32 positions"),
        (["--ckpt_path", "best"], r"`lmforge fit --ckpt_path best`: .*checkpoints holds no best-step\*.ckpt"),
    ],
)
def test_bad_overrides_are_named_and_nothing_is_written(config, tmp_path, capsys, override, expected):
    import re

    code, err = run_cli(["fit", "--config", str(config), *override], capsys)
    assert code == 2
    assert err.startswith("lmforge: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(expected, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_a_config_error_points_to_the_print_config_of_its_own_command(config, tmp_path, capsys, command):
    for override in (["--data.batch_size", "abc"], ["--data.batch_sz", "3"]):
        code, err = run_cli([command, "--config", str(config), "--ckpt_path", "last", *override], capsys)
        assert code == 2 and f"Run `lmforge {command} --print_config` to see every option" in err, err
    assert not (tmp_path / "run").exists()


def test_a_misspelled_plugin_section_in_a_yaml_file_suggests_the_section(corpus, tmp_path, capsys):
    cfg = tiny_config(corpus, tmp_path / "run")
    cfg["model"]["init_args"]["objectiv"] = cfg["model"]["init_args"].pop("objective")
    cfg["model"]["init_args"]["objectiv"]["init_args"] = {"ignore_index": -100}
    code, err = run_cli(["fit", "--config", str(write_config(tmp_path / "bad.yaml", cfg))], capsys)
    assert code == 2 and "has no option 'objectiv.init_args.ignore_index'. Did you mean 'objective'" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["generate", "--checkpoint", "x", "--max_new_tokens", "abc"],
         "lmforge generate: argument --max_new_tokens: invalid int value: 'abc'. `lmforge generate --help`"),
        (["plugins", "new", "x", "--kind", "bogus"], "lmforge plugins new: argument --kind: invalid choice: 'bogus'"),
        (["estimate", "--config", "c.yaml", "--devices", "abc"], "lmforge estimate: argument --devices: invalid int"),
        (["doctor", "--bogus"], "lmforge doctor: unrecognized arguments: --bogus."),
    ],
)
def test_a_bad_tool_argument_is_one_line(capsys, argv, expected):
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith(f"lmforge: error: {expected}") and len(err.strip().splitlines()) == 1, err


def test_unknown_key_in_a_yaml_file_is_named(corpus, tmp_path, capsys):
    cfg = tiny_config(corpus, tmp_path / "run")
    cfg["model"]["init_args"]["architecture"]["init_args"]["d_modle"] = 64
    code, err = run_cli(["fit", "--config", str(write_config(tmp_path / "bad.yaml", cfg))], capsys)
    assert code == 2 and "GPT has no option 'd_modle'. Did you mean 'd_model'" in err


def test_yaml_with_python_tags_is_refused(tmp_path, capsys):
    bad = tmp_path / "evil.yaml"
    bad.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    code, err = run_cli(["fit", "--config", str(bad)], capsys)
    assert code == 2 and "is not valid YAML" in err and "(Python object tags are refused) at line 1, column 8" in err


@pytest.mark.parametrize("command", ["fit", "estimate"])
def test_malformed_yaml_names_the_line_and_column(tmp_path, capsys, command):
    bad = tmp_path / "broken.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n   devices: 1\n")
    code, err = run_cli([command, "--config", str(bad)], capsys)
    assert code == 2
    assert err.strip() == f"lmforge: error: Config file {bad} is not valid YAML: mapping values are not allowed here " \
                          "at line 3, column 11. Fix the file.", err


def test_tokenizer_larger_than_the_embedding_is_refused(config, tmp_path, capsys):
    code, err = run_cli(["fit", "--config", str(config), "--model.architecture.vocab_size", "100"], capsys)
    assert code == 2
    assert "has 300 tokens but model.architecture.vocab_size is 100" in err
    assert not (tmp_path / "run").exists()


def test_print_config_shows_every_plugin_option_with_its_default(config, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for line in ("n_kv_head: null", "rope_base: 10000.0", "mlp: gelu", "keep_documents_separate: false", "schedule: cosine"):
        assert line in out, line


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses_and_builds(path, monkeypatch):
    """Each recipe in configs/ resolves its plugins and builds its model (the training itself is not run)."""
    from lmforge.cli import run_trainer_cli

    monkeypatch.chdir(REPO)
    cli = run_trainer_cli(["fit", "--config", str(path), "--trainer.default_root_dir", "/nonexistent/never-written"], run=False)
    assert cli.model.family in ("encoder", "decoder", "seq2seq")
    assert sum(p.numel() for p in cli.model.parameters()) > 0


def test_help_and_import_do_not_import_deepspeed():
    code = (
        "import sys, lmforge; from lmforge.cli import main; main(['--help']); main(['plugins', 'list']);"
        "print('DEEPSPEED', 'deepspeed' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "DEEPSPEED False" in out
    assert "lmforge COMMAND" in out


def test_a_checkpoint_of_another_model_is_refused_naming_both(config, tmp_path, capsys):
    import torch

    ckpt = tmp_path / "encoder.ckpt"  # only its plain-data metadata is read before refusing
    torch.save({"lmforge": {"family": "encoder", "module_class": "lmforge.families.encoder.EncoderLM",
                            "architecture": {"name": "bert", "class_path": "lmforge_plugins.architectures.bert.BERT"}}},
               ckpt)
    assert main(["fit", "--config", str(config), "--ckpt_path", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "holds a model of the encoder family with the 'bert' architecture" in err and "DecoderLM" in err
    assert "Traceback" not in err
