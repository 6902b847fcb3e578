"""Does each fine-tuning task config reach its stated score on its shipped fixture within 2 minutes on CPU?

Runs ``lmforge fit --config configs/tasks/<task>.yaml`` for every config in ``configs/tasks/`` (or the
ones named) as a separate process, in a fresh run directory and data cache, with Lightning's
``trainer.max_time`` set to the time limit, so every score it reports was reached within that much
training time. Then it reads the run's ``metrics.csv`` and prints, per task, the best validation
score against the target in :data:`TARGETS`, the first step that reached it, and the wall time of
the whole command (process start, data preparation and validation included).

    python benchmarks/task_scores.py                  # every config, 2 minutes each
    python benchmarks/task_scores.py sequence_classification --max_time 60
    python benchmarks/task_scores.py --smoke          # a few steps each: checks that the script runs

Exit status 1 when a task with a target misses it (not with ``--smoke``).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    metric: str  # a column of metrics.csv
    value: float  # the score to reach
    higher_is_better: bool = True


#: The stated score of each configs/tasks/<name>.yaml on its shipped validation fixture.
TARGETS: dict[str, Target] = {
    "sequence_classification": Target("val/accuracy", 0.95),
    "token_classification": Target("val/entity_f1", 0.90),
    "extractive_qa": Target("val/f1", 0.90),
    "text_to_text": Target("val/bleu", 0.90),
    "text_to_text-gpt": Target("val/bleu", 0.90),
}


def run_task(config: Path, max_time_s: int, work: Path, smoke: bool) -> tuple[int, float, Path, str]:
    """Fit one config; returns (exit status, wall seconds, run directory, stderr tail)."""
    run_dir = work / config.stem
    args = [
        sys.executable, "-m", "lmforge.cli", "fit", "--config", str(config),
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.max_time", f"00:00:{max_time_s // 60:02d}:{max_time_s % 60:02d}",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--data.cache_dir", str(work / "cache"),
    ]
    if smoke:
        args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2"]
    started = time.perf_counter()
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return result.returncode, time.perf_counter() - started, run_dir, result.stderr[-2000:]


def best_score(run_dir: Path, target: Target) -> tuple[float | None, int | None]:
    """The best value of ``target.metric`` and the first step at which the target was reached."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None, None
    best, first = None, None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            text = row.get(target.metric)
            if not text:
                continue
            value = float(text)
            better = best is None or (value > best if target.higher_is_better else value < best)
            best = value if better else best
            reached = value >= target.value if target.higher_is_better else value <= target.value
            if reached and first is None:
                first = int(row.get("step") or 0)
    return best, first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", help="config names in configs/tasks (default: all)")
    parser.add_argument("--max_time", type=int, default=120, help="training time limit per task, seconds")
    parser.add_argument("--smoke", action="store_true", help="a few steps per task: check that everything runs")
    args = parser.parse_args(argv)
    configs = sorted((REPO / "configs" / "tasks").glob("*.yaml"))
    if args.tasks:
        configs = [c for c in configs if c.stem in args.tasks]
        missing = set(args.tasks) - {c.stem for c in configs}
        if missing:
            parser.error(f"no config for {', '.join(sorted(missing))} in configs/tasks")
    print(f"time limit {args.max_time} s of training per task; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}")
    header = f"{'task':<26} {'metric':<18} {'target':>7} {'best':>7} {'at step':>8} {'wall s':>7}  result"
    print(header)
    print("-" * len(header))
    failed = False
    with tempfile.TemporaryDirectory(prefix="lmforge-task-scores-") as tmp:
        for config in configs:
            code, wall, run_dir, stderr = run_task(config, args.max_time, Path(tmp), args.smoke)
            target = TARGETS.get(config.stem)
            if code != 0:
                print(f"{config.stem:<26} fit failed (exit {code}):\n{stderr}")
                failed = True
                continue
            if target is None:
                print(f"{config.stem:<26} {'-':<18} {'-':>7} {'-':>7} {'-':>8} {wall:7.0f}  no target in TARGETS")
                continue
            best, first = best_score(run_dir, target)
            ok = first is not None
            failed |= not ok and not args.smoke
            result = "reached" if ok else ("ran (smoke)" if args.smoke else "MISSED")
            shown = f"{best:.3f}" if best is not None else "-"
            print(f"{config.stem:<26} {target.metric:<18} {target.value:7.3f} {shown:>7} "
                  f"{first if first is not None else '-':>8} {wall:7.0f}  {result}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
