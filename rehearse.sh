#!/usr/bin/env bash
# Rehearse the whole workflow on this node before a long run, at the released shape with random
# weights (nothing is downloaded): write a checkpoint and an audio tokenizer, prepare ~200 clips,
# train with launch.sh (evaluation, listening, checkpoints), kill it and resume, merge the adapter
# in both layouts and evaluate the merges against it, and generate. Each stage's seconds and peak
# GPU / host memory go to the last line, a JSON summary (README "Check your node").
#   bash rehearse.sh                     # the released shape on the GPUs present
#   bash rehearse.sh --tiny              # the same stages on CPU with the tiny model, ~1 minute
#   bash rehearse.sh --compile ...       # any other arguments go to every training run
# WORK (default runs/rehearsal) is deleted and rewritten.
set -euo pipefail
cd "$(dirname "$0")"
SIZE=()
if [[ "${1:-}" == "--tiny" ]]; then SIZE=(--tiny); shift; fi
WORK=${WORK:-runs/rehearsal}
rm -rf "$WORK" && mkdir -p "$WORK"
stage() { python3 rehearse.py stage "$WORK" "$@"; }

if [[ ${#SIZE[@]} -gt 0 ]]; then  # CPU, tiny model: seconds per stage (steps take ~0.05 s:
  # enough of them after the checkpoint that the run cannot end before the kill lands)
  export NGPU=0
  DEVICE=(--device cpu) BATCH=2 SAVED=2 STEPS=12 SECONDS_OUT=1
else
  NGPU=${NGPU:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
  export NGPU
  # the scaling is timed on the 24 steps before the kill: a process's first epoch runs slower
  # than its later ones (README "Check your node"), and later steps must outweigh it
  DEVICE=() BATCH=4 SAVED=24 STEPS=30 SECONDS_OUT=4
fi
RUN=(--batch_size "$BATCH" --max_steps "$STEPS" --save_every "$SAVED"
     --sample_max_seconds "$SECONDS_OUT" ${DEVICE[@]+"${DEVICE[@]}"} --model "$WORK/model"
     --train_data "$WORK/data/train" --eval_data "$WORK/data/eval" "$@")
LISTEN=(--sample_every "$STEPS" --sample_count 2 --audio_tokenizer "$WORK/audio_tokenizer")

stage assets -- python3 rehearse.py assets "$WORK" ${SIZE[@]+"${SIZE[@]}"}
stage prepare -- bash -c "python3 data.py prepare $WORK/data/train --tokenizer $WORK/audio_tokenizer \
  && python3 data.py prepare $WORK/data/eval --tokenizer $WORK/audio_tokenizer"
if [[ "$NGPU" -gt 1 ]]; then  # the reference: the same global batches on one GPU, whose
  # micro-batches (of the same size as on each GPU) run in turn; scaling and losses compare to it
  stage one_gpu -- env NGPU=1 bash launch.sh "${RUN[@]}" --grad_accum "$NGPU" --eval_data "" \
    --output_dir "$WORK/one_gpu"
fi
stage train --kill_when "$WORK/run/checkpoints/step_*/COMPLETE" -- \
  env MASTER_PORT=29511 bash launch.sh "${RUN[@]}" "${LISTEN[@]}" --output_dir "$WORK/run"
stage resume -- env MASTER_PORT=29512 bash launch.sh "${RUN[@]}" "${LISTEN[@]}" \
  --output_dir "$WORK/run" --resume
for fmt in official transformers; do
  stage "merge_$fmt" -- python3 lora.py merge --model "$WORK/model" --adapter "$WORK/run/adapter" \
    --out "$WORK/merged_$fmt" --format "$fmt"
done
EVAL=(--eval_only --eval_data "$WORK/data/eval" --batch_size 4 ${DEVICE[@]+"${DEVICE[@]}"})
stage eval_adapter -- python3 train.py --model "$WORK/model" --adapter "$WORK/run/adapter" \
  "${EVAL[@]}" --output_dir "$WORK/eval_adapter"
for fmt in official transformers; do
  stage "eval_merged_$fmt" -- python3 train.py --model "$WORK/merged_$fmt" "${EVAL[@]}" \
    --output_dir "$WORK/eval_merged_$fmt"
done
stage generate -- python3 generate.py --model "$WORK/model" --adapter "$WORK/run/adapter" \
  --data "$WORK/data/eval" --count 2 --out_dir "$WORK/listen" --tokenizer "$WORK/audio_tokenizer" \
  --max_seconds "$SECONDS_OUT" ${DEVICE[@]+"${DEVICE[@]}"}
python3 rehearse.py report "$WORK"
