#!/usr/bin/env bash
# LoRA fine-tuning of Higgs-Audio v2 with torchrun (one process per GPU, DDP).
#   bash launch.sh                       # the demo: tiny model on the bundled data
#   bash launch.sh --model CKPT --train_data train.jsonl --eval_data eval.jsonl --output_dir runs/x
# NGPU overrides the detected GPU count; NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT select a
# multi-node rendezvous. Every argument goes to train.py.
set -euo pipefail
cd "$(dirname "$0")"

if [[ -z "${NGPU:-}" ]]; then
  NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

if [[ "$NGPU" -le 1 && "${NNODES:-1}" -eq 1 ]]; then
  exec python3 train.py "$@"   # one GPU or CPU: no launcher needed
fi
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --nproc_per_node "$NGPU" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
  --master_port "${MASTER_PORT:-29500}" train.py "$@"
