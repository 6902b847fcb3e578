"""GPT-2 weights through `lmforge convert` both ways, load_model on the folder, and init_from."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import tiny_config, write_config
from safetensors.torch import load_file

from lmforge import load_model
from lmforge.cli import main, run_trainer_cli


@pytest.fixture(scope="module")
def hf_gpt2(corpus, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # randomise everything, biases and norms too, so no mapping error can hide
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(corpus["tokenizer"], folder / "tokenizer.json")
    return model, folder


def test_hf_to_lmforge_to_hf(hf_gpt2, tmp_path):
    hf_model, folder = hf_gpt2
    assert main(["convert", "hf-to-lmforge", str(folder), str(tmp_path / "lm")]) == 0
    model = load_model(tmp_path / "lm")
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        expected = hf_model(ids).logits
        torch.testing.assert_close(model(ids), expected, atol=1e-4, rtol=1e-4)
    assert model.tokenizer().get_vocab_size() == 300

    assert main(["convert", "lmforge-to-hf", str(tmp_path / "lm"), str(tmp_path / "back")]) == 0
    original, back = load_file(folder / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(original) <= set(back)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_convert_refuses_to_overwrite(hf_gpt2, tmp_path, capsys):
    out = tmp_path / "lm"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["convert", "hf-to-lmforge", str(hf_gpt2[1]), str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_overwrite_leaves_nothing_of_the_previous_model(hf_gpt2, tmp_path, capsys):
    """A folder that held a model with a tokenizer, overwritten by one without: no stale tokenizer
    stays beside the new weights; files convert never writes are kept and named."""
    lm = tmp_path / "lm"
    assert main(["convert", "hf-to-lmforge", str(hf_gpt2[1]), str(lm)]) == 0
    bare = tmp_path / "bare"  # the same weights without a tokenizer
    shutil.copytree(hf_gpt2[1], bare)
    (bare / "tokenizer.json").unlink()
    (lm / "notes.txt").write_text("mine")
    assert main(["convert", "hf-to-lmforge", str(bare), str(lm), "--overwrite"]) == 0
    assert sorted(p.name for p in lm.iterdir()) == ["lmforge.json", "model.safetensors", "notes.txt"]
    assert "--overwrite kept files that lmforge convert does not write" in capsys.readouterr().err
    assert load_model(lm).tokenizer_json is None


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(hf_gpt2, corpus, tmp_path, capsys):
    from tokenizers import Tokenizer

    mismatched = tmp_path / "hf"
    shutil.copytree(hf_gpt2[1], mismatched)
    bigger = Tokenizer.from_file(str(corpus["tokenizer"]))
    bigger.add_tokens([f"extra{i}" for i in range(5)])  # 305 tokens for a 300-row embedding
    bigger.save(str(mismatched / "tokenizer.json"))
    assert main(["convert", "hf-to-lmforge", str(mismatched), str(tmp_path / "lm")]) == 2
    err = capsys.readouterr().err
    assert f"The tokenizer stored with {mismatched} has 305 tokens, but the model's vocabulary has 300" in err
    assert not (tmp_path / "lm").exists()

    # the same state reached by hand in a model folder: load_model (and so generate) refuses it too
    assert main(["convert", "hf-to-lmforge", str(hf_gpt2[1]), str(tmp_path / "lm")]) == 0
    shutil.copyfile(mismatched / "tokenizer.json", tmp_path / "lm" / "tokenizer.json")
    assert main(["generate", "--checkpoint", str(tmp_path / "lm"), "--prompt", "the cat"]) == 2
    assert "has 305 tokens, but the model's vocabulary has 300" in capsys.readouterr().err


def test_convert_into_a_file_is_refused(hf_gpt2, tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("mine")
    assert main(["convert", "hf-to-lmforge", str(hf_gpt2[1]), str(target)]) == 2
    assert f"The output {target} is a file; a conversion writes a folder" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_init_from_a_hf_folder_and_from_a_converted_folder(hf_gpt2, corpus, tmp_path):
    hf_model, folder = hf_gpt2
    arch = {"class_path": "gpt", "init_args": {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 32}}
    main(["convert", "hf-to-lmforge", str(folder), str(tmp_path / "lm")])
    for source in (folder, tmp_path / "lm"):
        cfg = tiny_config(corpus, tmp_path / "run", architecture=arch)
        cfg["model"]["init_args"]["init_from"] = str(source)
        cli = run_trainer_cli(["fit", "--config", str(write_config(tmp_path / "init.yaml", cfg))], run=False)
        ids = torch.randint(0, 300, (1, 16))
        with torch.no_grad():
            torch.testing.assert_close(cli.model.eval()(ids), hf_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_init_from_a_model_of_another_shape_names_the_tensors(hf_gpt2, corpus, tmp_path, capsys):
    cfg = tiny_config(corpus, tmp_path / "run")
    cfg["model"]["init_args"]["architecture"]["init_args"]["d_model"] = 64
    cfg["model"]["init_args"]["init_from"] = str(hf_gpt2[1])
    assert main(["fit", "--config", str(write_config(tmp_path / "bad.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "wte.weight: checkpoint (300, 32) vs model (300, 64)" in err


@pytest.mark.parametrize(
    "config_bytes, message",
    [
        (b'{"model_type": "gpt2", "vocab_size": 3\xe9}', "is not readable JSON"),
        (b'{"model_type": "gpt2",', "is not readable JSON"),
        (b'{"vocab_size": 300}', "names no model_type"),
        (b'["gpt2"]', "names no model_type"),
        (b'{"model_type": "gpt2"}', "lacks 'vocab_size'"),
        (b'{"model_type": "llama", "vocab_size": 300}', "Convertible types"),
    ],
)
def test_broken_hf_folders_are_refused_by_name(hf_gpt2, tmp_path, capsys, config_bytes, message):
    _, folder = hf_gpt2
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "config.json").write_bytes(config_bytes)
    assert main(["convert", "hf-to-lmforge", str(broken), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_convert_refuses_to_write_into_its_source(hf_gpt2, tmp_path, capsys):
    _, folder = hf_gpt2
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert main(["convert", "hf-to-lmforge", str(folder), str(folder), "--overwrite"]) == 2
    assert "would write into its own source" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
