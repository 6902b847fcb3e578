#!/usr/bin/env bash
# Set everything up, train a tiny GPT on the shipped corpus, show the validation loss falling from
# the untrained model's, and sample text from the trained checkpoint. Each demo gets its own run dir.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN="runs/demo-$(date +%Y%m%d-%H%M%S)"
LMFORGE=.venv/bin/lmforge
QUIET=(--trainer.enable_progress_bar false --trainer.enable_model_summary false)

echo "== validation loss of the untrained model"
$LMFORGE validate --config configs/gpt-tiny.yaml --trainer.default_root_dir "$RUN/untrained" "${QUIET[@]}" >/dev/null
echo "== training (configs/gpt-tiny.yaml) into $RUN"
$LMFORGE fit --config configs/gpt-tiny.yaml --trainer.default_root_dir "$RUN" "${QUIET[@]}" "$@"

.venv/bin/python - "$RUN" <<'PY'
import csv, sys
run = sys.argv[1]
def val_losses(path):
    return [(int(r["step"]), float(r["val/loss"])) for r in csv.DictReader(open(path)) if r.get("val/loss")]
start = val_losses(f"{run}/untrained/metrics.csv")[0][1]
print(f"\nvalidation loss:\n  untrained   {start:.3f}")
for step, loss in val_losses(f"{run}/metrics.csv"):
    print(f"  step {step + 1:5d}  {loss:.3f}")
print(f"fell to {loss / start:.0%} of the untrained model's")
PY

echo
echo "== text sampled from $RUN/checkpoints/last.ckpt"
$LMFORGE generate --checkpoint "$RUN" --prompt "Once upon a time" --max_new_tokens 80 --temperature 0.8 --top_k 40 --seed 7
