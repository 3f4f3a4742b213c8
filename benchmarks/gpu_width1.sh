#!/usr/bin/env bash
# Width-1.0 Fashion-MNIST baselines on one GPU, sized to a fixed wall-clock budget.
#
#   BUDGET_S=420 OUT_DIR=out bash benchmarks/gpu_width1.sh
#
# Several `train.py` runs side by side on the one GPU (a 28x28 MobileNetV2 leaves a large GPU
# mostly idle: one run is bound by launching kernels, so they share it). By default three seeds
# (42, 43, 44) of one recipe (--weight_decay 5e-4) and a control with the CPU recipe's
# --weight_decay 4e-5 (seed 42); RUNS="name wd seed batch lr [epochs];..." sets others.
# The number of epochs is EPOCHS, else a timed one-epoch probe of the same runs sets it so
# that all of them end inside BUDGET_S. Then `benchmarks/data_path.py` measures one run's
# images/s alone. Each run's best.pt (test accuracy in its metadata) lands in OUT_DIR/<name>/,
# all training logs in OUT_DIR/training_logs.txt.
#
# GZ_DIR: a folder with the four Fashion-MNIST .gz files, unpacked into ./data first (a GPU
# machine with no network and no Debian dataset package). MAX_TRAIN / MAX_EVAL shrink the data
# for a smoke test on a CPU. PYTHON: the interpreter (default python3). W&B is off here
# (--wandb_mode disabled): the GPU machine has no wandb; the checkpoints carry the metadata.
set -u
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-420}
OUT_DIR=${OUT_DIR:-gpu-width1}
WORK=${WORK:-/tmp/gpu-width1}
THREADS=${THREADS:-4}
export PYTHONUNBUFFERED=1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

mkdir -p "$OUT_DIR" "$WORK"
if [ -n "${GZ_DIR:-}" ]; then
    mkdir -p data/FashionMNIST/raw
    for f in "$GZ_DIR"/*.gz; do
        gunzip -c "$f" > "data/FashionMNIST/raw/$(basename "$f" .gz)" || exit 1
    done
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"

limits=()
[ -n "${MAX_TRAIN:-}" ] && limits+=(--max_train_samples "$MAX_TRAIN")
[ -n "${MAX_EVAL:-}" ] && limits+=(--max_eval_samples "$MAX_EVAL")
# name, weight decay, seed, batch size, learning rate[, epochs: else EPOCHS or the probe's]
RUNS=${RUNS:-"wd5e-4-s42 5e-4 42 128 0.1;wd5e-4-s43 5e-4 43 128 0.1;wd5e-4-s44 5e-4 44 128 0.1;wd4e-5-s42 4e-5 42 128 0.1"}
IFS=';' read -r -a RUNS <<< "$RUNS"

train_all() {  # $1: epochs ("probe": one, for every run), $2: folder prefix, $3: seconds allowed
    local pids=()
    for spec in "${RUNS[@]}"; do
        set -- "$1" "$2" "$3" $spec
        local n=${9:-$1}; [ "$1" = probe ] && n=1
        timeout "$3" $PY train.py --dataset fashion-mnist --data_dir ./data \
            --width_multiplier 1.0 --epochs "$n" --batch_size "$7" --lr "$8" \
            --weight_decay "$5" --label_smoothing 0.1 --seed "$6" --threads "$THREADS" \
            --wandb_mode disabled --checkpoint_dir "$WORK/$2$4" "${limits[@]}" \
            > "$WORK/$2$4.out" 2>&1 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || echo "a run ended with status $?"; done
}

if [ -n "${EPOCHS:-}" ]; then  # sized from an earlier probe on the same kind of machine
    epochs=$EPOCHS
else  # probe: one epoch of all runs at once; its slowest epoch time sizes the real runs
    train_all probe probe- 300
    probe_s=$(elapsed)
    epoch_s=$(cat "$WORK"/probe-*/training_log.txt | sed -n 's/.* time \([0-9.]*\)s .*/\1/p' | sort -g | tail -1)
    [ -z "$epoch_s" ] && { echo "probe failed:"; tail -5 "$WORK"/probe-*.out; exit 1; }
    left=$(( BUDGET_S - probe_s - 60 ))  # start-up, test evaluation, the images/s benchmark
    epochs=$($PY -c "print(max(1, min(100, int($left / ($epoch_s * 1.1)))))")
    echo "probe: $probe_s s in all, slowest epoch $epoch_s s (all runs at once) -> $epochs epochs in $left s"
fi

t0=$(date +%s)
train_all "$epochs" "" $(( BUDGET_S - $(elapsed) - 20 ))
echo "training: $(( $(date +%s) - t0 )) s for ${#RUNS[@]} runs side by side"
for spec in "${RUNS[@]}"; do
    set -- $spec
    echo "== $1"; tail -2 "$WORK/$1/training_log.txt"; grep -a "best epoch" "$WORK/$1.out"
    mkdir -p "$OUT_DIR/$1"
    cp "$WORK/$1/best.pt" "$OUT_DIR/$1/" 2>/dev/null
    { echo "== $1: $spec"; cat "$WORK/$1/training_log.txt"; grep -a "best epoch" "$WORK/$1.out"; } \
        >> "$OUT_DIR/training_logs.txt"
done

# One run's images/s on this device, alone (no other job on it now). BENCH=0 skips it.
if [ "${BENCH:-1}" != 0 ] && [ $(( BUDGET_S - $(elapsed) )) -gt 15 ]; then
    timeout $(( BUDGET_S - $(elapsed) )) $PY benchmarks/data_path.py --dataset fashion-mnist \
        --width_multiplier 1.0 --batches 50 --workers 4
fi
echo "total $(elapsed) s"
