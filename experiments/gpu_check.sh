#!/usr/bin/env bash
# The project's GPU check: the GPU tests, then the op and model benchmarks.
#
# Run from the repository root on a machine with a CUDA GPU and a CUDA jax:
#
#     bash experiments/gpu_check.sh            # results go to $OUT, else ./gpu_check_out
#
# It needs no network. jax-triton is not on every GPU image; if it is missing,
# bring its wheel (pure Python, 17 kB) beforehand, from a machine with network:
#
#     python3 -m pip download --no-deps -d .whl jax-triton==0.3.1
#
# and this script installs everything under .whl/ into a private folder.
# Each stage has its own time limit so that the whole run stays under about
# 8 minutes; a stage that runs out keeps what it wrote. Outputs:
#   env.txt            device, driver, jax/jaxlib/triton/jax-triton versions
#   gpu_tests.log      pytest -m gpu over the op test files (and junit xml)
#   benchmarks.md      op benchmark tables (bf16 all shapes, f32 goal shape),
#                      model throughput table
#   summary.txt        pass/fail of each stage
#   tuning_table.json  only with AUTOTUNE_SECONDS > 0 (the run then exceeds 8 minutes;
#                      copy the table to kernels/tuning_table.json after checking it)
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: >"$summary"
stage() { echo "[gpu_check $(date +%T)] $*"; }
record() { echo "$1: exit $2" | tee -a "$summary"; }

# --- setup -----------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  stage "installing carried wheels: $(ls .whl)"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/ddf_site .whl/*.whl
  export PYTHONPATH="/tmp/ddf_site${PYTHONPATH:+:$PYTHONPATH}"
fi
stage "installing ddf-jax (editable, no dependencies)"
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip_install.log" 2>&1; then
  # Without setuptools' editable hook, lay the package out by hand:
  # ddf_jax/ plus kernels/ as ddf_jax.kernels.
  stage "pip install failed (see pip_install.log); using a copied package tree"
  rm -rf /tmp/ddf_src && mkdir -p /tmp/ddf_src
  cp -r ddf_jax /tmp/ddf_src/ddf_jax && cp -r kernels /tmp/ddf_src/ddf_jax/kernels
  export PYTHONPATH="/tmp/ddf_src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

$PY - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import datetime, importlib, subprocess
import jax
print("date:", datetime.datetime.now().isoformat(timespec="seconds"))
print("jax:", jax.__version__, "backend:", jax.default_backend())
print("devices:", [d.device_kind for d in jax.devices()])
for name in ("jaxlib", "triton", "jax_triton", "flax", "ddf_jax"):
    try:
        module = importlib.import_module(name)
        print(f"{name}:", getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as e:  # report, do not stop
        print(f"{name}: NOT importable ({type(e).__name__}: {e})")
try:
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                          "--format=csv"], capture_output=True, text=True).stdout)
except FileNotFoundError:
    print("nvidia-smi not found")
EOF

# --- 1. GPU tests ------------------------------------------------------------
stage "GPU tests"
timeout 170 $PY -m pytest -m gpu -q -n 0 -p no:cacheprovider -x --durations=10 \
  --junitxml="$OUT/gpu_tests.xml" \
  tests/test_ops.py tests/test_pallas_triton.py tests/test_jax_triton.py 2>&1 | tee "$OUT/gpu_tests.log"
record "gpu tests" "${PIPESTATUS[0]}"

# --- 1b. the rest of the op/layer tests under this machine's jax ---------------
# (jax 0.11.x there, 0.10.2 in CI): catches API drift outside the GPU kernels.
stage "op, layer and MAC tests under this jax"
timeout 90 $PY -m pytest -q -n 8 -p no:cacheprovider -m "not gpu and not slow" \
  tests/test_ops.py tests/test_nn.py tests/test_benchmarks.py tests/test_models.py -k "macs or not test_models" \
  2>&1 | tee "$OUT/jax_version_tests.log"
record "non-gpu tests" "${PIPESTATUS[0]}"

# --- 2. op benchmark ---------------------------------------------------------
stage "op benchmark, bfloat16, official shapes + k sweep"
timeout 130 $PY -m experiments.benchmark_op --set gpu --dtype bfloat16 --repeats 20 \
  --markdown "$OUT/benchmarks.md" 2>&1 | tee "$OUT/bench_bf16.log"
record "op benchmark bf16" "${PIPESTATUS[0]}"
stage "op benchmark, float32, goal shape"
timeout 40 $PY -m experiments.benchmark_op --set goal --dtype float32 --repeats 20 \
  --markdown "$OUT/benchmarks.md" 2>&1 | tee "$OUT/bench_f32.log"
record "op benchmark f32" "${PIPESTATUS[0]}"

# --- 3. model throughput -----------------------------------------------------
stage "model throughput, batch 128, 224 px, bf16"
timeout 100 $PY -m experiments.benchmark_model --models ddf_mul_resnet50,resnet50 --batch 128 --size 224 \
  --dtype bfloat16 --steps 10 --markdown "$OUT/benchmarks.md" 2>&1 | tee "$OUT/bench_model.log"
record "model benchmark" "${PIPESTATUS[0]}"

# --- 4. optional: autotune (AUTOTUNE_SECONDS=240 bash experiments/gpu_check.sh) --------
if [ "${AUTOTUNE_SECONDS:-0}" -gt 0 ]; then
  stage "autotune, budget ${AUTOTUNE_SECONDS}s"
  timeout $((AUTOTUNE_SECONDS + 90)) $PY -m experiments.autotune --budget-seconds "$AUTOTUNE_SECONDS" \
    --write "$OUT/tuning_table.json" --results "$OUT/autotune_results.json" 2>&1 | tee "$OUT/autotune.md"
  record "autotune" "${PIPESTATUS[0]}"
fi

stage "done"
cat "$summary"
