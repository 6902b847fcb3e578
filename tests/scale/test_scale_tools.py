"""lmforge doctor, lmforge estimate, streaming consolidation, strategy names (no DeepSpeed imported here)."""

from __future__ import annotations

import gc
import json
import socket
import subprocess
import sys
import weakref
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_config
from ports import free_port

from lmforge.doctor import FAIL, OK, WARN, check_cores, check_launcher, check_rendezvous
from lmforge.estimate import estimate_memory

REPO = Path(__file__).resolve().parents[2]


# -- doctor ----------------------------------------------------------------------------------------
def test_doctor_accepts_a_consistent_torchrun_environment_and_refuses_inconsistent_ones():
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}
    assert [c.status for c in check_launcher(env, devices=2, num_nodes=2)] == [OK]
    bad_rank = check_launcher({**env, "RANK": "4"}, devices=2, num_nodes=2)[0]
    assert bad_rank.status == FAIL and "RANK=4 is outside" in bad_rank.found and "--nproc_per_node" in bad_rank.fix
    wrong_size = check_launcher(env, devices=4, num_nodes=2)[0]
    assert wrong_size.status == FAIL and "devices x num_nodes = 4 x 2 = 8" in wrong_size.found


def test_doctor_checks_slurm_tasks_against_the_config():
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4",
           "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_NAME": "train"}
    assert check_launcher(env, devices=4, num_nodes=2)[0].status == OK
    wrong = check_launcher(env, devices=8, num_nodes=1)[0]
    assert wrong.status == FAIL and "--ntasks-per-node=4 but trainer.devices=8" in wrong.found
    interactive = check_launcher({**env, "SLURM_JOB_NAME": "bash"}, devices=4, num_nodes=2)[0]
    assert interactive.status == FAIL and "interactive" in interactive.found


def test_doctor_refuses_several_nodes_without_a_launcher():
    assert check_launcher({}, devices=2, num_nodes=1)[0].status == OK
    alone = check_launcher({"MASTER_ADDR": "127.0.0.1"}, devices=2, num_nodes=2)[0]
    assert alone.status == FAIL and "trainer.num_nodes=2" in alone.found and "torchrun" in alone.fix


def test_doctor_rendezvous_port_free_held_and_unresolvable():
    port = free_port()
    assert check_rendezvous({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0"})[0].status == OK
    with socket.socket() as holder:  # a stale job holding the port
        holder.bind(("", port))
        holder.listen()
        held = check_rendezvous({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0"})[0]
        assert held.status == FAIL and "cannot be bound" in held.found
        # another rank sees the rendezvous listening
        assert check_rendezvous({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "1"})[0].status == OK
    refused = check_rendezvous({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "1"})[0]
    assert refused.status == WARN and "nothing listens" in refused.found
    bad = check_rendezvous({"MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "29500"})[0]
    assert bad.status == FAIL and "does not resolve" in bad.found
    assert check_rendezvous({"MASTER_ADDR": "127.0.0.1"})[0].status == FAIL  # a port is missing


def test_doctor_cores():
    cores = len(__import__("os").sched_getaffinity(0))
    over = check_cores({}, local_processes=cores, num_workers=2)
    assert over.status == FAIL and "oversubscribed" in over.found and "num_workers" in over.fix
    assert check_cores({"OMP_NUM_THREADS": "1"}, local_processes=1, num_workers=0).status == OK
    no_workers = check_cores({}, local_processes=cores + 1, num_workers=0)  # too many processes, not workers
    assert no_workers.status == FAIL and "num_workers" not in no_workers.fix and "fewer processes" in no_workers.fix


def test_doctor_command_end_to_end_and_no_deepspeed_import(corpus, tmp_path):
    """`lmforge doctor` (with its gloo probe) exits 0 then 1; importing lmforge never imports DeepSpeed."""
    good = write_config(tmp_path / "good.yaml", tiny_config(corpus, tmp_path / "run", devices=1))
    bad_cfg = tiny_config(corpus, tmp_path / "run", devices=1)
    bad_cfg["data"]["num_workers"] = 64
    bad = write_config(tmp_path / "bad.yaml", bad_cfg)
    script = f"""
import io, contextlib, sys
import lmforge, lmforge.training_cli, lmforge.strategies, lmforge.zero_checkpoint
from lmforge.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["--help"]) == 0
codes = []
for cfg in ({str(good)!r}, {str(bad)!r}):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        codes.append(main(["doctor", "--config", cfg]))
    print(out.getvalue())
print("CODES", codes, "DEEPSPEED", "deepspeed" in sys.modules)
"""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CODES [0, 1] DEEPSPEED False" in result.stdout, result.stdout
    assert "[  ok] backend gloo" in result.stdout
    assert "[FAIL] cores" in result.stdout and "fix: Lower data.num_workers" in result.stdout


# -- estimate --------------------------------------------------------------------------------------
def test_estimate_counts_parameters_on_the_meta_device_and_orders_the_strategies(corpus, tmp_path, capsys):
    from lmforge_plugins.architectures.gpt import GPT

    from lmforge.cli import main

    config = write_config(tmp_path / "c.yaml", tiny_config(corpus, tmp_path / "run"))
    results = {}
    for strategy in ("ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload"):
        assert main(["estimate", "--config", str(config), "--devices", "4", "--strategy", strategy, "--json",
                     "--model.architecture.n_layer", "6", "--model.architecture.d_model=256"]) == 0
        results[strategy] = json.loads(capsys.readouterr().out)
    real = GPT(vocab_size=300, n_layer=6, n_head=2, d_model=256, block_size=32)
    assert results["ddp"]["n_params"] == sum(p.numel() for p in real.parameters())
    state = {s: sum(r["bytes_per_device"][k] for k in ("params", "grads", "optimizer")) for s, r in results.items()}
    assert state["deepspeed_stage_3"] < state["deepspeed_stage_2"] <= state["deepspeed_stage_1"] < state["ddp"]
    offload = results["deepspeed_stage_3_offload"]["bytes_per_device"]
    assert offload["optimizer"] == 0 and offload["params"] == 0 and offload["host"] > 0

    assert main(["estimate", "--config", str(config), "--devices", "2", "--strategy", "deepspeed_stage_3"]) == 0
    text = capsys.readouterr().out
    assert "per device:" in text and "optimizer states" in text and "activations" in text


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model.architecture.n_layr", "3"],
         "Invalid config at 'model.architecture.n_layr': GPT has no option 'n_layr'. Did you mean 'n_layer'"),
        (["--devices", "-2"], "--devices (or trainer.devices) must be a positive number of processes, not -2."),
        (["--devices", "0"], "--devices (or trainer.devices) must be a positive number of processes, not 0."),
        (["--strategy", "deepspeed_stage_9"], "'deepspeed_stage_9' is not a strategy lmforge estimates: use single, ddp"),
        (["--precision", "13"], "'13' is not a precision Lightning trains with; use one of 32-true, bf16-mixed"),
    ],
)
def test_estimate_names_a_bad_option(corpus, tmp_path, capsys, args, expected):
    from lmforge.cli import main

    config = write_config(tmp_path / "c.yaml", tiny_config(corpus, tmp_path / "run"))
    assert main(["estimate", "--config", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and expected in err and "Traceback" not in err, err


def test_estimate_of_task_data_takes_its_max_length(capsys):
    """Task data has no block_size: the tokens per row are data.max_length (its default when left out),
    so a T5 task (an architecture without block_size) is not estimated with 0 tokens."""
    import json

    from conftest import REPO

    from lmforge.cli import main

    def estimate(config: str, *extra: str) -> dict:
        assert main(["estimate", "--config", str(REPO / "configs" / "tasks" / config), "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["bytes_per_device"]

    t5 = estimate("text_to_text.yaml")
    assert t5["activations"] > 0
    short, long = estimate("sequence_classification.yaml", "--data.max_length", "16"), estimate(
        "sequence_classification.yaml", "--data.max_length", "64")
    assert short["params"] == long["params"] and long["activations"] > 3 * short["activations"]


def test_estimate_formulas():
    psi = 10_000_000
    ddp = estimate_memory(psi, "ddp", 2, gradient_as_bucket_view=True)
    assert (ddp.params, ddp.grads, ddp.optimizer, ddp.buffers) == (4 * psi, 4 * psi, 8 * psi, 0)
    assert estimate_memory(psi, "ddp", 2).buffers == 4 * psi  # Lightning's DDP keeps its buckets
    z3 = estimate_memory(psi, "deepspeed_stage_3", 4, "bf16-mixed", ds_config={"zero_optimization": {"reduce_bucket_size": 0}})
    assert (z3.params, z3.grads, z3.optimizer) == (2 * psi / 4, 2 * psi / 4, 12 * psi / 4)
    act = estimate_memory(psi, "ddp", 1, n_layer=12, d_model=512, n_head=8, vocab_size=1000, batch_size=4, seq_len=256)
    ckpt = estimate_memory(psi, "ddp", 1, n_layer=12, d_model=512, n_head=8, vocab_size=1000, batch_size=4, seq_len=256,
                           activation_checkpointing=True)
    assert 0 < ckpt.activations < act.activations / 3


# -- streaming consolidation -----------------------------------------------------------------------
def test_safetensors_are_written_one_tensor_at_a_time(tmp_path):
    """No tensor the writer asked for is still alive when it asks for the next one."""
    from safetensors.torch import load_file

    from lmforge.zero_checkpoint import write_safetensors_streaming

    alive: list[weakref.ref] = []
    expected = {f"w{i}": torch.randn(50, 40) for i in range(5)}

    def reader(name):
        def read():
            gc.collect()
            assert all(ref() is None for ref in alive), "an earlier tensor is still referenced"
            tensor = expected[name].clone()
            alive.append(weakref.ref(tensor))
            return tensor

        return read

    tensors = OrderedDict((name, ((50, 40), torch.float32, reader(name))) for name in expected)
    stats = write_safetensors_streaming(tensors, tmp_path / "model.safetensors", dtype=torch.bfloat16)
    assert stats == {"tensors": 5, "bytes": 5 * 50 * 40 * 2, "largest": 50 * 40 * 2}
    loaded = load_file(str(tmp_path / "model.safetensors"))
    for name, tensor in expected.items():
        assert loaded[name].dtype == torch.bfloat16
        torch.testing.assert_close(loaded[name], tensor.to(torch.bfloat16), rtol=0, atol=0)


def test_consolidation_refuses_what_is_not_a_zero_checkpoint(tmp_path, capsys):
    from lmforge.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["convert", "zero-to-safetensors", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "is not a DeepSpeed ZeRO checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- strategy names --------------------------------------------------------------------------------
def test_zero_names_are_registered_without_importing_deepspeed():
    from lightning.pytorch.strategies import StrategyRegistry

    from lmforge import strategies

    for name in ("deepspeed_stage_1", "deepspeed_stage_1_offload", "deepspeed_stage_2_offload", "deepspeed_stage_3_offload"):
        assert name in StrategyRegistry and name in strategies.ZERO_NAMES
        assert name.replace("deepspeed", "deepspeed_cpu") in StrategyRegistry
    assert strategies.ZERO_NAMES["deepspeed_stage_3_offload"] == {
        "stage": 3, "offload_optimizer": True, "offload_parameters": True}
    assert strategies.resolve_strategy("ddp", "cpu") == "ddp"  # anything else is left alone


def test_estimate_reads_the_stage_and_buckets_of_a_deepspeed_json_config(corpus, tmp_path, capsys, monkeypatch):
    """configs/strategies/deepspeed_json.yaml (its ds_zero3.json) is estimated as ZeRO-3, like the name."""
    from conftest import REPO

    from lmforge.cli import main

    monkeypatch.chdir(REPO)  # the fragment names its JSON relative to the repository root

    config = write_config(tmp_path / "c.yaml", tiny_config(corpus, tmp_path / "run"))
    results = {}
    for name, extra in (("json", ["--config", "configs/strategies/deepspeed_json.yaml"]),
                        ("name", ["--strategy", "deepspeed_stage_3"])):
        assert main(["estimate", "--config", str(config), *extra, "--devices", "2", "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    assert results["json"]["strategy"] == "deepspeed_stage_3 (configs/strategies/ds_zero3.json)"
    got, named = results["json"]["bytes_per_device"], results["name"]["bytes_per_device"]
    assert (got["params"], got["grads"], got["optimizer"]) == (named["params"], named["grads"], named["optimizer"])
    assert got["buffers"] == 4 * 5_000_000  # the JSON's reduce_bucket_size, fp32

    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  strategy:\n    class_path: lmforge.strategies.DeepSpeedZeroStrategy\n"
                   f"    init_args: {{config: {tmp_path / 'missing.json'}}}\n")
    assert main(["estimate", "--config", str(config), "--config", str(bad), "--devices", "2"]) == 2
    err = capsys.readouterr().err
    assert "the DeepSpeed config" in err and "missing.json" in err and "Traceback" not in err
