#!/usr/bin/env bash
# The proof on a GPU (docs/benchmarks.md, "GPU check"), made to run right the first time on a bare GPU machine
# without network: Python with torch and CUDA, no basicsr, lmdb, pydicom or basemap-data, one command <= 10 minutes.
#
# 1. Here, with network, once (the folder is git-ignored; it travels with the working tree: carry [".gpu_check"]):
#      scripts/gpu_check.sh --prepare [--python-version 3.12] [--wheels DIR]
#    writes the wheels of what the GPU image lacks into DIR (default .gpu_check; under 50 MiB, its size printed).
# 2. There, offline:
#      scripts/gpu_check.sh --out "$OUT" [--only STEP[,STEP...]] [--skip STEP[,STEP...]] [--budget S]
#    installs from DIR what the machine lacks (pip --no-index --no-deps --target DIR/site), sets PYTHONPATH, checks
#    that every module imports (else stops with the list of what is missing), then runs the steps in this order
#    within the budget (default 480 s); a step that does not fit is NOT RUN and the last line gives the second call.
# Steps: data           MD-Mini (python -m datprl_arch.mdmini --no-unseen) and its text embeddings, when missing
#        train_bf16     the MD-Mini demo, 300 iterations on one GPU, bf16 autocast
#        train_fp16     the same in fp16 with the GradScaler
#        torchrun       a 1-process nccl torchrun to iteration 150, then --auto_resume to 300
#        bench          python -m datprl_arch.bench, 6-task network: official vs ours (and ours with use_checkpoint)
#                       in fp32 with the speed-up table at the spec sizes, then official vs ours in bf16
#        tests          the test suite on GPU 0
#        bench_compile  ours in bf16 + compile, and its speed-up over the official computation in fp32
# Each training passes when: the log has the autocast line of its dtype; the logged l_pix's last quarter is below
# 0.9 x its first (torchrun: over both runs); the saved training state shows an optimizer step at every iteration
# but the skipped ones, and fp16's loss scale >= 1; its weights are finite; torchrun did not fall back to gloo.
# Figures go to DIR/figures.md and each step's output to DIR/<step>.log, all flat: at most 8 files (--out DIR;
# default results/gpu_check/<date_time>).
#
#   scripts/gpu_check.sh --dry-run     print the commands; check every `python -m` target resolves and every
#                                      override applies (any machine; writes nothing but the wheels' install)
#   scripts/gpu_check.sh --cpu-smoke   the same steps on the CPU at toy sizes (no test suite, no compile)
# Exit status: 0 every step run passed; 1 a step failed or timed out; 2 usage, no CUDA or a module missing (nothing
# run); 3 the steps run passed but some did not fit the budget. PYTHON is the interpreter (default python3).
set -uo pipefail # not -e: a failed step is recorded and the next one still runs; the exit status reports it

usage() {
    sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'
}

STEPS=(data train_bf16 train_fp16 torchrun bench tests bench_compile)
MODE=gpu ONLY=() SKIP=() OUT='' BUDGET='' WHEELS='' PYTHON_VERSION=3.12
while [ "$#" -gt 0 ]; do
    case "$1" in
    --prepare) MODE=prepare ;;
    --dry-run) MODE=dry-run ;;
    --cpu-smoke) MODE=cpu-smoke ;;
    --only | --skip | --out | --budget | --wheels | --python-version)
        if [ "$#" -lt 2 ]; then
            echo "gpu_check: $1 needs a value" >&2
            exit 2
        fi
        case "$1" in
        --only) IFS=, read -ra more <<<"$2" && ONLY+=("${more[@]}") ;;
        --skip) IFS=, read -ra more <<<"$2" && SKIP+=("${more[@]}") ;;
        --out) OUT=$2 ;;
        --budget) BUDGET=$2 ;;
        --wheels) WHEELS=$2 ;;
        --python-version) PYTHON_VERSION=$2 ;;
        esac
        shift
        ;;
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
for step in "${ONLY[@]}" "${SKIP[@]}"; do
    if [[ " ${STEPS[*]} " != *" $step "* ]]; then
        echo "gpu_check: unknown step '$step'; the steps: ${STEPS[*]}" >&2
        exit 2
    fi
done
if [ -n "$BUDGET" ] && ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
    echo "gpu_check: --budget $BUDGET: expected seconds (an integer)" >&2
    exit 2
fi

cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
PY=${PYTHON:-python3}
HELPER=scripts/gpu_check.py
WHEELS=${WHEELS:-${GPU_CHECK_WHEELS:-.gpu_check}}
if [ "$MODE" = prepare ]; then # basicsr's wheel is built with the project's environment (make install) when there
    [ -n "${PYTHON:-}" ] || [ ! -x .venv/bin/python ] || PY=.venv/bin/python
    exec "$PY" scripts/gpu_check_prepare.py prepare "$WHEELS" --python-version "$PYTHON_VERSION"
fi

OPT=options/demo/md_mini_train.yml
MD_MINI=datasets/md_mini
STAMP=$(date +%Y%m%d_%H%M%S)
OUT=${OUT:-results/gpu_check/$STAMP}
FIGURES=$OUT/figures.md
NEVER=100000000 # val_freq: validate once, after training (BasicSR always does)
FAILED=() NOT_RUN=() MODULES=()

if [ "$MODE" = cpu-smoke ]; then
    ITERS=4 DDP_ITERS=2 DDP_RESUMED_ITERS=4 PRINT_FREQ=1 NUM_GPU=0 BACKEND=gloo DEVICE=cpu FALLING=''
    BUDGET=${BUDGET:-3600}
    BENCH=(--device cpu --configs cdd11 --impls official datprl --eval-size 32 --train-size 32 --train-batch 1
        --warmup 0 --repeats 1 --skip-speedup)
    BENCH_BF16=()
    SKIP+=(tests bench_compile) # the suite runs on the CPU anyway (make test); CPU Inductor takes many minutes
else
    ITERS=300 DDP_ITERS=150 DDP_RESUMED_ITERS=300 PRINT_FREQ=1 NUM_GPU=1 BACKEND=nccl DEVICE=cuda
    FALLING=--falling-loss BUDGET=${BUDGET:-480}
    BENCH=(--device cuda --configs 6t --impls official datprl datprl-checkpoint)
    BENCH_BF16=(--device cuda --amp bf16 --configs 6t --impls official datprl --skip-speedup)
fi
BENCH_COMPILE=(--device cuda --amp bf16 --compile --configs 6t --impls datprl --skip-speedup)
DEADLINE=$((SECONDS + BUDGET))

selected() { # selected STEP: named by --only (when given) and not by --skip
    local s
    for s in "${SKIP[@]}"; do [ "$s" = "$1" ] && return 1; done
    [ "${#ONLY[@]}" -eq 0 ] && return 0
    for s in "${ONLY[@]}"; do [ "$s" = "$1" ] && return 0; done
    return 1
}

record() { # record STEP RESULT: the outcome under the step's heading in the figures file, a line on the terminal
    [ "$MODE" = dry-run ] || printf '\n**%s: %s**\n' "$1" "$2" >>"$FIGURES"
    printf 'gpu_check: %s: %s\n' "$1" "$2"
}

show() { # show STEP COMMAND...: what --dry-run prints instead of running; collects the `-m` targets
    local step=$1 previous=''
    shift
    printf 'gpu_check: %s:' "$step"
    printf ' %q' "$@"
    printf '\n'
    for arg in "$@"; do
        [ "$previous" = -m ] && MODULES+=("$arg")
        previous=$arg
    done
}

fail() { # fail STEP WHY: the step failed (recorded once)
    record "$1" "$2"
    FAILED+=("$1")
    return 1
}

step_begin() { # step_begin STEP MIN_S: whether the step runs now (at least MIN_S of the budget left); truncates its log
    local left=$((DEADLINE - SECONDS))
    [ "$MODE" = dry-run ] && return 0
    printf '\n## %s\n' "$1" >>"$FIGURES"
    if [ "$left" -lt "$2" ]; then
        record "$1" "NOT RUN ($left s of the budget left, it needs at least $2 s)"
        NOT_RUN+=("$1")
        return 1
    fi
    STEP_START=$SECONDS
    : >"$OUT/$1.log"
}

step_end() { # step_end STEP: it passed
    [ "$MODE" = dry-run ] || record "$1" "passed in $((SECONDS - STEP_START)) s (log: $OUT/$1.log)"
}

run_cmd() { # run_cmd STEP CAP_S COMMAND...: run within min(CAP_S, budget left), output appended to the step's log
    local step=$1 cap=$2 left limit start status
    shift 2
    if [ "$MODE" = dry-run ]; then
        show "$step" "$@"
        return 0
    fi
    left=$((DEADLINE - SECONDS))
    limit=$((cap < left ? cap : left))
    [ "$limit" -gt 0 ] || fail "$step" "TIMED OUT (the budget is spent)" || return 1
    start=$SECONDS
    printf '$ %s\n' "$*" >>"$OUT/$step.log"
    timeout --kill-after=15 "$limit" "$@" >>"$OUT/$step.log" 2>&1
    status=$?
    [ "$status" -eq 0 ] && return 0
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        fail "$step" "TIMED OUT after $limit s (log: $OUT/$step.log)"
    else
        fail "$step" "FAILED with exit status $status after $((SECONDS - start)) s (log: $OUT/$step.log)"
    fi
}

verify() { # verify STEP COMMAND...: check a step's outcome; its "key: value" figures go into the figures file
    local step=$1 errors
    shift
    if [ "$MODE" = dry-run ]; then
        show "$step" "$@"
        return 0
    fi
    printf '\n```\n' >>"$FIGURES"
    errors=$("$@" 2>&1 >>"$FIGURES")
    local status=$?
    printf '```\n' >>"$FIGURES"
    [ "$status" -eq 0 ] && return 0
    printf '%s\n' "$errors" >>"$OUT/$step.log"
    fail "$step" "CHECK FAILED: $errors"
}

parses() { # parses STEP COMMAND...: in --dry-run, the command's arguments parse (it runs with --help appended)
    local step=$1
    shift
    [ "$MODE" = dry-run ] || return 0
    "$@" --help >/dev/null 2>&1 || fail "$step" "the arguments of \`$*\` do not parse"
}

check_overrides() { # check_overrides STEP: every --force_yml entry of OVERRIDES applies to the option file
    local out
    if out=$("$PY" "$HELPER" overrides "$OPT" "${OVERRIDES[@]}" 2>&1); then
        [ "$MODE" = dry-run ] && printf 'gpu_check: %s: %s\n' "$1" "$out"
        return 0
    fi
    fail "$1" "CHECK FAILED: $out"
}

append_log() { # append_log STEP [LINES]: the step's output (or its last LINES lines) into the figures file
    [ "$MODE" = dry-run ] && return 0
    [ -f "$OUT/$1.log" ] || return 0
    printf '\n```\n' >>"$FIGURES"
    if [ "$#" -gt 1 ]; then tail -n "$2" "$OUT/$1.log" >>"$FIGURES"; else cat "$OUT/$1.log" >>"$FIGURES"; fi
    printf '```\n' >>"$FIGURES"
}

demo_overrides() { # demo_overrides NAME ITERS PERIOD SAVE_FREQ [KEY=VALUE...]: the --force_yml entries of a run
    local name=$1 iters=$2 period=$3 save=$4
    shift 4
    OVERRIDES=("name=$name" "num_gpu=$NUM_GPU" "train:total_iter=$iters" "train:scheduler:periods=[$period]"
        "val:val_freq=$NEVER" "logger:print_freq=$PRINT_FREQ" "logger:save_checkpoint_freq=$save" "$@")
}

have_md_mini() {
    [ -f "$MD_MINI/manifest.json" ] && [ -f "$MD_MINI/texts.pt" ]
}

data_step() { # MD-Mini and its text embeddings, as `make demo` builds them (only what is missing)
    have_md_mini && [ "$MODE" != dry-run ] && return 0
    step_begin data 60 || return 1
    if [ "$MODE" = dry-run ] || [ ! -f "$MD_MINI/manifest.json" ]; then
        run_cmd data 240 "$PY" -m datprl_arch.mdmini --out "$MD_MINI" --no-unseen || return 1
    fi
    run_cmd data 60 "$PY" -m datprl_arch.tools.encode_descriptions "$MD_MINI"/*/descriptions.json \
        --out "$MD_MINI/texts.pt" --encoder hash --overwrite || return 1
    step_end data
}

train_step() { # train_step AMP: the demo on one GPU (or the CPU) under AMP autocast
    local amp=$1 step=train_$1 name=gpu_check_${STAMP}_$1
    step_begin "$step" 60 || return 1
    [ "$MODE" = dry-run ] || have_md_mini || fail "$step" "NOT RUN: no MD-Mini in $MD_MINI (the data step)" || return 1
    demo_overrides "$name" "$ITERS" "$ITERS" "$ITERS" "train:amp_dtype=$amp"
    check_overrides "$step" &&
        run_cmd "$step" 180 "$PY" -m datprl_arch.train -opt "$OPT" --force_yml "${OVERRIDES[@]}" &&
        verify "$step" "$PY" "$HELPER" training "experiments/$name" --amp "$amp" --device "$DEVICE" $FALLING &&
        step_end "$step"
}

torchrun_step() { # one torchrun process (nccl on CUDA) to DDP_ITERS, then --auto_resume to DDP_RESUMED_ITERS
    local name=gpu_check_${STAMP}_torchrun port launch checks
    step_begin torchrun 90 || return 1
    [ "$MODE" = dry-run ] || have_md_mini || fail torchrun "NOT RUN: no MD-Mini in $MD_MINI (the data step)" || return 1
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    launch=("$PY" -m torch.distributed.run --nproc_per_node=1 --master_addr=127.0.0.1 --master_port="$port"
        -m datprl_arch.train -opt "$OPT" --launcher pytorch --auto_resume)
    checks=(--amp bf16 --device "$DEVICE" --backend "$BACKEND" --step-log "$OUT/torchrun.log" $FALLING)
    demo_overrides "$name" "$DDP_ITERS" "$DDP_RESUMED_ITERS" "$DDP_ITERS" "dist_params:backend=$BACKEND"
    check_overrides torchrun &&
        run_cmd torchrun 150 "${launch[@]}" --force_yml "${OVERRIDES[@]}" &&
        verify torchrun "$PY" "$HELPER" training "experiments/$name" "${checks[@]}" &&
        demo_overrides "$name" "$DDP_RESUMED_ITERS" "$DDP_RESUMED_ITERS" "$DDP_ITERS" "dist_params:backend=$BACKEND" &&
        run_cmd torchrun 150 "${launch[@]}" --force_yml "${OVERRIDES[@]}" &&
        verify torchrun "$PY" "$HELPER" training "experiments/$name" "${checks[@]}" --resumed-from "$DDP_ITERS" &&
        step_end torchrun
}

bench_step() { # the network tables: fp32 (with the speed-up table), then bf16
    step_begin bench 90 || return 1
    parses bench "$PY" -m datprl_arch.bench "${BENCH[@]}" "${BENCH_BF16[@]}"
    run_cmd bench 150 "$PY" -m datprl_arch.bench "${BENCH[@]}" || return 1
    if [ "${#BENCH_BF16[@]}" -gt 0 ]; then
        run_cmd bench 120 "$PY" -m datprl_arch.bench "${BENCH_BF16[@]}" || return 1
    fi
    append_log bench
    step_end bench
}

tests_step() { # the test suite on one GPU (several would make num_gpu: auto trainings refuse DataParallel)
    step_begin tests 240 || return 1
    run_cmd tests 480 env CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}" "$PY" -m pytest -q -p no:cacheprovider \
        --deselect tests/test_gpu_check.py::test_the_rehearsal_runs_the_cpu_smoke_offline_in_the_gpu_image tests
    local status=$?
    append_log tests 15
    [ "$status" -eq 0 ] && step_end tests
}

bench_compile_step() { # ours in bf16 + compile (Inductor compiles two graphs per network, a minute or more)
    step_begin bench_compile 120 || return 1
    parses bench_compile "$PY" -m datprl_arch.bench "${BENCH_COMPILE[@]}"
    run_cmd bench_compile 300 "$PY" -m datprl_arch.bench "${BENCH_COMPILE[@]}" || return 1
    append_log bench_compile
    if [ -f "$OUT/bench.log" ] || [ "$MODE" = dry-run ]; then
        verify bench_compile "$PY" "$HELPER" speedup "$OUT/bench.log" "$OUT/bench_compile.log" || return 1
    else
        record bench_compile "(no speed-up figure: bench did not run in this call)"
    fi
    step_end bench_compile
}

# The environment: without CUDA the check stops here (exit 2), before anything is written.
if ! ENVIRONMENT=$("$PY" "$HELPER" environment $([ "$MODE" = gpu ] || echo --allow-cpu)); then
    echo "gpu_check: stopped; nothing was run or written." >&2
    exit 2
fi
# The prepared wheels this Python lacks, installed into WHEELS/site, which goes first on PYTHONPATH (the subprocesses
# of the steps and of the tests import the package from the working tree), then every import.
if [ -f "$WHEELS/manifest.json" ]; then
    SITE="$(cd "$WHEELS" && pwd)/site"
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    if ! INSTALLED=$("$PY" "$HELPER" install "$WHEELS" "$SITE"); then
        echo "gpu_check: stopped; nothing was run." >&2
        exit 2
    fi
else
    INSTALLED="prepared wheels: none ($WHEELS/manifest.json is missing; scripts/gpu_check.sh --prepare makes it)"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! IMPORTS=$("$PY" "$HELPER" imports); then
    echo "gpu_check: stopped; nothing was run." >&2
    exit 2
fi
if [ "$MODE" = dry-run ]; then
    printf '%s\n%s\n%s\n' "$ENVIRONMENT" "$INSTALLED" "$IMPORTS"
else
    mkdir -p "$OUT" || exit 2
    {
        printf '# GPU check %s (%s)\n\n' "$(date '+%Y-%m-%d %H:%M:%S %Z')" "$MODE"
        printf 'commit: %s\n' "$(git describe --always --dirty 2>/dev/null || echo unknown)"
        printf '%s\n%s\n%s\nbudget: %s s\n' "$ENVIRONMENT" "$INSTALLED" "$IMPORTS" "$BUDGET"
    } >"$FIGURES"
fi

# MD-Mini: for --only data, or for a training step (built only where missing) unless --skip data
NEEDS_DATA=false
for step in data train_bf16 train_fp16 torchrun; do selected "$step" && NEEDS_DATA=true; done
if $NEEDS_DATA && [[ " ${SKIP[*]} " != *" data "* ]]; then data_step; fi
for amp in bf16 fp16; do
    if selected "train_$amp"; then train_step "$amp"; fi
done
if selected torchrun; then torchrun_step; fi
if selected bench; then bench_step; fi
if selected tests; then tests_step; fi
if selected bench_compile; then bench_compile_step; fi

if [ "$MODE" = dry-run ]; then
    "$PY" "$HELPER" modules "${MODULES[@]}" || FAILED+=(modules)
    if [ "${#FAILED[@]}" -eq 0 ]; then
        echo "gpu_check: dry run: every command parses and every python -m target resolves"
        exit 0
    fi
    echo "gpu_check: dry run: failed: ${FAILED[*]}" >&2
    exit 1
fi
printf '\n## result\n' >>"$FIGURES"
if [ "${#NOT_RUN[@]}" -gt 0 ]; then
    NEXT="scripts/gpu_check.sh --out DIR --only $(IFS=,; echo "${NOT_RUN[*]}")"
    record "not run" "${NOT_RUN[*]} (the budget of $BUDGET s); second call: $NEXT"
fi
if [ "${#FAILED[@]}" -gt 0 ]; then
    record result "failed: ${FAILED[*]}"
    echo "gpu_check: figures written to $FIGURES"
    exit 1
fi
record result "every step run passed${NOT_RUN[*]:+ (not run: ${NOT_RUN[*]})}"
echo "gpu_check: figures written to $FIGURES"
[ "${#NOT_RUN[@]}" -eq 0 ] || exit 3
