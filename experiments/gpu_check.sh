#!/usr/bin/env bash
# The GPU check: one call of at most 300 s (installs included) that says whether the GPU half of ddf-jax works.
#
#   GPU_CHECK_COMMIT=<sha> OUT=out bash experiments/gpu_check.sh     # on a machine with a CUDA GPU
#   GPU_CHECK_DRY_RUN=1 OUT=out bash experiments/gpu_check.sh        # every stage on the CPU, tiny shapes
#
# It needs no network. Stages, each under `timeout -k` with its own limit, cut to the time left so that
# the whole run ends within the budget; a stage that fails or times out never stops the next one:
#   wheels  carried wheels (GPU_CHECK_WHEELS, default .whl/*.whl: jax-triton 0.3.1, pure Python, fetched
#           beforehand with `python3 -m pip download --no-deps -d .whl jax-triton==0.3.1`) installed with
#           pip --no-index --no-deps --target into a private folder;
#   layout  the package laid out in a private folder as pip would install it (ddf_jax/, kernels/ as
#           ddf_jax.kernels) beside experiments/ and tests/; every later stage runs from there, so nothing
#           is installed into the machine's Python and the dry run takes the very same path;
#   env     date, commit, source tree hash, device, driver, jax, jaxlib, triton, jax-triton, torch, timm, ptxas;
#   smoke   every implementation against "xla" at (32,56,56,256) bf16 k=3: forward and the three gradients,
#           relative errors, device-timed ms (experiments/gpu_smoke.py);
#   tests   one pytest run per file, no -x, no -n (one JAX process on the GPU at a time):
#           test_pallas_triton.py and test_jax_triton.py with -m gpu, test_ops.py ("xla" on this backend);
#   op      experiments/benchmark_op.py --set gpu: the goal shape, k = 5 and 7, then the official test_time
#           shapes while time remains, for "xla", the implementations that passed the smoke stage, the
#           depthwise conv (cuDNN) and the unfold port;
#   model   experiments/benchmark_model.py: resnet50 and ddf_mul_resnet50 with each implementation that
#           passed the smoke stage (fastest first), train step, batch 128, 224 px, bf16;
#   timm    experiments/benchmark_timm.py: timm's resnet50 in PyTorch, same batch and image size,
#           channels_last, bf16 autocast (after the JAX processes have exited).
# Outputs, two files: $OUT/summary.txt and $OUT/gpu_check.tar.gz (every log, JSON and table). The last
# thing printed is the final table (per implementation: tests passed/failed, error against "xla",
# goal-shape ms, GB/s and fraction of the copy bandwidth measured in the same run; model images/s).
# Exit code: 0 when every stage ended well, else 1.
#
# The commit recorded: $GPU_CHECK_COMMIT if set (the GPU machine receives a copy of the working tree
# without .git, so the caller passes the commit it sent, adding "+dirty" if the tree had changes); else
# `git rev-parse HEAD` (with "+dirty") when .git is here; else "unknown". tree_sha256 identifies the
# source files that ran; compute the same here to compare:
#   find ddf_jax kernels experiments tests pyproject.toml -type f \( -name '*.py' -o -name '*.sh' \
#     -o -name '*.json' -o -name '*.toml' \) -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum | sha256sum
#
# Environment: OUT (default gpu_check_out), PYTHON (default python3), GPU_CHECK_BUDGET (seconds, default
# 300; stage limits scale with it), GPU_CHECK_WHEELS (default .whl), GPU_CHECK_DRY_RUN=1 (CPU, tiny
# shapes, the model stage with "xla" only: interpret-mode kernels in a whole model take minutes there;
# its two CIFAR models cut to one stage of one 8-plane block, to compile in seconds).
set -uo pipefail
cd "$(dirname "$0")/.."

# Stage time limits in seconds for a 300 s budget (scaled with GPU_CHECK_BUDGET): each stage gets at most
# CAP, and no more than leaves RESERVE for the stages after it. With every stage running to its limit the
# run still ends by 300 s; stages that end early leave their time to the op benchmark and the models.
#              CAP RESERVE
LIMIT_WHEELS=( 30  250)
LIMIT_LAYOUT=( 15  250)
LIMIT_ENV=(    20  240)
LIMIT_SMOKE=(  40  200)
TEST_FILES=(test_pallas_triton test_jax_triton test_ops)   # one pytest run each
TEST_CAPS=(     45                 40              35)
TEST_RESERVES=(155                152             152)
LIMIT_OP=(     90  107)
LIMIT_MODEL=( 100   32)
LIMIT_TIMM=(   25   10)
LIMIT_SUMMARY=10
REPO=$PWD
START=$(date +%s.%N)
BUDGET=${GPU_CHECK_BUDGET:-300}
DRY=${GPU_CHECK_DRY_RUN:-0}
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WHEELS=$(cd "$WHEELS" 2>/dev/null && pwd || echo "$WHEELS")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ddf_gpu_check.XXXXXX")
LOGS="$WORK/gpu_check"   # archived as gpu_check/ in $OUT/gpu_check.tar.gz
SITE="$WORK/site"
SRC="$WORK/src"
STAGES="$LOGS/stages.tsv"
mkdir -p "$LOGS" && : >"$STAGES"
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  # Its timings mean nothing: skip LLVM's optimisation of the generated code to compile faster.
  export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0"
fi

say() { echo "[gpu_check $(date +%T)] $*"; }
elapsed() { awk -v s="$START" -v n="$(date +%s.%N)" 'BEGIN { printf "%d", n - s }'; }
# stage_limit CAP RESERVE: CAP (scaled with the budget), cut so that RESERVE seconds (scaled) stay for what follows.
stage_limit() {
  local cap=$(($1 * BUDGET / 300)) left=$((BUDGET - $(elapsed) - $2 * BUDGET / 300))
  echo $((cap < left ? cap : left))
}
# run_stage NAME LIMIT LOG CMD...: runs CMD under timeout -k, records its status in stages.tsv.
run_stage() {
  local name=$1 limit=$2 log=$3 status
  shift 3
  if [ "$limit" -lt 3 ]; then
    printf '%s\tskipped (no time left)\t-\t0\t%s\n' "$name" "$limit" >>"$STAGES"
    say "$name: skipped, no time left"
    return 1
  fi
  say "$name (limit ${limit} s)"
  local t0
  t0=$(date +%s.%N)
  timeout -k 5 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local secs
  secs=$(awk -v s="$t0" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }')
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    5) [[ $name == tests_* ]] && status="ok (no tests selected)" || status="failed" ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$limit" >>"$STAGES"
  say "$name: $status (exit $rc, $secs s)"
  if [ "$status" != ok ] && [ "$status" != "ok (no tests selected)" ]; then
    tail -n 12 "$log" | sed 's/^/    | /'
  fi
  return $rc
}

# --- commit ------------------------------------------------------------------------------
if [ -n "${GPU_CHECK_COMMIT:-}" ]; then
  COMMIT=$GPU_CHECK_COMMIT COMMIT_SOURCE=GPU_CHECK_COMMIT
elif [ -e .git ] && COMMIT=$(git rev-parse HEAD 2>/dev/null); then
  [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && COMMIT="$COMMIT+dirty"
  COMMIT_SOURCE="git rev-parse"
else
  COMMIT=unknown COMMIT_SOURCE="none (no .git here and GPU_CHECK_COMMIT unset)"
fi
TREE=$(find ddf_jax kernels experiments tests pyproject.toml -type f \( -name '*.py' -o -name '*.sh' \
  -o -name '*.json' -o -name '*.toml' \) -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-64)
say "commit $COMMIT ($COMMIT_SOURCE), tree $TREE, budget $BUDGET s, dry run $DRY, python $PY"

# --- the shapes and sizes of the two modes -----------------------------------------------------
if [ "$DRY" = 1 ]; then
  SMOKE_ARGS=(--shape 2,9,7,12 --cache-mb 0 --target-seconds 0.005)
  TEST_MARKS=(gpu gpu gpu)
  OP_ARGS=(--set dry --cache-mb 0 --copy-mb 8 --target-seconds 0.005)
  MODELS=resnet20_cifar,ddf_mul_resnet20_cifar
  MODEL_ARGS=(--batch 2 --size 16 --steps 2 --runs 1 --model-overrides '{"layers": [1], "widths": [8], "stem_width": 8}')
  TIMM_ARGS=(--batch 2 --size 32 --steps 1 --runs 1)
  MODEL_IMPLEMENTATIONS=xla
else
  SMOKE_ARGS=()
  TEST_MARKS=(gpu gpu "not slow")
  OP_ARGS=(--set gpu --copy-mb 1024)
  MODELS=resnet50,ddf_mul_resnet50
  MODEL_ARGS=(--batch 128 --size 224 --steps 10 --runs 3)
  TIMM_ARGS=(--batch 128 --size 224 --steps 10 --runs 3)
  MODEL_IMPLEMENTATIONS=all
fi

# --- setup: carried wheels, the private package layout -------------------------------------
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  run_stage wheels "$(stage_limit "${LIMIT_WHEELS[@]}")" "$LOGS/wheels.log" \
    "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" "$WHEELS"/*.whl && say "wheels: $(cd "$WHEELS" && ls ./*.whl | xargs -n1 basename | tr '\n' ' ')"
else
  printf 'wheels\tnone given (%s/*.whl)\t-\t0\t0\n' "$WHEELS" >>"$STAGES"
  say "wheels: none in $WHEELS"
fi
run_stage layout "$(stage_limit "${LIMIT_LAYOUT[@]}")" "$LOGS/layout.log" bash -c '
  set -e
  mkdir -p "$1/ddf_jax"
  cp -r ddf_jax/. "$1/ddf_jax/"
  cp -r kernels "$1/ddf_jax/kernels"
  cp -r experiments tests pyproject.toml "$1/"
  find "$1" -name __pycache__ -prune -exec rm -rf {} +
  echo "laid out in $1"' _ "$SRC"
export PYTHONPATH="$SRC:$SITE${PYTHONPATH:+:$PYTHONPATH}"
cd "$SRC" || exit 1

# --- env ------------------------------------------------------------------------------------
run_stage env "$(stage_limit "${LIMIT_ENV[@]}")" "$LOGS/env.txt" \
  "$PY" -m experiments.gpu_check_env --commit "$COMMIT" --commit-source "$COMMIT_SOURCE" \
  --tree "$TREE" --site "$SITE" --json "$LOGS/env.json"

# --- smoke ----------------------------------------------------------------------------------
run_stage smoke "$(stage_limit "${LIMIT_SMOKE[@]}")" "$LOGS/smoke.log" \
  "$PY" -m experiments.gpu_smoke "${SMOKE_ARGS[@]}" --json "$LOGS/smoke.json"
PASSED=$("$PY" -m experiments.gpu_check_report implementations "$LOGS/smoke.json" 2>/dev/null || echo xla)
say "passed the smoke stage (fastest first): $PASSED"

# --- GPU tests: one pytest run per file --------------------------------------------------------
for i in 0 1 2; do
  file=${TEST_FILES[$i]}
  run_stage "tests_$file" "$(stage_limit "${TEST_CAPS[$i]}" "${TEST_RESERVES[$i]}")" "$LOGS/tests_$file.log" \
    "$PY" -m pytest -v -p no:cacheprovider -m "${TEST_MARKS[$i]}" "tests/$file.py"
done

# --- op benchmark -----------------------------------------------------------------------------
OP_IMPLS=xla
for impl in ${PASSED//,/ }; do [ "$impl" != xla ] && OP_IMPLS="$OP_IMPLS,$impl"; done
limit=$(stage_limit "${LIMIT_OP[@]}")
run_stage op "$limit" "$LOGS/op.log" \
  "$PY" -m experiments.benchmark_op "${OP_ARGS[@]}" --dtype bfloat16 --implementations "$OP_IMPLS" --no-temp \
  --budget-seconds $((limit > 20 ? limit - 10 : limit / 2)) --json "$LOGS/op.jsonl" --markdown "$LOGS/benchmarks.md"

# --- model throughput -------------------------------------------------------------------------
MODEL_IMPLS=""
for impl in ${PASSED//,/ }; do
  if [ "$MODEL_IMPLEMENTATIONS" = all ] || [[ ",$MODEL_IMPLEMENTATIONS," == *",$impl,"* ]]; then
    MODEL_IMPLS="${MODEL_IMPLS:+$MODEL_IMPLS,}$impl"
  fi
done
limit=$(stage_limit "${LIMIT_MODEL[@]}")
run_stage model "$limit" "$LOGS/model.log" \
  "$PY" -m experiments.benchmark_model --models "$MODELS" --implementation "${MODEL_IMPLS:-xla}" "${MODEL_ARGS[@]}" \
  --dtype bfloat16 --modes train --budget-seconds $((limit > 20 ? limit - 15 : limit / 2)) \
  --json "$LOGS/model.jsonl" --markdown "$LOGS/benchmarks.md"
run_stage timm "$(stage_limit "${LIMIT_TIMM[@]}")" "$LOGS/timm.log" \
  "$PY" -m experiments.benchmark_timm "${TIMM_ARGS[@]}" --json "$LOGS/timm.json"

# --- summary, archive, the final table -------------------------------------------------------------
DRY_FLAG=()
[ "$DRY" = 1 ] && DRY_FLAG=(--dry-run)
if ! timeout -k 2 "$LIMIT_SUMMARY" "$PY" -m experiments.gpu_check_report summary --work "$LOGS" --out "$OUT/summary.txt" \
  --budget "$BUDGET" --total "$(elapsed)" "${DRY_FLAG[@]}" >"$LOGS/summary.log" 2>&1; then
  { echo "ddf-jax GPU check: the summary failed (see gpu_check/summary.log in the archive)"; cat "$STAGES"; } >"$OUT/summary.txt"
fi
cp "$OUT/summary.txt" "$LOGS/summary.txt"
cp "$REPO/experiments/gpu_check.sh" "$LOGS/gpu_check.sh"
tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" gpu_check
say "wrote $OUT/summary.txt and $OUT/gpu_check.tar.gz ($(tar -tzf "$OUT/gpu_check.tar.gz" | wc -l) entries) in $(elapsed) s"
status=0
cut -f2 "$STAGES" | grep -qv -e '^ok' -e '^none given' && status=1
echo
sed -n '/^final table/,$p' "$OUT/summary.txt"
exit $status
