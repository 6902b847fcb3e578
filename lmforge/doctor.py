"""``lmforge doctor``: preflight checks for the things that most often hang a multi-node launch.

Run it on every node, in the same environment the training will run in (inside the sbatch
script before ``srun lmforge fit``, or with the same torchrun variables)::

    lmforge doctor --config my-run.yaml

Checks, each printed with what was found and, on failure, what to fix (exit status 1 if any fails):

* **launcher**: which environment launched us (SLURM, torchrun, or none), and whether its world
  size, ranks and tasks per node agree with each other and with ``trainer.devices`` x
  ``trainer.num_nodes`` of the config: a mismatch makes some ranks wait forever for the others;
* **rendezvous**: ``MASTER_ADDR`` resolves; on the master node ``MASTER_PORT`` can be bound (a port
  held by a stale job makes the new job hang or fail), elsewhere it is reachable (a connection
  that times out means a firewall or the wrong interface; "refused" only means the master is not
  listening yet);
* **backend**: a one-process process group of the backend (gloo, and nccl when CUDA is present)
  initialises and all-reduces, in a subprocess with a timeout, so a broken install shows up here;
* **cores**: data-loader workers and intra-op threads of all local processes do not oversubscribe
  the CPU cores this node gives us.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass

from lmforge.errors import ToolArgumentParser

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Check:
    name: str
    status: str
    found: str
    fix: str = ""


def _int(env: dict[str, str], key: str) -> int | None:
    try:
        return int(env[key]) if key in env and env[key] != "" else None
    except ValueError:
        return None


def _slurm_tasks_per_node(env: dict[str, str]) -> int | None:
    value = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    first = value.split(",")[0].split("(")[0]
    return int(first) if first.isdigit() else None


def _world_size(found: str, problems: list[str], fix: str) -> Check:
    """The "world size" check: OK with what was found, or FAIL listing every problem with ``fix``."""
    if not problems:
        return Check("world size", OK, found)
    return Check("world size", FAIL, f"{found}; {'; '.join(problems)}", fix)


def check_launcher(env: dict[str, str], devices: int | None, num_nodes: int | None) -> list[Check]:
    """World size and ranks: consistent within the launcher's variables and with the config."""
    checks: list[Check] = []
    slurm = "SLURM_NTASKS" in env or "SLURM_JOB_ID" in env
    torchrun = "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env)
    expected = devices * num_nodes if devices and num_nodes else None
    if slurm and torchrun:
        checks.append(Check("launcher", WARN, "both SLURM and torchrun variables are set",
                            "Lightning uses torchrun's when TORCHELASTIC_RUN_ID is set; run either `srun lmforge fit` "
                            "(one task per device) or torchrun inside a one-task-per-node allocation, not both."))
    if torchrun:
        rank, world, local, local_world = (_int(env, k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
        problems = []
        if world is None or rank is None:
            problems.append("RANK and WORLD_SIZE must both be integers")
        elif not 0 <= rank < world:
            problems.append(f"RANK={rank} is outside 0..WORLD_SIZE-1 ({world - 1})")
        if local is not None and local_world is not None and not 0 <= local < local_world:
            problems.append(f"LOCAL_RANK={local} is outside 0..LOCAL_WORLD_SIZE-1 ({local_world - 1})")
        if world and local_world and world % local_world:
            problems.append(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}")
        if expected and world and world != expected:
            problems.append(f"WORLD_SIZE={world} but the config asks for devices x num_nodes = {devices} x {num_nodes} "
                            f"= {expected}")
        if local_world and devices and local_world != devices:
            problems.append(f"torchrun starts {local_world} processes per node but trainer.devices={devices}")
        found = f"torchrun: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local} LOCAL_WORLD_SIZE={local_world}"
        checks.append(_world_size(found, problems,
                                  "Start torchrun with --nnodes equal to trainer.num_nodes and --nproc_per_node equal to "
                                  "trainer.devices on every node (same values everywhere, a different --node_rank each)."))
    elif slurm:
        ntasks, procid, localid = (_int(env, k) for k in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"))
        nnodes = _int(env, "SLURM_NNODES") or _int(env, "SLURM_JOB_NUM_NODES")
        per_node = _slurm_tasks_per_node(env)
        problems = []
        if ntasks is None:
            problems.append("SLURM_NTASKS is not set: run the training with `srun` inside the allocation")
        if ntasks and procid is not None and not 0 <= procid < ntasks:
            problems.append(f"SLURM_PROCID={procid} is outside 0..SLURM_NTASKS-1")
        if ntasks and nnodes and per_node and ntasks != nnodes * per_node:
            problems.append(f"SLURM_NTASKS={ntasks} but {nnodes} nodes x {per_node} tasks per node = {nnodes * per_node}")
        if expected and ntasks and ntasks != expected:
            problems.append(f"SLURM_NTASKS={ntasks} but the config asks for devices x num_nodes = {devices} x "
                            f"{num_nodes} = {expected}")
        if devices and per_node and per_node != devices:
            problems.append(f"--ntasks-per-node={per_node} but trainer.devices={devices}")
        if num_nodes and nnodes and nnodes != num_nodes:
            problems.append(f"the allocation has {nnodes} nodes but trainer.num_nodes={num_nodes}")
        if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
            problems.append("the job name is 'bash'/'interactive', so Lightning ignores SLURM (it thinks you are "
                            "debugging interactively); submit with sbatch or set --job-name")
        found = (f"SLURM job {env.get('SLURM_JOB_ID', '?')}: SLURM_NTASKS={ntasks} SLURM_NNODES={nnodes} "
                 f"tasks per node={per_node} SLURM_PROCID={procid} SLURM_LOCALID={localid}")
        checks.append(_world_size(found, problems,
                                  "In the sbatch script: --nodes=trainer.num_nodes and --ntasks-per-node=trainer.devices "
                                  "(one task per GPU), and launch with `srun lmforge fit ...`."))
    elif num_nodes and num_nodes > 1:
        checks.append(Check(
            "world size", FAIL,
            f"no SLURM or torchrun variables, but trainer.num_nodes={num_nodes}: Lightning alone starts processes on "
            "this machine only, so they would wait for the other nodes forever",
            "Launch with srun (configs/cluster/slurm.sbatch) or torchrun on every node (configs/cluster/torchrun.sh), "
            "or set trainer.num_nodes: 1."))
    else:
        checks.append(Check("world size", OK, "no SLURM or torchrun variables: a single-node run "
                            "(Lightning starts trainer.devices processes itself)"))
    return checks


def _is_local(addresses: set[str]) -> bool:
    if addresses & {"127.0.0.1", "::1"}:
        return True
    local = set()
    try:
        local |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    return bool(addresses & local)


def check_rendezvous(env: dict[str, str], timeout: float = 3.0) -> list[Check]:
    addr, port_text = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if not addr and not port_text:
        if "SLURM_JOB_ID" in env or "RANK" in env:
            return [Check("rendezvous", WARN, "MASTER_ADDR/MASTER_PORT are not set",
                          "Set them in the job script (the first node of the allocation and a free port, see "
                          "configs/cluster/slurm.sbatch); Lightning falls back to a default port that another job on "
                          "the same node may hold.")]
        return [Check("rendezvous", OK, "MASTER_ADDR/MASTER_PORT not set: a single-node run picks a free local port")]
    if not addr or not port_text:
        return [Check("rendezvous", FAIL, f"MASTER_ADDR={addr!r} MASTER_PORT={port_text!r}: one of them is missing",
                      "Set both, identically on every node.")]
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return [Check("rendezvous", FAIL, f"MASTER_PORT={port_text!r} is not a port number", "Use a port in 1024..65535.")]
    port = int(port_text)
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)}
    except OSError as exc:
        return [Check("rendezvous", FAIL, f"MASTER_ADDR={addr} does not resolve ({exc})",
                      "Use the master node's hostname as every node sees it (e.g. the first of `scontrol show "
                      "hostnames $SLURM_JOB_NODELIST`) or its IP address on the cluster network.")]
    found = f"MASTER_ADDR={addr} ({', '.join(sorted(addresses))}) MASTER_PORT={port}"
    rank = _int(env, "RANK") if "RANK" in env else _int(env, "SLURM_PROCID")
    if _is_local(addresses) and rank in (None, 0):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("", port))
        except OSError as exc:
            return [Check("rendezvous", FAIL, f"{found}: this is the master node and the port cannot be bound ({exc.strerror})",
                          "Another process (often a stale job) holds the port: pick another MASTER_PORT (e.g. derived "
                          "from $SLURM_JOB_ID) or stop the old process.")]
        return [Check("rendezvous", OK, f"{found}: master node, port free")]
    last: Exception | None = None
    for family, _, _, _, sockaddr in socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect(sockaddr)
                return [Check("rendezvous", OK, f"{found}: reachable, the rendezvous is listening")]
            except ConnectionRefusedError:
                return [Check("rendezvous", WARN, f"{found}: host reachable, nothing listens on the port yet",
                              "Fine before the job starts; during a launch it means rank 0 has not started (or died).")]
            except (TimeoutError, OSError) as exc:
                last = exc
    return [Check("rendezvous", FAIL, f"{found}: cannot connect ({last})",
                  "A firewall or the wrong network interface: open the port between the nodes, or set MASTER_ADDR to "
                  "the master's address on the network the nodes share (and NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME "
                  "to that interface).")]


_BACKEND_PROBE = textwrap.dedent(
    """
    import datetime, sys, torch, torch.distributed as dist
    backend, port = sys.argv[1], int(sys.argv[2])
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    device = "cuda" if backend == "nccl" else "cpu"
    t = torch.ones(4, device=device)
    dist.all_reduce(t)
    dist.destroy_process_group()
    print("backend", backend, "ok", float(t.sum()))
    """
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_backend(backend: str, timeout: float = 60.0) -> Check:
    try:
        proc = subprocess.run([sys.executable, "-c", _BACKEND_PROBE, backend, str(_free_port())],
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return Check(f"backend {backend}", FAIL, f"a 1-process {backend} process group did not initialise in {timeout:.0f} s",
                     "The install or the network stack is broken on this node (for gloo check the hostname "
                     "resolves; for nccl the driver and NCCL_* variables).")
    if proc.returncode != 0 or "ok" not in proc.stdout:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return Check(f"backend {backend}", FAIL, f"a 1-process {backend} process group failed: {last}",
                     "Reinstall PyTorch with distributed support for this machine (for nccl: a CUDA build and a "
                     "working driver).")
    return Check(f"backend {backend}", OK, f"a 1-process {backend} process group initialised and all-reduced")


def check_cores(env: dict[str, str], local_processes: int, num_workers: int) -> Check:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = _int(env, "OMP_NUM_THREADS")
    busy = local_processes * (1 + num_workers)
    found = (f"{cores} core(s) for {local_processes} local process(es) x (1 + {num_workers} data-loader workers) = "
             f"{busy} busy processes; OMP_NUM_THREADS={threads if threads is not None else 'unset'}")
    if busy > cores:
        workers_that_fit = max(cores // max(local_processes, 1) - 1, 0)
        if num_workers > workers_that_fit:
            fix = (f"Lower data.num_workers to at most {workers_that_fit} (cores / processes per node - 1), or ask "
                   "the scheduler for more cores (--cpus-per-task).")
        else:  # more processes than cores even without workers
            fix = ("Start fewer processes per node (trainer.devices, --ntasks-per-node or --nproc_per_node) or ask "
                   "the scheduler for more cores.")
        return Check("cores", FAIL, found + ": oversubscribed", fix)
    if local_processes > 1 and threads is None:
        return Check("cores", WARN, found,
                     f"Set OMP_NUM_THREADS={max(cores // local_processes, 1)} so the local processes' intra-op threads "
                     "do not compete (torchrun sets 1 by default).")
    if threads is not None and threads * local_processes > cores:
        return Check("cores", FAIL, found + f": {local_processes} x OMP_NUM_THREADS={threads} threads on {cores} cores",
                     f"Set OMP_NUM_THREADS={max(cores // local_processes, 1)}.")
    return Check("cores", OK, found)


def run_checks(env: dict[str, str], devices: int | None, num_nodes: int | None, num_workers: int,
               backends: list[str]) -> list[Check]:
    checks = check_launcher(env, devices, num_nodes)
    checks += check_rendezvous(env)
    checks += [check_backend(b) for b in backends]
    local = _int(env, "LOCAL_WORLD_SIZE") or _slurm_tasks_per_node(env) or devices or 1
    checks.append(check_cores(env, local, num_workers))
    return checks


def doctor_command(argv: list[str]) -> int:
    parser = ToolArgumentParser(
        prog="lmforge doctor",
        description="Preflight checks for a (multi-node) launch: launcher variables, rendezvous address and port, "
        "the process-group backend, CPU cores. Exit status 1 if a check fails.",
    )
    parser.add_argument("--config", action="append", default=[], help="the run's YAML config (for devices, "
                        "num_nodes and data.num_workers)")
    parser.add_argument("--devices", type=int, default=None, help="processes per node (default: trainer.devices)")
    parser.add_argument("--num_nodes", type=int, default=None, help="nodes (default: trainer.num_nodes)")
    parser.add_argument("--num_workers", type=int, default=None, help="data-loader workers per process")
    parser.add_argument("--backend", action="append", default=None, help="gloo | nccl (default: gloo, and nccl with CUDA)")
    parser.add_argument("--skip_backend", action="store_true", help="do not start the backend probe")
    args = parser.parse_args(argv)
    devices, num_nodes, workers = args.devices, args.num_nodes, args.num_workers
    if args.config:
        from lmforge.estimate import _get, load_config

        config = load_config(args.config, [])
        trainer = config.get("trainer") or {}
        devices = devices or (trainer.get("devices") if isinstance(trainer.get("devices"), int) else None)
        num_nodes = num_nodes or trainer.get("num_nodes") or 1
        workers = workers if workers is not None else int(_get(config, "data.num_workers", 0) or 0)
    backends = args.backend
    if backends is None:
        backends = ["gloo"]
        try:
            import torch

            if torch.cuda.is_available():
                backends.append("nccl")
        except ImportError:
            pass
    checks = run_checks(dict(os.environ), devices, num_nodes, workers or 0, [] if args.skip_backend else backends)
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"[{c.status:>4}] {c.name:<{width}}  {c.found}")
        if c.fix and c.status != OK:
            print(f"       {'':<{width}}  fix: {c.fix}")
    failed = [c for c in checks if c.status == FAIL]
    print(f"{len(failed)} check(s) failed." if failed else "all checks passed.")
    return 1 if failed else 0
