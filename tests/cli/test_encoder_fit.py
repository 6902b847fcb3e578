"""The shipped encoder configs through the CLI (a few steps, tiny shapes), and BERT through `lmforge convert`."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
import yaml
from conftest import REPO
from safetensors.torch import load_file

from lmforge import EncoderLM, load_model
from lmforge.checkpoint import read_checkpoint
from lmforge.cli import main, run_trainer_cli

TINY = [
    "--model.architecture.n_layer", "1", "--model.architecture.n_head", "2", "--model.architecture.d_model", "32",
    "--model.architecture.block_size", "48", "--data.block_size", "48", "--data.batch_size", "4",
    "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
    "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]


def fit(config: str, run, *extra: str):
    return run_trainer_cli(["fit", "--config", str(REPO / "configs" / config), *TINY,
                            "--trainer.default_root_dir", str(run), *extra])


def metrics(run) -> list[dict]:
    return list(csv.DictReader((run / "metrics.csv").open()))


@pytest.fixture(scope="module", autouse=True)
def _in_repo(tmp_path_factory):
    """The configs name the shipped corpus relative to the repository root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        yield


def test_bert_mlm_config_fits_saves_and_exports(tmp_path):
    run = tmp_path / "run"
    # Learned positions so the result exports to Hugging Face (the config's rotary does not).
    cli = fit("bert-tiny-mlm.yaml", run, "--model.architecture.position", "learned")
    rows = metrics(run)
    assert len([r for r in rows if r.get("train/loss")]) == 4
    val = [r for r in rows if r.get("val/loss")]
    assert len(val) == 2 and all(0.0 <= float(r["val/mlm_accuracy"]) <= 1.0 for r in val)
    assert all(r.get("train/mlm_accuracy") for r in rows if r.get("train/loss"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"]["architecture"]["init_args"]["vocab_size"] == 895  # from the tokenizer
    assert config["model"]["init_args"]["objective"]["init_args"]["whole_word"] is True
    assert {p["name"] for p in json.loads((run / "plugins.json").read_text())} == {"bert", "mlm"}

    model = load_model(run)  # rebuilt from the checkpoint's plain-data metadata
    assert isinstance(model, EncoderLM)
    trained = cli.model.eval()
    trained.load_state_dict(read_checkpoint(run)["state_dict"])
    ids = torch.randint(5, 895, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), trained(ids), rtol=0, atol=0)

    transformers = pytest.importorskip("transformers")
    assert main(["convert", "lmforge-to-hf", str(run), str(tmp_path / "hf")]) == 0
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    vocab = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())["model"]["vocab"]
    assert (hf.config.pad_token_id, hf.config.eos_token_id) == (vocab["[PAD]"], vocab["[SEP]"])  # from the tokenizer
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), atol=1e-4, rtol=1e-4)


def test_bert_mlm_nsp_config_fits_and_reloads(tmp_path):
    run = tmp_path / "run"
    fit("bert-tiny-mlm-nsp.yaml", run)
    val = [r for r in metrics(run) if r.get("val/loss")]
    assert len(val) == 2
    for r in val:
        assert 0.0 <= float(r["val/nsp_accuracy"]) <= 1.0 and 0.0 <= float(r["val/mlm_accuracy"]) <= 1.0
        torch.testing.assert_close(
            torch.tensor(float(r["val/loss"])),
            torch.tensor(float(r["val/nsp_loss"]) + float(r["val/mlm_loss"])), atol=0.05, rtol=0.01,
        )  # per-batch means of the parts vs the token-weighted mean of the sum: close, not equal
    meta = read_checkpoint(run)["lmforge"]  # weights_only: the nested mlm objective is plain data
    assert meta["objective"]["name"] == "nsp"
    assert meta["objective"]["init_args"]["mlm"]["init_args"]["whole_word"] is True
    model = load_model(run)
    assert model.objective.mlm is not None and model.objective.mlm.whole_word
    assert model.architecture.has_pair_head


def exit_code(args: list[str]) -> int:
    """``main``'s status; the config parser exits (status 2) on an invalid option."""
    try:
        return main(args)
    except SystemExit as exc:
        return exc.code


def test_misspelt_nested_option_and_missing_head_are_refused(capsys, tmp_path):
    config = str(REPO / "configs" / "bert-tiny-mlm-nsp.yaml")
    root = ["--trainer.default_root_dir", str(tmp_path / "run")]
    assert exit_code(["fit", "--config", config, *root, "--model.objective.init_args.mlm.init_args.mask_prb", "0.2"]) == 2
    assert "MLM has no option 'mask_prb'. Did you mean 'mask_prob'" in capsys.readouterr().err
    assert exit_code(["fit", "--config", config, *root, "--model.architecture.pair_head", "false",
                      "--model.architecture.pooler", "false"]) == 2
    assert "nsp objective classifies sentence pairs with the architecture's pair head" in capsys.readouterr().err


def test_hf_bert_through_convert(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=895, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    hf = transformers.BertForPreTraining(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    folder = tmp_path / "bert"
    hf.save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(REPO / "lmforge" / "data" / "corpus" / "wordpiece.json", folder / "tokenizer.json")

    assert main(["convert", "hf-to-lmforge", str(folder), str(tmp_path / "lm")]) == 0
    model = load_model(tmp_path / "lm")
    assert model.family == "encoder" and model.objective.name == "mlm"
    ids = torch.randint(0, 895, (2, 16))
    types = torch.tensor([[0] * 8 + [1] * 8, [0] * 16])
    with torch.no_grad():
        expected = hf(input_ids=ids, token_type_ids=types)
        hidden = model.encode(ids, token_type_ids=types)
        torch.testing.assert_close(model.architecture.mlm_logits(hidden), expected.prediction_logits,
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.architecture.pair_logits(model.architecture.pooled(hidden)),
                                   expected.seq_relationship_logits, atol=1e-4, rtol=1e-4)

    assert main(["convert", "lmforge-to-hf", str(tmp_path / "lm"), str(tmp_path / "back")]) == 0
    original, back = load_file(folder / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
