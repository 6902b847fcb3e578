"""Committed checkpoints: layout and manifest, verification, `last`, retention, and safe loading."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rel_helpers import config, run_in_process, small_corpus, write

import lmforge
from lmforge.errors import LmforgeError
from lmforge.reliability.checkpoint_io import (
    MANIFEST,
    apply_retention,
    committed_checkpoints,
    point,
    resolve_checkpoint,
    write_file,
)


def snapshot(root: Path) -> dict:
    """Every file's bytes and every link's target under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus):
    """A 4-step run with saves at steps 2 and 4."""
    root = tmp_path_factory.mktemp("committed")
    data = small_corpus(root / "data")
    cfg = config(data, corpus["tokenizer"], root / "run", max_steps=4, val_check_interval=2, step_log=False)
    cfg["model"]["init_args"]["objective"] = {"class_path": "clm"}  # a built-in: load_model needs no test plugin
    cfg = write(root / "cfg.yaml", cfg)
    assert run_in_process(["fit", "--config", str(cfg)]) == 0
    return {"run": root / "run", "cfg": cfg}


@pytest.fixture
def run(base_run, tmp_path):
    """A private copy of the base run (links kept as links) and its config."""
    copy = tmp_path / "run"
    shutil.copytree(base_run["run"], copy, symlinks=True)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(base_run["cfg"].read_text().replace(str(base_run["run"]), str(copy)))
    return {"run": copy, "cfg": cfg}


def test_layout_manifest_pointers_and_retention_after_a_run(base_run):
    checkpoints = base_run["run"] / "checkpoints"
    committed = committed_checkpoints(checkpoints)
    _, newest, manifest = committed[-1]
    assert manifest["step"] == 4 and manifest["world_size"] == 1 and manifest["format"] == "lmforge-checkpoint"
    assert sorted(manifest["files"]) == ["model.ckpt", "rank-0.pt"]
    for name, entry in manifest["files"].items():  # sizes and hashes are those of the files
        data = (newest / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert {p["name"] for p in manifest["plugins"]} == {"gpt", "clm"}
    assert all(p["version"] for p in manifest["plugins"]) and len(manifest["config_sha256"]) == 64
    assert [seq for seq, _, _ in committed] == sorted({seq for seq, _, _ in committed})
    last = checkpoints / "last.ckpt"
    assert last.is_symlink() and not os.path.isabs(os.readlink(last))
    assert last.resolve() == newest / "model.ckpt" and last.is_file()
    best = list(checkpoints.glob("best-step*.ckpt"))
    assert len(best) == 1 and best[0].is_symlink()
    # retention: only checkpoints a pointer refers to, and the newest, are kept
    kept = {d for _, d, _ in committed}
    assert kept == {newest, best[0].resolve().parent}
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]
    assert lmforge.load_model(base_run["run"]).tokenizer().decode([5, 6]) is not None


def test_retention_never_deletes_the_resume_source_or_the_newest(tmp_path):
    checkpoints = tmp_path / "checkpoints"

    def fake_commit(name: str, sequence: int) -> Path:
        directory = checkpoints / name
        size, sha = write_file(directory / "model.ckpt", lambda f: f.write(name.encode()))
        manifest = {"format": "lmforge-checkpoint", "version": 1, "sequence": sequence, "step": sequence,
                    "files": {"model.ckpt": {"size": size, "sha256": sha}}}
        write_file(directory / MANIFEST, lambda f: f.write(json.dumps(manifest).encode()))
        return directory

    dirs = [fake_commit(f"step-{i:08d}", i) for i in range(1, 6)]
    (checkpoints / "step-00000009").mkdir()  # no manifest: not a checkpoint, never touched or loaded
    point(checkpoints / "best-step2.ckpt", dirs[1] / "model.ckpt")
    removed = apply_retention(checkpoints, protect={dirs[0]})
    assert sorted(p.name for p in removed) == ["step-00000003", "step-00000004"]
    left = sorted(p.name for p in checkpoints.iterdir())
    assert left == ["best-step2.ckpt", "step-00000001", "step-00000002", "step-00000005", "step-00000009"]
    assert resolve_checkpoint(checkpoints) == dirs[4] / "model.ckpt"  # newest committed, not the manifest-less one
    with pytest.raises(LmforgeError, match="not a committed lmforge checkpoint"):
        resolve_checkpoint(checkpoints / "step-00000009")


def test_resuming_from_an_older_checkpoint_keeps_the_later_ones(tmp_path, corpus):
    """Train to step 6, step back to step 4 and train 1 step: the step-6 checkpoint (the line the user left)
    is kept, and retention still applies to the new line's own commits (before, step 6 was deleted)."""
    data = small_corpus(tmp_path / "data")
    cfg = config(data, corpus["tokenizer"], tmp_path / "run", max_steps=6, val_check_interval=2, step_log=False,
                 limit_val_batches=0)
    cfg["model"]["init_args"]["objective"] = {"class_path": "clm"}
    cfg = write(tmp_path / "cfg.yaml", cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert run_in_process(["fit", "--config", str(cfg), "--trainer.max_steps", "4"]) == 0
    assert run_in_process(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 0  # 4 -> 6
    assert [m["step"] for _, _, m in committed_checkpoints(checkpoints)] == [4, 6]
    assert run_in_process(["fit", "--config", str(cfg), "--ckpt_path", str(checkpoints / "step-00000004"),
                           "--trainer.max_steps", "5"]) == 0
    assert sorted(m["step"] for _, _, m in committed_checkpoints(checkpoints)) == [4, 5, 6]
    assert (checkpoints / "last.ckpt").resolve().parent.name == "step-00000005"


def test_last_is_the_newest_committed_even_when_the_pointer_lags(run):
    checkpoints = run["run"] / "checkpoints"
    sequence, pointed, manifest = committed_checkpoints(checkpoints)[-1]
    assert (checkpoints / "last.ckpt").resolve().parent == pointed
    # a later commit whose pointer update never happened (the process was killed in between)
    newer = checkpoints / "step-00000005"
    shutil.copytree(pointed, newer)
    (newer / MANIFEST).write_text(json.dumps({**manifest, "sequence": sequence + 1, "step": 5}))
    assert (checkpoints / "last.ckpt").resolve().parent == pointed
    assert resolve_checkpoint(run["run"]) == newer / "model.ckpt"
    assert resolve_checkpoint(checkpoints / "last.ckpt") == pointed / "model.ckpt"  # an explicit pointer is honoured
    assert lmforge.load_model(run["run"]).state_dict().keys()


def test_a_corrupt_checkpoint_is_an_error_naming_the_file(run, capsys):
    newest = committed_checkpoints(run["run"] / "checkpoints")[-1][1]
    model = newest / "model.ckpt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    before = snapshot(run["run"])
    with pytest.raises(LmforgeError, match=f"The checkpoint file {model} is corrupt: its sha256 differs"):
        lmforge.load_model(run["run"])
    assert run_in_process(["fit", "--config", str(run["cfg"]), "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err
    assert f"lmforge: error: The checkpoint file {model} is corrupt" in err
    assert snapshot(run["run"]) == before  # nothing written


def test_a_checkpoint_without_a_valid_manifest_is_never_loaded(run, tmp_path, capsys):
    checkpoints = run["run"] / "checkpoints"
    newest = committed_checkpoints(checkpoints)[-1][1]
    partial = checkpoints / "step-00000099"
    shutil.copytree(newest, partial)
    (partial / MANIFEST).unlink()  # a save that never reached its manifest
    loose = tmp_path / "copied.ckpt"
    shutil.copy(newest / "model.ckpt", loose)  # a file taken out of its checkpoint
    assert resolve_checkpoint(run["run"]) == newest / "model.ckpt"  # "last" ignores it
    for path in (partial, partial / "model.ckpt", loose):
        with pytest.raises(LmforgeError, match="not"):
            lmforge.load_model(path)
    before = snapshot(run["run"])
    assert run_in_process(["fit", "--config", str(run["cfg"]), "--ckpt_path", str(partial)]) == 2
    assert "is not a committed lmforge checkpoint" in capsys.readouterr().err
    assert snapshot(run["run"]) == before


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_a_file_that_is_not_a_whole_checkpoint_is_named_with_its_fault(run, tmp_path, capsys, damage):
    """``--ckpt_path FILE`` outside a committed checkpoint (no manifest to check it against)."""
    whole = (committed_checkpoints(run["run"] / "checkpoints")[-1][1] / "model.ckpt").read_bytes()
    loose = tmp_path / f"{damage}.ckpt"
    loose.write_bytes({"truncated": whole[: len(whole) // 2], "empty": b"", "text": b"step: 4\n"}[damage])
    reason = {"truncated": "not the zip archive torch.save writes", "empty": "the file is empty",
              "text": "not the zip archive torch.save writes"}[damage]
    before = snapshot(run["run"])
    for command in ("fit", "validate"):
        assert run_in_process([command, "--config", str(run["cfg"]), "--ckpt_path", str(loose)]) == 2
        err = capsys.readouterr().err
        assert f"lmforge: error: Cannot load checkpoint {loose}: it is not a complete PyTorch checkpoint ({reason})" in err
        assert "Restore it from a copy" in err and "mmap" not in err and "Traceback" not in err
    assert snapshot(run["run"]) == before


class _Payload:
    """Unpickling this runs ``touch MARKER``: a planted pickle payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(model_file: Path, marker: Path) -> None:
    """Replace a committed checkpoint's model.ckpt with a pickle payload and re-record its manifest."""
    checkpoint = torch.load(model_file, weights_only=True)
    checkpoint["state_dict"]["payload"] = _Payload(marker)
    torch.save(checkpoint, model_file)
    manifest_file = model_file.parent / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    data = model_file.read_bytes()
    manifest["files"]["model.ckpt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_file.write_text(json.dumps(manifest))


def test_a_planted_pickle_payload_is_refused_everywhere(run, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "payload-ran"
    newest = committed_checkpoints(run["run"] / "checkpoints")[-1][1]
    plant(newest / "model.ckpt", marker)
    before = snapshot(run["run"])

    with pytest.raises(LmforgeError, match="weights_only"):
        lmforge.load_model(run["run"])
    assert run_in_process(["fit", "--config", str(run["cfg"]), "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err
    assert "weights_only" in err and "it holds objects other than tensors and plain data (posix.system)" in err
    assert run_in_process(["validate", "--config", str(run["cfg"]), "--ckpt_path", "last"]) == 2
    assert "weights_only" in capsys.readouterr().err
    assert not marker.exists()
    assert snapshot(run["run"]) == before

    # Lightning's own loading path: the CLI passes weights_only=True to Trainer.fit ...
    import lightning.pytorch as pl
    from lightning.fabric.plugins import TorchCheckpointIO

    seen = {}

    @functools.wraps(pl.Trainer.fit)
    def spy(self, *args, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", spy)
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(run["cfg"].read_text().replace(str(run["run"]), str(tmp_path / "fresh")))
    assert run_in_process(["fit", "--config", str(fresh)]) == 0
    assert seen.get("weights_only") is True, seen
    # ... and with it, Lightning's default checkpoint I/O refuses the payload too
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        TorchCheckpointIO().load_checkpoint(newest / "model.ckpt", weights_only=True)
    assert not marker.exists()
