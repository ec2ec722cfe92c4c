#!/usr/bin/env bash
# Threads for CPU training, side by side: 12 steps of the text-to-image Fashion-MNIST run with 2 threads, 1 thread,
# `accelerate launch` (which sets OMP_NUM_THREADS=1 without a GPU) and 2 threads again. Run on an idle machine from the
# repository root after `python examples/fashion_mnist.py prepare` and `... text-encoder` (docs/results.md):
#     bash benchmarks/training_threads.sh
# Prints the progress bar's last line of each run (wall time of the 12 steps, s/step at the end).
set -euo pipefail
PY=${PY:-.venv/bin/python}
ACCELERATE=${ACCELERATE:-.venv/bin/accelerate}
ARGS=(examples/train_pixnerd_t2i.py --model_config examples/configs/pixnerd-t2i-fashion-mnist.json
  --text_encoder_name_or_path data/qwen3-standin --train_data_dir data/fashion-mnist/train --resolution 32
  --image_preprocessing pad --no_use_repa --train_batch_size 128 --max_train_steps 12 --dataloader_num_workers 1
  --checkpointing_steps 1000 --report_to none --seed 0 --shift 1 --scheduler_preset c2i-adams50
  --validation_prompts a --validation_num_inference_steps 1)
out=$(mktemp -d)
for run in python-2-threads python-1-thread accelerate-launch python-2-threads-again; do
  case $run in
    python-2-threads*) OMP_NUM_THREADS=2 $PY "${ARGS[@]}" --output_dir "$out/$run" ;;
    python-1-thread) OMP_NUM_THREADS=1 $PY "${ARGS[@]}" --output_dir "$out/$run" ;;
    accelerate-launch) env -u OMP_NUM_THREADS $ACCELERATE launch --num_processes 1 --num_machines 1 \
      --mixed_precision no --dynamo_backend no "${ARGS[@]}" --output_dir "$out/$run" ;;
  esac 2>&1 | tr '\r' '\n' | grep "12/12" | tail -1 | sed "s/^/$run: /"
done
rm -rf "$out"
