"""Mistakes found before anything is written: a read-only output directory, a checkpoint that does not
fit the model, and bad data files (empty, malformed JSON Lines, invalid UTF-8), each one paragraph,
with the output directory byte for byte as it was."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rel_helpers import config, run_in_process, small_corpus, write


def snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        out[rel] = ("link", os.readlink(p)) if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


def error_paragraph(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("lmforge: error: ")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` unwritable for this process: mode 555, and immutable when running as root."""
    mode = path.stat().st_mode
    path.chmod(0o555)
    immutable = os.access(path, os.W_OK)  # root ignores permission bits
    if immutable:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        assert not os.access(path, os.W_OK)
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(mode)


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("failfast")
    data = small_corpus(root / "data")
    cfg = config(data, corpus["tokenizer"], root / "run", max_steps=2, val_check_interval=2, step_log=False)
    cfg["model"]["init_args"]["objective"] = {"class_path": "clm"}
    assert run_in_process(["fit", "--config", str(write(root / "cfg.yaml", cfg))]) == 0
    return {"root": root, "run": root / "run", "cfg": cfg}


@pytest.fixture
def existing(base, tmp_path):
    """A private copy of a finished run and the config that resumes it."""
    run = tmp_path / "run"
    shutil.copytree(base["run"], run, symlinks=True)
    cfg = {**base["cfg"], "trainer": {**base["cfg"]["trainer"], "default_root_dir": str(run)}}
    return {"run": run, "cfg": cfg, "path": write(tmp_path / "cfg.yaml", cfg)}


def test_read_only_output_directory_is_refused_before_anything(base, tmp_path, capsys):
    parent = tmp_path / "readonly"
    parent.mkdir()
    cfg = {**base["cfg"], "trainer": {**base["cfg"]["trainer"], "default_root_dir": str(parent / "run")}}
    path = write(tmp_path / "cfg.yaml", cfg)
    with read_only(parent):
        assert run_in_process(["fit", "--config", str(path)]) == 2
    err = error_paragraph(capsys.readouterr().err)
    assert f"The run directory {parent / 'run'} cannot be written: {parent} is read-only" in err
    assert list(parent.iterdir()) == []


def test_resuming_into_a_read_only_run_directory_is_refused(existing, capsys):
    before = snapshot(existing["run"])
    with read_only(existing["run"]):
        assert run_in_process(["fit", "--config", str(existing["path"]), "--ckpt_path", "last"]) == 2
    assert "cannot be written" in error_paragraph(capsys.readouterr().err)
    assert snapshot(existing["run"]) == before


def test_resuming_with_other_shapes_lists_the_tensors_and_writes_nothing(existing, capsys):
    before = snapshot(existing["run"])
    code = run_in_process(["fit", "--config", str(existing["path"]), "--ckpt_path", "last",
                           "--model.architecture.d_model", "48", "--trainer.max_steps", "4"])
    assert code == 2
    err = error_paragraph(capsys.readouterr().err)
    assert "The checkpoint does not fit this model" in err
    assert "architecture.wte.weight: checkpoint (300, 32) vs model (300, 48)" in err
    assert snapshot(existing["run"]) == before  # no config.<time>.yaml, no metrics, no checkpoint


BAD_DATA = {
    "empty.txt": (b"", "is empty"),
    "broken.jsonl": (b'{"text": "the cat"}\n{"text": "the dog"\n', "line 2 is not a valid JSON object"),
    "latin1.txt": ("the caf\xe9 sat\n".encode("latin-1"), "is not valid UTF-8: byte 7 (line 1)"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_is_one_paragraph_before_any_run_artefact(name, existing, tmp_path, capsys):
    content, message = BAD_DATA[name]
    bad = tmp_path / name
    bad.write_bytes(content)
    before = snapshot(existing["run"])
    # a new run: no run directory appears
    fresh = tmp_path / "fresh"
    assert run_in_process(["fit", "--config", str(existing["path"]), "--data.train_files", str(bad),
                           "--trainer.default_root_dir", str(fresh)]) == 2
    err = error_paragraph(capsys.readouterr().err)
    assert str(bad) in err and message in err
    assert not fresh.exists()
    # resuming a run: the run directory is untouched
    assert run_in_process(["fit", "--config", str(existing["path"]), "--data.train_files", str(bad),
                           "--ckpt_path", "last"]) == 2
    assert message in error_paragraph(capsys.readouterr().err)
    assert snapshot(existing["run"]) == before


def test_a_refused_write_anywhere_in_a_command_is_one_paragraph(capsys, monkeypatch):
    """A full disk met outside the checkpoint save (the metrics log, here: raised where the CLI runs the
    trainer, wrapped as a RuntimeError the way torch wraps it) is one paragraph with the file and the
    fix, exit 2; an OSError that is not a refused write stays a traceback (a bug)."""
    import errno

    import lmforge.cli as cli

    def disk_full(argv, run=True):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/metrics.csv")
        except OSError as exc:
            raise RuntimeError("writer failed") from exc

    monkeypatch.setattr(cli, "run_trainer_cli", disk_full)
    assert cli.main(["fit", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lmforge: error: The file system refused: {os.strerror(errno.ENOSPC)} (/runs/x/metrics.csv).")
    assert "--ckpt_path last" in err and "--trainer.logger false" in err

    def not_found(argv, run=True):
        raise FileNotFoundError(errno.ENOENT, "missing", "/nowhere")

    monkeypatch.setattr(cli, "run_trainer_cli", not_found)
    with pytest.raises(FileNotFoundError):
        cli.main(["fit", "--config", "x.yaml"])
