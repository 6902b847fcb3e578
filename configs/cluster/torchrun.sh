#!/bin/bash
# lmforge with torchrun, on any cluster (or several machines by hand): run this script on every node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example MASTER_PORT=29500 NPROC_PER_NODE=8 \
#     bash configs/cluster/torchrun.sh configs/gpt-tiny.yaml configs/strategies/zero3.yaml
#
# Same NNODES / MASTER_ADDR / MASTER_PORT / NPROC_PER_NODE on every node, NODE_RANK 0..NNODES-1 (0 on MASTER_ADDR).
# Lightning picks up torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE) and does not start processes itself.
# For elastic/fault-tolerant launches use --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT instead of
# --master_addr/--master_port and --node_rank. See docs/scaling.md.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
RUN_DIR=${RUN_DIR:-runs/torchrun}
CONFIG_ARGS=()
for c in "$@"; do CONFIG_ARGS+=(--config "$c"); done
RESUME=()
[ -d "$RUN_DIR/checkpoints" ] && RESUME=(--ckpt_path last)

# Preflight with the variables torchrun will give this node's first process, checked against the config.
MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT TORCHELASTIC_RUN_ID=preflight \
  WORLD_SIZE=$((NNODES * NPROC_PER_NODE)) RANK=$((NODE_RANK * NPROC_PER_NODE)) \
  LOCAL_WORLD_SIZE=$NPROC_PER_NODE LOCAL_RANK=0 \
  lmforge doctor "${CONFIG_ARGS[@]}" --devices "$NPROC_PER_NODE" --num_nodes "$NNODES"

exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m lmforge.cli fit "${CONFIG_ARGS[@]}" \
  --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" \
  --trainer.default_root_dir "$RUN_DIR" "${RESUME[@]}"
