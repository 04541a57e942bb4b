#!/usr/bin/env bash
# The one command for a CUDA machine (README "On a GPU"): bash benchmarks/gpu_check.sh
#
# It reaches no network and is bounded to 8 minutes: each step below has its own timeout (110 + 170 + 140 s,
# sized for one H200; not yet run on a GPU: a step that runs out is reported and the next one runs). It
#   1. stops at once, with one line, where torch.cuda.is_available() is false (exit 2);
#   2. runs the tests marked `cuda` (pytest -m cuda: the tiny gpu-paper comparison on cuda, every method, and
#      the measured client step on cuda against cpu);
#   3. runs benchmarks/mocosfl_speed.py --device cuda (one repeat of 3 timed steps per setting);
#   4. runs a slice of the gpu-paper comparison on the real CIFAR-10 files, offline: the two ceilings, FedMoCo v2
#      and MocoSFL-1 of "Dirichlet 0.5, 10 clients", seed 0, 3 rounds, the preset's nets, fine-tuning 2 epochs.
# A failed or timed-out step is recorded and the next one still runs; the exit status is non-zero if any failed.
#
# Writes into benchmarks/results/ (and copies into $OUT when it is set, e.g. on a lent device machine):
#   gpu_check.md             each step: status, seconds, where its output went; the machine
#   mocosfl_speed_cuda.md    the speed table on the GPU
#   gpu_paper_slice.md       the slice's results page (its plots: gpu_paper_slice/results/*.png, not committed)
# Logs and the slice's run directories: $GPU_CHECK_WORK (default /tmp/fedssl-gpu-check); run the script again
# and the slice continues its runs instead of starting over.
#
# Python: $PYTHON, else python3, else .venv/bin/python, whichever imports torch first. It needs torch (a CUDA
# build), numpy, matplotlib, rich and pytest. fedssl also needs kornia (the batched augmentations, imported by
# every method) and kornia_rs (kornia's dependency); flwr / flwr-datasets only for the Flower engine, which this
# script does not use. Where python3 lacks kornia, carry its wheels in .whl/ (ignored by git, never committed);
# the script installs them into $GPU_CHECK_WORK/site without the network. Prepare them on a machine with the
# internet, for the GPU machine's Python (3.12 here; the versions are those of our .venv):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl kornia==0.9.0 kornia_rs==0.2.0
# Being ignored, .whl/ travels only where it is named: a copy of the tree that takes tracked and untracked
# non-ignored files (a lent device machine) must be told to carry ".whl" (and the data, if not beside it).
#
# Data: $FEDSSL_DATA_DIR, ../shared/data or shared/data, whichever holds cifar-10-batches-py (nothing is downloaded).
# Knobs: GPU_CHECK_SPEED_STEPS (3), GPU_CHECK_SLICE_ROUNDS (3), GPU_CHECK_WORK.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
RESULTS=benchmarks/results
WORK=${GPU_CHECK_WORK:-/tmp/fedssl-gpu-check}
SPEED_STEPS=${GPU_CHECK_SPEED_STEPS:-3}
SLICE_ROUNDS=${GPU_CHECK_SLICE_ROUNDS:-3}
STARTED=$SECONDS

say() { printf 'gpu_check: %s\n' "$*"; }
die() { printf 'gpu_check: error: %s\n' "$*" >&2; exit 2; }

# ---------------------------------------------------------------- which python, and is there a GPU
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    for candidate in python3 .venv/bin/python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
            PY=$candidate
            break
        fi
    done
fi
[[ -n $PY ]] || die "no Python here imports torch (tried python3, .venv/bin/python); set PYTHON=/path/to/python"
CUDA_PROBE='import sys, torch
ok = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      + (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if ok else "no CUDA device"))
sys.exit(0 if ok else 3)'
if ! TORCH_INFO=$("$PY" -c "$CUDA_PROBE" 2>&1 | tail -n 1); then
    die "torch.cuda.is_available() is False ($PY: $TORCH_INFO); run this on a machine with a CUDA GPU and a CUDA build of torch"
fi
say "$PY: $TORCH_INFO"

# ---------------------------------------------------------------- fedssl's imports: kornia from .whl/ if carried
mkdir -p "$WORK"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$WORK/site
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" .whl/*.whl \
            || die "pip could not install .whl/*.whl for $("$PY" -V 2>&1) (wheels for another Python? see the top of $0)"
    else  # no pip: a wheel is a zip of the files site-packages holds
        "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
            "$SITE" .whl/*.whl
    fi
    export PYTHONPATH=$REPO:$SITE
    say "installed $(ls .whl/*.whl | xargs -n 1 basename | tr '\n' ' ')into $SITE"
fi
IMPORTS=$("$PY" -c 'import kornia, kornia.augmentation, fedssl.cli, fedssl.compare, pytest
print(f"kornia {kornia.__version__}, pytest {pytest.__version__}")' 2>&1 | tail -n 1) \
    || die "fedssl cannot import its dependencies with $PY ($IMPORTS); carry kornia and kornia_rs wheels in .whl/ (see the top of $0)"
say "$IMPORTS"

# ---------------------------------------------------------------- the real data, offline
DATA=""
for candidate in "${FEDSSL_DATA_DIR:-}" ../shared/data shared/data; do
    if [[ -n $candidate && -f $candidate/cifar-10-batches-py/data_batch_1 ]]; then
        DATA=$(cd "$candidate" && pwd)
        break
    fi
done
[[ -n $DATA ]] || die "no cifar-10-batches-py under \$FEDSSL_DATA_DIR, ../shared/data or shared/data; point FEDSSL_DATA_DIR at the folder that holds it (nothing is downloaded here)"
export FEDSSL_DATA_DIR=$DATA HF_HUB_OFFLINE=1
say "data: $DATA"

# ---------------------------------------------------------------- the steps
SUMMARY=()
FAILED=0
# step NAME SECONDS WHERE COMMAND...: run it under a timeout, log it, record the outcome, go on either way
step() {
    local name=$1 limit=$2 where=$3 rc=0 start=$SECONDS status
    shift 3
    say "== $name (at most $limit s) =="
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$WORK/$name.log" || rc=$?
    if [[ $rc -eq 0 ]]; then
        status="ok"
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        status="**timed out** after $limit s"
        FAILED=1
    else
        status="**failed** (exit $rc): $(tail -n 1 "$WORK/$name.log" | tr '|' '/' | cut -c1-200)"
        FAILED=1
    fi
    SUMMARY+=("| $name | $status | $((SECONDS - start)) | $where |")
    say "$name: $status ($((SECONDS - start)) s)"
}

mapfile -t CUDA_TESTS < <(grep -rl --include='*.py' 'pytest.mark.cuda' tests | sort)
step cuda-tests 110 "pytest output in $WORK/cuda-tests.log" \
    "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs "${CUDA_TESTS[@]}"

step mocosfl-speed 170 "$RESULTS/mocosfl_speed_cuda.md" \
    "$PY" benchmarks/mocosfl_speed.py --device cuda --data-dir "$DATA" --steps "$SPEED_STEPS" --repeats 1 --threads 4

SLICE_DOCS=$RESULTS/gpu_paper_slice
step gpu-paper-slice 140 "$RESULTS/gpu_paper_slice.md" \
    "$PY" -m fedssl.cli bench compare --preset gpu-paper --data-dir "$DATA" --runs "$WORK/gpu-paper-slice" \
    --docs "$SLICE_DOCS" --no-reliability --set device=cuda --set download=false --set "rounds=$SLICE_ROUNDS" \
    --set eval.finetune_epochs=2 --only 'centralized-*-s0' --only 'fedmoco-v2-dirichlet-0-5-10c-s0' \
    --only 'mocosfl-1-cut-1-dirichlet-0-5-10c-s0'
if [[ -f $SLICE_DOCS/RESULTS.md ]]; then  # benchmarks/results/*/ is not committed: the page goes beside it
    sed 's#](results/#](gpu_paper_slice/results/#' "$SLICE_DOCS/RESULTS.md" > "$RESULTS/gpu_paper_slice.md"
fi

# ---------------------------------------------------------------- what happened
GPU_LINE=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || true)
{
    printf '# GPU check (benchmarks/gpu_check.sh)\n\n'
    printf 'Run %s on %s (%s; %s; %s), %s s in all.\n\n' "$(date -u +%Y-%m-%dT%H:%MZ)" "$(uname -sm)" \
        "$TORCH_INFO" "${GPU_LINE:-nvidia-smi not found}" "$IMPORTS" "$((SECONDS - STARTED))"
    printf '| step | status | seconds | output |\n|---|---|---|---|\n'
    printf '%s\n' "${SUMMARY[@]}"
} > "$RESULTS/gpu_check.md"
printf '\n'
cat "$RESULTS/gpu_check.md"
if [[ -f $RESULTS/gpu_paper_slice.md ]]; then
    printf '\ngpu-paper slice (%s):\n' "$RESULTS/gpu_paper_slice.md"
    sed -n '/^## All runs/,/^## /p' "$RESULTS/gpu_paper_slice.md" | grep '^|' || true
fi
if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then  # a lent device machine returns what is under $OUT
    cp "$RESULTS/gpu_check.md" "$WORK"/*.log "$OUT"/
    for file in "$RESULTS/mocosfl_speed_cuda.md" "$RESULTS/gpu_paper_slice.md"; do
        if [[ -f $file ]]; then cp "$file" "$OUT"/; fi
    done
    if [[ -d $SLICE_DOCS/results ]]; then mkdir -p "$OUT/gpu_paper_slice" && cp -r "$SLICE_DOCS/results" "$OUT/gpu_paper_slice"/; fi
    say "copied the tables and logs to $OUT"
fi
say "done in $((SECONDS - STARTED)) s; tables in $RESULTS/"
exit "$FAILED"
