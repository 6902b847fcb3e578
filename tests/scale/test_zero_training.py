"""DeepSpeed ZeRO 1/2/3 for real on 2 CPU processes (DeepSpeed's CPU accelerator over gloo).

One module-scoped fixture runs every training once, in three launches, and the tests read it:

* **two "nodes"** on this machine (``torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 1``
  on 127.0.0.1) train together, each running the same list of ``lmforge fit`` command lines
  (tests/scale/zero_runs.py): ZeRO-1, 2, 3 and offload runs, a ZeRO-3 run stopped at step 3 and
  resumed with ``--ckpt_path last``, gradient accumulation, bf16 with activation checkpointing;
* **one process** resumes the 2-process ZeRO-2 checkpoint (2 -> 1) and trains the 1-process
  ZeRO-2 run whose checkpoint the last launch resumes;
* ``lmforge fit --trainer.devices 2`` (Lightning's own launcher, as a user runs it) resumes that
  1-process checkpoint on 2 processes (1 -> 2).

The references are single-process runs (no DeepSpeed) with the same global batch, in this process.
The data order is made identical everywhere with ``overfit_batches`` (sequential, unshuffled
batches repeated every epoch; rank r of 2 takes rows r, r+2, ..., so a global batch of 2 ranks x 4
rows is exactly the single process's batch of 8 rows). Per-step losses are averaged over ranks by
``GlobalLossRecorder`` (metrics.csv holds rank 0's local loss). Losses agree to ``TOL`` (fp32: the
differences seen are ~1e-6, from the order of the reductions).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config, write_config
from ports import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))  # zero_runs: the loss recorder, also for the runs made in this process

from zero_runs import LOGIT_IDS

TOL = 1e-4  # absolute, on losses of ~5.5 (fp32)
#: ZeRO-3 through configs/strategies/deepspeed_json.yaml's strategy and its shipped ds_zero3.json.
SHIPPED_JSON_STRATEGY = {
    "class_path": yaml.safe_load((REPO / "configs/strategies/deepspeed_json.yaml").read_text())["trainer"]["strategy"]["class_path"],
    "init_args": {"config": str(REPO / "configs/strategies/ds_zero3.json")},
}
TIMEOUT = 420


class Runs:
    def __init__(self, corpus, root: Path) -> None:
        self.corpus, self.root = corpus, root

    def config(self, name: str, strategy: str, *, run: str | None = None, batch: int = 4, max_steps: int = 6,
               overfit: int = 3, arch: dict | None = None, **trainer) -> Path:
        cfg = tiny_config(self.corpus, self.root / (run or name), accelerator="cpu", strategy=strategy,
                          overfit_batches=overfit, val_check_interval=overfit, max_steps=max_steps, **trainer)
        cfg["data"].update(batch_size=batch, seed=7)
        # The schedule must not depend on max_steps (runs stop at 3 and resume to 6); a warmup past the
        # resume point makes the loss depend on the restored scheduler step too.
        cfg["model"]["init_args"].update(schedule="constant", warmup_steps=5)
        if arch:
            cfg["model"]["init_args"]["architecture"]["init_args"].update(arch)
        cfg["trainer"]["callbacks"] = [
            {"class_path": "zero_runs.GlobalLossRecorder", "init_args": {"path": str(self.losses_path(name))}}
        ]
        return write_config(self.root / f"{name}.yaml", cfg)

    def losses_path(self, name: str) -> Path:
        return self.root / f"{name}.losses.json"

    def losses(self, name: str, accumulate: int = 1) -> dict[int, float]:
        """step -> loss of each optimizer step, numbered from the first step the run made.

        With gradient accumulation the K micro-batch losses of a step (each already divided by K)
        are summed."""
        rows = json.loads(self.losses_path(name).read_text())["rows"]
        first = rows[0]["step"] if accumulate == 1 else 1
        out: dict[int, float] = {}
        for i, row in enumerate(rows):
            step = first + i // accumulate
            out[step] = out.get(step, 0.0) + row["loss"]
        return out

    def grad_norms(self, name: str) -> dict[int, float]:
        """step -> global gradient norm (before clipping) of that optimizer step."""
        return {int(k): v for k, v in json.loads(self.losses_path(name).read_text())["grad_norms"].items()}

    def file(self, name: str) -> Path:
        return self.root / name


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
            "LMFORGE_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "MASTER_PORT": str(free_port())}


def _check(results: list[subprocess.CompletedProcess], what: str) -> None:
    for r in results:
        assert r.returncode == 0, f"{what} failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


def _jobs(runs: Runs, name: str, jobs: list[dict]) -> Path:
    path = runs.file(f"{name}.jobs.json")
    path.write_text(json.dumps(jobs))
    return path


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    r = Runs(corpus, root)
    fit = lambda cfg, *extra: ["fit", "--config", str(cfg), *extra]
    node = {"num_nodes": 2, "devices": 1}

    # -- launch 1: two nodes (torchrun), one process each --------------------------------------------
    two = [
        {"argv": fit(r.config("z1", "deepspeed_stage_1", **node)), "ds_config": str(r.file("z1.ds.json"))},
        {"argv": fit(r.config("z2", "deepspeed_stage_2", **node))},
        {"argv": fit(r.config("z3", SHIPPED_JSON_STRATEGY, **node)), "logits": str(r.file("z3.logits.pt")),
         "done": str(r.file("z3.done.json"))},
        {"argv": fit(r.config("z3off", "deepspeed_stage_3_offload", **node)), "ds_config": str(r.file("z3off.ds.json"))},
        {"argv": fit(r.config("z2half", "deepspeed_stage_2", max_steps=3, **node))},
        {"argv": fit(r.config("z3half", "deepspeed_stage_3", max_steps=3, **node))},
        {"argv": fit(r.config("z3resume", "deepspeed_stage_3", run="z3half", **node), "--ckpt_path", "last"),
         "logits": str(r.file("z3resume.logits.pt"))},
        {"argv": fit(r.config("acc", "deepspeed_stage_2", overfit=4, max_steps=4, accumulate_grad_batches=2,
                              gradient_clip_val=0.05, **node)), "ds_config": str(r.file("acc.ds.json"))},
        {"argv": fit(r.config("bf16", "deepspeed_stage_3", precision="bf16-mixed",
                              arch={"activation_checkpointing": True}, **node)), "ds_config": str(r.file("bf16.ds.json"))},
    ]
    jobs = _jobs(r, "two_nodes", two)
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             str(HERE / "zero_runs.py"), str(jobs)],
            cwd=root, env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    for rank, (out, err) in enumerate(outs):
        (root / f"node{rank}.log").write_text(out + err)
    _check([subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)], "two-node run")

    # -- launch 2: one process: resume the 2-process ZeRO-2 checkpoint; a 1-process ZeRO-2 run ----------
    shutil.copytree(root / "z2half", root / "z2to1", symlinks=True)
    one = [
        {"argv": fit(r.config("z2to1", "deepspeed_stage_2", batch=8, devices=1), "--ckpt_path", "last")},
        {"argv": fit(r.config("z2one", "deepspeed_stage_2", batch=8, max_steps=3, devices=1))},
        {"argv": fit(r.config("fp16", "deepspeed_stage_2", devices=1, precision="16-mixed")),
         "error": str(r.file("fp16.error.txt"))},
    ]
    _check([subprocess.run([sys.executable, str(HERE / "zero_runs.py"), str(_jobs(r, "one", one))], cwd=root,
                           env=_env(root), capture_output=True, text=True, timeout=TIMEOUT, check=False)], "one-process run")

    # -- launch 3: `lmforge fit --trainer.devices 2` resumes the 1-process checkpoint on 2 processes -----
    shutil.copytree(root / "z2one", root / "z2to2", symlinks=True)
    cfg = r.config("z2to2", "deepspeed_stage_2", devices=2)
    _check([subprocess.run([sys.executable, "-m", "lmforge.cli", "fit", "--config", str(cfg), "--ckpt_path", "last"],
                           cwd=root, env=_env(root), capture_output=True, text=True, timeout=TIMEOUT, check=False)],
           "lmforge fit --trainer.devices 2")

    # -- references: one process, no DeepSpeed, the same global batch (in this process) -----------------
    from lmforge.cli import run_trainer_cli

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_CACHE", str(root / "cache"))
        run_trainer_cli(fit(r.config("ref", "auto", batch=8, devices=1)))
        run_trainer_cli(fit(r.config("accref", "auto", batch=16, overfit=2, max_steps=4, devices=1,
                                     gradient_clip_val=0.05)))
    return r


def _assert_losses_equal(found: dict[int, float], expected: dict[int, float], steps, tol: float = TOL) -> None:
    steps = list(steps)
    assert sorted(found) == steps, f"steps {sorted(found)} != {steps}"
    worst = max(abs(found[s] - expected[s]) for s in steps)
    assert worst <= tol, f"losses differ by up to {worst:.2e} (tolerance {tol}): {found} vs {expected}"


@pytest.mark.parametrize("name", ["z1", "z2", "z3", "z3off"])
def test_zero_stage_matches_single_process_loss_per_step(runs, name):
    ref = runs.losses("ref")
    _assert_losses_equal(runs.losses(name), ref, range(1, 7))
    assert ref[6] < ref[1] - 0.1  # it trains


def test_two_nodes_trained_together_with_the_cpu_deepspeed_strategy(runs):
    done = json.loads(runs.file("z3.done.json").read_text())
    assert done == {"world_size": 2, "num_nodes": 2, "global_step": 6, "strategy": "DeepSpeedCPUStrategy"}
    ds1 = json.loads(runs.file("z1.ds.json").read_text())
    assert ds1["zero_optimization"]["stage"] == 1
    off = json.loads(runs.file("z3off.ds.json").read_text())["zero_optimization"]
    assert off["stage"] == 3 and off["offload_optimizer"]["device"] == "cpu" and off["offload_param"]["device"] == "cpu"


def test_zero3_checkpoint_is_sharded_and_carries_lmforge_metadata(runs):
    from lmforge.zero_checkpoint import read_metadata, saved_world_size, tag_folder

    folder = tag_folder(runs.file("z3"))  # the run directory's last checkpoint: a directory of shards
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    assert saved_world_size(folder.parent) == 2
    meta = read_metadata(runs.file("z3"))
    assert meta["family"] == "decoder" and meta["architecture"]["name"] == "gpt"
    assert {p["name"] for p in meta["plugins"]} == {"gpt", "clm"}
    assert json.loads(meta["tokenizer_json"])["model"]["type"] == "BPE"


def test_zero3_resume_continues_the_uninterrupted_run(runs):
    uninterrupted = runs.losses("z3")
    _assert_losses_equal(runs.losses("z3resume"), uninterrupted, range(4, 7))
    torch.testing.assert_close(torch.load(runs.file("z3resume.logits.pt")), torch.load(runs.file("z3.logits.pt")),
                               rtol=0, atol=1e-4)


def test_consolidated_zero3_checkpoint_loads_on_one_process_with_identical_logits(runs, tmp_path):
    from lmforge.checkpoint import load_model
    from lmforge.cli import main

    for run, logits in (("z3", "z3.logits.pt"), ("z3half", "z3resume.logits.pt")):
        out = tmp_path / run
        assert main(["convert", "zero-to-safetensors", str(runs.file(run)), str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["lmforge.json", "model.safetensors", "tokenizer.json"]
        model = load_model(out)
        with torch.no_grad():
            torch.testing.assert_close(model(LOGIT_IDS), torch.load(runs.file(logits)), rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "z3" / "lmforge.json").read_text())["consolidated_from"]["world_size"] == 2
    for source in (runs.file("z3"), runs.file("z3") / "checkpoints" / "last.ckpt"):  # load_model reads shards too
        with torch.no_grad():
            torch.testing.assert_close(load_model(source)(LOGIT_IDS), torch.load(runs.file("z3.logits.pt")),
                                       rtol=0, atol=1e-6)
    assert "deepspeed" not in sys.modules  # consolidation reads the shards without DeepSpeed


def test_zero2_checkpoint_of_two_processes_resumes_on_one(runs):
    _assert_losses_equal(runs.losses("z2to1"), runs.losses("z2"), range(4, 7))


def test_zero2_checkpoint_of_one_process_resumes_on_two(runs):
    assert sorted(runs.losses("z2one")) == [1, 2, 3]
    _assert_losses_equal(runs.losses("z2one"), runs.losses("ref"), range(1, 4))
    _assert_losses_equal(runs.losses("z2to2"), runs.losses("ref"), range(4, 7))


def test_gradient_accumulation_equals_one_big_batch(runs):
    """2 ranks x 4 rows x 2 micro-batches = the reference's 16 rows per step, gradient clipping included.

    AdamW and clipping hide a wrongly scaled gradient from the losses, so the gradient norms DeepSpeed
    steps with are compared too (Lightning's own DeepSpeedStrategy divides them by 2 here).
    """
    assert json.loads(runs.file("acc.ds.json").read_text())["gradient_accumulation_steps"] == 2
    _assert_losses_equal(runs.losses("acc", accumulate=2), runs.losses("accref"), range(1, 5))
    norms, ref_norms = runs.grad_norms("acc"), runs.grad_norms("accref")
    assert sorted(norms) == sorted(ref_norms) == [1, 2, 3, 4]
    for step in ref_norms:
        assert norms[step] == pytest.approx(ref_norms[step], rel=1e-3), (norms, ref_norms)


def test_bf16_with_activation_checkpointing_trains_close_to_fp32(runs):
    ds = json.loads(runs.file("bf16.ds.json").read_text())
    assert ds["bf16"]["enabled"] is True
    bf16, fp32 = runs.losses("bf16"), runs.losses("z3")
    assert sorted(bf16) == list(range(1, 7))
    diffs = [abs(bf16[s] - fp32[s]) for s in range(1, 7)]
    assert max(diffs) < 0.02  # bf16 rounding, same trajectory
    assert max(diffs) > 1e-6  # and really in bf16
    assert bf16[6] < bf16[1] - 0.1


def test_fp16_on_cpu_is_refused_with_a_clear_message(runs):
    message = runs.file("fp16.error.txt").read_text()
    assert "16-mixed" in message and "bf16-mixed" in message and "not supported by DeepSpeed on CPU" in message
    assert not (runs.file("fp16") / "config.yaml").exists()  # refused before the run directory was written
