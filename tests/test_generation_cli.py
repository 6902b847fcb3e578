"""`lmforge generate`: prompts from a file or stdin, JSONL output, streaming, stop strings, errors."""

from __future__ import annotations

import io
import json

import pytest
import torch

from lmforge.cli import main
from lmforge.generation import GenerationConfig, cut_at_stop_string, generate_batch


@pytest.fixture(scope="module")
def model_folder(corpus, tmp_path_factory):
    """An untrained tiny GPT with the corpus tokenizer, saved as an lmforge model folder."""
    from lmforge_plugins.architectures.gpt import GPT
    from lmforge_plugins.objectives.clm import CLM

    from lmforge.convert import save_model_folder
    from lmforge.families import DecoderLM

    torch.manual_seed(0)
    tokenizer_json = corpus["tokenizer"].read_text()
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_str(tokenizer_json).get_vocab_size()
    module = DecoderLM(architecture=GPT(vocab_size=vocab, n_layer=2, n_head=2, d_model=32, block_size=64), objective=CLM())
    with torch.no_grad():  # spread the logits so the text is not a near-tie lottery
        for p in module.parameters():
            p.mul_(3)
    module.tokenizer_json = tokenizer_json
    return save_model_folder(module, tmp_path_factory.mktemp("gen") / "model")


def reference(folder, prompt: str, max_new: int = 12, **options) -> list[str]:
    """The continuations generate_batch gives for ``prompt``, decoded as the CLI does."""
    from lmforge import load_model
    from lmforge.data.tokenizer import find_special_tokens

    model = load_model(folder)
    tokenizer = model.tokenizer()
    special = find_special_tokens(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new, **options)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    (sequences,) = generate_batch(model.architecture, "decoder", [tokenizer.encode(prompt).ids], config,
                                  pad_id=special.pad_id, eos_id=special.eos_id, decode=decode)
    return [cut_at_stop_string(decode(ids), config.stop_strings) for ids in sequences]


def test_prompts_from_a_file_and_stdin_to_jsonl(model_folder, tmp_path, monkeypatch, capsys):
    prompts = ["the cat", "a big dog sat on", "red"]
    (tmp_path / "prompts.txt").write_text(prompts[0] + "\n\n" + "\n".join(prompts[1:]) + "\n")
    common = ["generate", "--checkpoint", str(model_folder), "--max_new_tokens", "12", "--greedy", "--batch_size", "2"]
    assert main([*common, "--prompts_file", str(tmp_path / "prompts.txt"), "--output", str(tmp_path / "a.jsonl")]) == 0
    assert "wrote" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts  # the blank line is skipped
    assert [r["generated"] for r in rows] == [reference(model_folder, p, greedy=True) for p in prompts]

    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(prompts) + "\n"))
    assert main([*common, "--prompts_file", "-", "--output", str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()

    # Without --output, every prompt is printed followed by its continuation.
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(prompts) + "\n"))
    capsys.readouterr()
    assert main([*common, "--prompts_file", "-"]) == 0
    assert capsys.readouterr().out == "".join(f"{p}{r['generated'][0]}\n" for p, r in zip(prompts, rows))


def test_several_sampled_sequences_per_prompt(model_folder, tmp_path):
    args = ["generate", "--checkpoint", str(model_folder), "--prompt", "the dog", "--max_new_tokens", "10",
            "--num_return_sequences", "3", "--seed", "4", "--temperature", "1.5", "--output", str(tmp_path / "s.jsonl")]
    assert main(args) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert row["generated"] == reference(model_folder, "the dog", 10, num_return_sequences=3, seed=4, temperature=1.5)
    assert len(set(row["generated"])) == 3


def test_streaming_prints_the_same_text_as_not_streaming(model_folder, capsys):
    args = ["generate", "--checkpoint", str(model_folder), "--prompt", "the cat", "--max_new_tokens", "16"]
    for extra in (["--greedy"], ["--seed", "3", "--temperature", "1.3"]):
        assert main([*args, *extra]) == 0
        streamed = capsys.readouterr().out
        assert main([*args, *extra, "--no_stream"]) == 0
        assert streamed == capsys.readouterr().out
    assert streamed == "the cat" + reference(model_folder, "the cat", 16, seed=3, temperature=1.3)[0] + "\n"

    # A stop string: the text ends right before it, streamed or not.
    full = reference(model_folder, "the cat", 16, greedy=True)[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    outputs = []
    for extra in ([], ["--no_stream"]):
        assert main([*args, "--greedy", "--stop", stop, *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == "the cat" + full[: full.index(stop)] + "\n"


def test_bad_requests_are_refused(model_folder, tmp_path, capsys, monkeypatch):
    base = ["generate", "--checkpoint", str(model_folder)]
    for args, message in (
        ([], "exactly one of --prompt TEXT or --prompts_file"),
        (["--prompt", "a", "--prompts_file", "x.txt"], "exactly one of"),
        (["--prompts_file", str(tmp_path / "missing.txt")], "Cannot read --prompts_file"),
        (["--prompt", "a", "--stop_token", "no-such-token"], "not a token of this model's vocabulary"),
        (["--prompt", "a", "--greedy", "--num_return_sequences", "2"], "Greedy decoding gives one sequence"),
        (["--prompt", "a", "--num_beams", "2", "--min_p", "0.1"], "--num_beams > 1"),
        (["--prompt", "a", "--temperature", "nan"], "temperature must be 0 (greedy) or a positive number, got nan"),
        (["--prompt", "a", "--stop", ""], "A stop string is empty"),
    ):
        assert main([*base, *args]) == 2
        assert message in capsys.readouterr().err
    # a prompt longer than the model takes: refused before anything is printed (streamed output starts later)
    assert main([*base, "--prompt", "the cat sat " * 40]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("lmforge: error: The prompt (") and "exceeds the model's block_size (64)" in err
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert main([*base, "--prompts_file", str(tmp_path / "blank.txt")]) == 2
    assert "holds no prompt" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    for args, message in (
        (["--prompts_file", str(tmp_path / "latin1.txt")], "is not valid UTF-8"),
        (["--prompt", "a", "--output", str(tmp_path / "missing" / "x.jsonl")], "Cannot write --output"),
        (["--prompt", "a", "--device", "gpu0"], "is not a device name"),
    ):
        assert main([*base, *args]) == 2
        assert message in capsys.readouterr().err
    # The same bytes on standard input: read as UTF-8 whatever the locale, the bad byte named.
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"tea\ncaf\xe9\n"), encoding="latin-1"))
    assert main([*base, "--prompts_file", "-"]) == 2
    err = capsys.readouterr().err
    assert "Standard input (--prompts_file -) is not valid UTF-8: byte 7 (line 2) is 0xe9" in err
    assert "Traceback" not in err


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    """`lmforge plugins list | head -1`: the reader leaves early; no traceback, the shell's SIGPIPE status."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "plugins", "list", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()  # before the command has written anything (it is still importing)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_generate_output_never_replaces_inputs_weights_or_existing_files(model_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\na dog\n")
    common = ["generate", "--checkpoint", str(model_folder), "--max_new_tokens", "4", "--greedy",
              "--prompts_file", str(prompts)]
    weights = next(model_folder.glob("*.safetensors"))
    before = {p: p.read_bytes() for p in (prompts, weights)}
    for target, extra, message in ((prompts, ["--overwrite"], "is also an input"),
                                   (weights, ["--overwrite"], "is also an input"),
                                   (tmp_path / "old.jsonl", [], "already exists")):
        if target.name == "old.jsonl":
            target.write_text("kept\n")
        assert main([*common, "--output", str(target), *extra]) == 2
        assert message in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before and (tmp_path / "old.jsonl").read_text() == "kept\n"

    # A batch that fails half-way leaves the old file as it was and no partial file.
    prompts.write_text("the cat\n" + "the cat sat " * 40 + "\n")  # the second prompt is longer than block_size 64
    assert main([*common, "--batch_size", "1", "--output", str(tmp_path / "old.jsonl"), "--overwrite"]) == 2
    assert (tmp_path / "old.jsonl").read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.jsonl", "prompts.txt"]
