#!/usr/bin/env bash
# Held-out accuracy of the embedded default before and after the CPU demo run, for one seed.
#   bash benchmarks/heldout.sh SEED [NUM_VAL] [WORKDIR] [extra fit options...]
# Prints the greedy strict-format rate and accuracies on NUM_VAL (default 500) held-out synthetic problems,
# before training (the base model) and after `python -m qmath fit --seed_everything SEED`.
set -euo pipefail
seed=${1:-0}
num_val=${2:-500}
work=${3:-heldout-seed$seed}
shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$work" && cd "$work"
val() { python -m qmath validate --data.num_val "$num_val" --trainer.enable_progress_bar false "$@" 2>&1 \
  | grep -E "val/(accuracy|format)" | tr -d '│┃' | awk '{printf "%s=%s ", $1, $2} END {print ""}'; }
if [ ! -f before.txt ]; then val > before.txt; fi
echo "before: $(cat before.txt)"
start=$(date +%s)
python -m qmath fit --seed_everything "$seed" --trainer.enable_progress_bar false --trainer.limit_val_batches 0 "$@" \
  > fit.log 2>&1  # the 500-problem validation below replaces the run's own
echo "fit: $(( $(date +%s) - start )) s"
echo "after:  $(val --ckpt_path lightning_logs/cpu/checkpoints/last.ckpt)"
