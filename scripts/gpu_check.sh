#!/usr/bin/env bash
# The proof on a GPU (docs/benchmarks.md, "GPU check"). On a CUDA machine, in about ten minutes:
#   1. records the environment (torch, CUDA, the GPU);
#   2. trains the MD-Mini demo (options/demo/md_mini_train.yml) 300 iterations on one GPU in bf16, then in fp16,
#      and checks finite weights and a falling pixel loss;
#   3. trains it with a 1-process nccl torchrun to iteration 100, then again with --auto_resume to 150;
#   4. runs python -m datprl_arch.bench --device cuda --amp bf16 (the network table; --skip-speedup: the
#      official-vs-ours table at the spec sizes would double the time);
#   5. runs the test suite;
#   6. runs the benchmark with --compile (6t, ours only: Inductor compiles two graphs per network, a minute or more);
# and writes every figure to results/gpu_check/<date_time>/figures.md (each step's full log next to it). Steps run
# in that order within the time budget; one that does not fit is marked TIMED OUT or NOT RUN there.
#
#   scripts/gpu_check.sh              the check; exit 0: every step passed, 1: a step failed, 2: no CUDA (or usage)
#   scripts/gpu_check.sh --dry-run    print the commands and check they parse (any machine, writes nothing)
#   scripts/gpu_check.sh --cpu-smoke  the same steps on the CPU at toy sizes (no compile, no test suite)
# PYTHON is the interpreter (default python3); GPU_CHECK_BUDGET_S the time for all steps (default 600).
set -uo pipefail # not -e: a failed step is recorded and the next one still runs; the exit status reports it

usage() {
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
}

MODE=gpu
while [ "$#" -gt 0 ]; do
    case "$1" in
    --dry-run) MODE=dry-run ;;
    --cpu-smoke) MODE=cpu-smoke ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        echo "gpu_check: unknown argument '$1'" >&2
        usage >&2
        exit 2
        ;;
    esac
    shift
done

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
HELPER=scripts/gpu_check.py
OPT=options/demo/md_mini_train.yml
MD_MINI=datasets/md_mini
STAMP=$(date +%Y%m%d_%H%M%S)
OUT=results/gpu_check/$STAMP
FIGURES=$OUT/figures.md
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-600}))
NEVER=100000000 # val_freq: validate once, after training (BasicSR always does)
FAILED=()

if [ "$MODE" = cpu-smoke ]; then
    ITERS=4 DDP_ITERS=2 DDP_RESUMED_ITERS=3 PRINT_FREQ=1 NUM_GPU=0 BACKEND=gloo FALLING='' ALLOW_CPU=--allow-cpu
    BENCH=(--device cpu --configs cdd11 --impls official datprl --eval-size 32 --train-size 32 --train-batch 1
        --warmup 0 --repeats 1 --skip-speedup)
    COMPILE=''   # CPU Inductor needs many minutes for these networks
    RUN_TESTS='' # the suite runs on the CPU anyway (make test)
else
    ITERS=300 DDP_ITERS=100 DDP_RESUMED_ITERS=150 PRINT_FREQ=10 NUM_GPU=1 BACKEND=nccl FALLING=--falling-loss
    ALLOW_CPU=''
    [ "$MODE" = dry-run ] && ALLOW_CPU=--allow-cpu
    BENCH=(--device cuda --amp bf16 --skip-speedup)
    COMPILE=yes
    RUN_TESTS=yes
fi

record() { # record STEP RESULT: a heading in the figures file, a line on the terminal
    printf '\n## %s: %s\n' "$1" "$2" >>"$FIGURES"
    printf 'gpu_check: %s: %s\n' "$1" "$2"
}

show() { # show STEP COMMAND...: what --dry-run prints instead of running
    printf 'gpu_check: %s:' "$1"
    shift
    printf ' %q' "$@"
    printf '\n'
}

run_step() { # run_step STEP CAP_S COMMAND...: run within min(CAP_S, time left), log to $OUT/STEP.log, record
    local step=$1 cap=$2 left limit start status
    shift 2
    if [ "$MODE" = dry-run ]; then
        show "$step" "$@"
        return 0
    fi
    left=$((DEADLINE - SECONDS))
    limit=$((cap < left ? cap : left))
    if [ "$limit" -le 0 ]; then
        record "$step" "NOT RUN (the time budget is spent)"
        FAILED+=("$step")
        return 1
    fi
    start=$SECONDS
    timeout --kill-after=15 "$limit" "$@" >"$OUT/$step.log" 2>&1
    status=$?
    if [ "$status" -eq 0 ]; then
        record "$step" "passed in $((SECONDS - start)) s"
        return 0
    fi
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        record "$step" "TIMED OUT after $limit s (log: $OUT/$step.log)"
    else
        record "$step" "FAILED with exit status $status after $((SECONDS - start)) s (log: $OUT/$step.log)"
    fi
    FAILED+=("$step")
    return 1
}

check() { # check STEP COMMAND...: a check before running (also in --dry-run); output in $OUT/STEP.check
    local step=$1
    shift
    if [ "$MODE" = dry-run ]; then
        "$@" || FAILED+=("$step")
        return 0
    fi
    if "$@" >"$OUT/$step.check" 2>&1; then
        return 0
    fi
    record "$step" "CHECK FAILED: $(cat "$OUT/$step.check")"
    FAILED+=("$step")
    return 1
}

verify() { # verify STEP COMMAND...: check the outcome of a step that ran; its "key: value" figures go into the
    local step=$1 # figures file under the step's heading (--dry-run only shows the command)
    shift
    if [ "$MODE" = dry-run ]; then
        show "$step" "$@"
        return 0
    fi
    if "$@" >>"$FIGURES" 2>"$OUT/$step.check"; then
        return 0
    fi
    record "$step" "CHECK FAILED: $(cat "$OUT/$step.check")"
    FAILED+=("$step")
    return 1
}

append_log() { # append_log STEP [LINES]: the step's output (or its last LINES lines) into the figures file
    [ "$MODE" = dry-run ] && return 0
    [ -f "$OUT/$1.log" ] || return 0
    printf '\n```\n' >>"$FIGURES"
    if [ "$#" -gt 1 ]; then tail -n "$2" "$OUT/$1.log" >>"$FIGURES"; else cat "$OUT/$1.log" >>"$FIGURES"; fi
    printf '```\n' >>"$FIGURES"
}

demo_overrides() { # demo_overrides NAME ITERS PERIOD [KEY=VALUE...]: the --force_yml entries of a demo run
    local name=$1 iters=$2 period=$3
    shift 3
    OVERRIDES=("name=$name" "num_gpu=$NUM_GPU" "train:total_iter=$iters" "train:scheduler:periods=[$period]"
        "val:val_freq=$NEVER" "logger:print_freq=$PRINT_FREQ" "logger:save_checkpoint_freq=$iters" "$@")
}

# 1. environment: without CUDA the check stops here (exit 2), before anything is written
if ! ENVIRONMENT=$("$PY" "$HELPER" environment ${ALLOW_CPU:+"$ALLOW_CPU"}); then
    echo "gpu_check: stopped; nothing was run or written." >&2
    exit 2
fi
if [ "$MODE" = dry-run ]; then
    printf '%s\n' "$ENVIRONMENT"
    check imports_and_bench_flags "$PY" -c 'import datprl_arch.train, torch.distributed.run
from datprl_arch.bench import main
main(["--help"])' >/dev/null
else
    mkdir -p "$OUT" || exit 2
    {
        printf '# GPU check %s (%s)\n\n' "$(date '+%Y-%m-%d %H:%M:%S %Z')" "$MODE"
        printf 'commit: %s\n' "$(git describe --always --dirty 2>/dev/null || echo unknown)"
        printf '%s\n' "$ENVIRONMENT"
    } >"$FIGURES"
fi

# MD-Mini and its text embeddings, as `make demo` builds them (skipped when present)
if [ ! -f "$MD_MINI/manifest.json" ]; then
    run_step md_mini 120 "$PY" -m datprl_arch.data.mini --out "$MD_MINI"
fi
if [ ! -f "$MD_MINI/texts.pt" ]; then
    run_step texts 60 "$PY" -m datprl_arch.tools.encode_descriptions "$MD_MINI"/*/descriptions.json \
        --out "$MD_MINI/texts.pt" --encoder hash --overwrite
fi

# 2. the demo on one GPU, bf16 then fp16 (fp16 with loss scaling)
for amp in bf16 fp16; do
    name=gpu_check_${STAMP}_$amp
    demo_overrides "$name" "$ITERS" "$ITERS" "train:amp_dtype=$amp"
    check "overrides_$amp" "$PY" "$HELPER" overrides "$OPT" "${OVERRIDES[@]}" &&
        run_step "train_$amp" 150 "$PY" -m datprl_arch.train -opt "$OPT" --force_yml "${OVERRIDES[@]}" &&
        verify "train_$amp" "$PY" "$HELPER" training "experiments/$name" ${FALLING:+"$FALLING"}
done

# 3. one torchrun process (nccl on CUDA), then --auto_resume from its last training state
name=gpu_check_${STAMP}_torchrun
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
torchrun=("$PY" -m torch.distributed.run --nproc_per_node=1 --master_addr=127.0.0.1 --master_port="$port"
    -m datprl_arch.train -opt "$OPT" --launcher pytorch --auto_resume)
demo_overrides "$name" "$DDP_ITERS" "$DDP_RESUMED_ITERS" "dist_params:backend=$BACKEND"
check overrides_torchrun "$PY" "$HELPER" overrides "$OPT" "${OVERRIDES[@]}" &&
    run_step torchrun 150 "${torchrun[@]}" --force_yml "${OVERRIDES[@]}" &&
    verify torchrun "$PY" "$HELPER" training "experiments/$name" &&
    demo_overrides "$name" "$DDP_RESUMED_ITERS" "$DDP_RESUMED_ITERS" "dist_params:backend=$BACKEND" &&
    run_step torchrun_resumed 120 "${torchrun[@]}" --force_yml "${OVERRIDES[@]}" &&
    verify torchrun_resumed "$PY" "$HELPER" training "experiments/$name" --resumed-from "$DDP_ITERS"

# 4. the benchmark
run_step bench 180 "$PY" -m datprl_arch.bench "${BENCH[@]}"
append_log bench

# 5. the test suite
if [ -n "$RUN_TESTS" ]; then
    run_step tests 420 "$PY" -m pytest -q -p no:cacheprovider tests
    append_log tests 15
fi

# 6. the benchmark compiled (whatever time is left)
if [ -n "$COMPILE" ]; then
    run_step bench_compile 240 "$PY" -m datprl_arch.bench "${BENCH[@]}" --compile --configs 6t --impls datprl
    append_log bench_compile
fi

if [ "$MODE" = dry-run ]; then
    if [ "${#FAILED[@]}" -eq 0 ]; then
        echo "gpu_check: dry run: every command parses"
        exit 0
    fi
    echo "gpu_check: dry run: failed: ${FAILED[*]}" >&2
    exit 1
fi
if [ "${#FAILED[@]}" -eq 0 ]; then
    record result "every step passed"
else
    record result "failed: ${FAILED[*]}"
fi
echo "gpu_check: figures written to $FIGURES"
[ "${#FAILED[@]}" -eq 0 ]
