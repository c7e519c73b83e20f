"""The GPU check (`experiments/gpu_check.sh`): its dry run on the CPU, its smoke verdicts and its summary.

The dry run runs every stage of the check at tiny shapes on the CPU, so the
script cannot rot between the rare runs on a GPU. A hand-made wheel stands in
for the carried jax-triton wheel, so that the install into a private folder
is exercised too (the real wheel is not in the repository).
"""

import base64
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import gpu_check_report, gpu_smoke

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ["wheels", "layout", "env", "smoke", "tests_test_pallas_triton", "tests_test_jax_triton",
          "tests_test_ops", "op", "model", "timm"]


def make_probe_wheel(directory: pathlib.Path) -> pathlib.Path:
    """A minimal pure-Python wheel `ddf_check_probe` 0.1 (a module, METADATA, WHEEL and RECORD)."""
    files = {
        "ddf_check_probe/__init__.py": b"VALUE = 17\n",
        "ddf_check_probe-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: ddf-check-probe\nVersion: 0.1\n",
        "ddf_check_probe-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        "ddf_check_probe-0.1.dist-info/top_level.txt": b"ddf_check_probe\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("ddf_check_probe-0.1.dist-info/RECORD,,")
    files["ddf_check_probe-0.1.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ddf_check_probe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


def run_dry_run(tmp_path: pathlib.Path, timeout: float = 540):
    """Runs the dry run in its own process group; kills the group if it outlives `timeout`."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH", "JAX_PLATFORMS")}
    env.update(
        GPU_CHECK_DRY_RUN="1",
        OUT=str(out),
        PYTHON=sys.executable,
        GPU_CHECK_WHEELS=str(make_probe_wheel(tmp_path / "wheels").parent),
        # Twice the limits: this machine is shared with the other tests while the check runs.
        GPU_CHECK_BUDGET="600",
        GPU_CHECK_COMMIT="0123abc+test",
        TMPDIR=str(tmp_path),
    )
    start = time.monotonic()
    process = subprocess.Popen(
        ["bash", str(ROOT / "experiments" / "gpu_check.sh")], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        stdout, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, stdout, out, time.monotonic() - start


def parse_summary(text: str) -> dict:
    """summary.txt's `key: value` lines (repeated keys such as `stage NAME` kept by their full key)."""
    fields = {}
    for line in text.split("\nfinal table", 1)[0].splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key] = value
    return fields


@pytest.mark.slow
def test_dry_run(tmp_path):
    """The whole check on the CPU: one test (one run), so that pytest-xdist cannot run it twice."""
    returncode, stdout, out, seconds = run_dry_run(tmp_path)
    print(f"dry run: {seconds:.0f} s\n{stdout}")
    assert returncode == 0, stdout[-4000:]
    check_outputs(out, stdout)
    extracted = tmp_path / "extracted"
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        archive.extractall(extracted, filter="data")
    check_archive(extracted / "gpu_check")
    assert not list(tmp_path.glob("ddf_gpu_check.*"))  # its private work folder is removed


def check_outputs(out: pathlib.Path, stdout: str):
    """Two files in OUT; summary.txt reports every stage; the printed output ends with the final table."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and sorted(p.name for p in files) == ["gpu_check.tar.gz", "summary.txt"]
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)  # nothing deeper than $OUT/a/b/file
    summary = (out / "summary.txt").read_text()
    fields = parse_summary(summary)
    assert fields["mode"] == "dry run (CPU)"
    assert fields["commit"] == "0123abc+test (from GPU_CHECK_COMMIT)"
    assert len(fields["tree_sha256"]) == 64
    assert fields["jax"] == jax.__version__
    assert "dry_run_not_exercised" in fields and "jax_triton" in fields["dry_run_not_exercised"]
    for stage in STAGES:
        assert fields[f"stage {stage}"].startswith("ok"), (stage, fields.get(f"stage {stage}"))
    assert fields["smoke xla"].startswith("pass")
    assert fields["smoke pallas_triton"].startswith("pass")
    assert fields["smoke jax_triton"].startswith("unavailable")
    assert "\ncarried: ddf-check-probe 0.1 (import ddf_check_probe: ok)\n" in summary
    assert fields["model_implementations"] == "xla"
    # The check ends by printing the final table, the same one summary.txt ends with.
    printed = stdout.rstrip().splitlines()
    table = summary.rstrip().split("\nfinal table", 1)[1].splitlines()[1:]
    assert printed[-len(table):] == table
    assert table[0].startswith("| implementation | tests pass/fail | error vs xla | fwd ms | fwd GB/s | fwd of copy |")
    rows = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert set(rows) >= {"xla", "pallas_triton", "jax_triton", "resnet20_cifar (JAX, conv twin)"}
    assert "unavailable" in rows["jax_triton"]


def check_archive(logs: pathlib.Path):
    """The archive holds every stage's log and JSON, and they say what the summary says."""
    for name in ["env.json", "smoke.json", "op.jsonl", "model.jsonl", "timm.json", "stages.tsv", "summary.txt",
                 "benchmarks.md", "gpu_check.sh", "tests_test_pallas_triton.log", "tests_test_jax_triton.log",
                 "tests_test_ops.log", "wheels.log"]:
        assert (logs / name).is_file(), name
    assert [line.split("\t")[0] for line in (logs / "stages.tsv").read_text().splitlines()] == STAGES
    env = json.loads((logs / "env.json").read_text())
    assert env["packages"]["jax"] == jax.__version__ and env["commit_source"] == "GPU_CHECK_COMMIT"
    smoke = json.loads((logs / "smoke.json").read_text())
    assert smoke["dtype"] == "bfloat16" and smoke["kernel_size"] == 3
    statuses = {r["implementation"]: r["status"] for r in smoke["rows"]}
    assert statuses == {"xla": "pass", "pallas_triton": "pass", "jax_triton": "unavailable"}
    op = [json.loads(line) for line in (logs / "op.jsonl").read_text().splitlines()]
    measured = {(tuple(r["shape"]), r["kernel_size"], r["method"], r["mode"]) for r in op}
    for shape in [(2, 9, 7, 12, 3), (2, 9, 7, 12, 1)]:
        for method in ["depthwise", "xla", "pallas_triton", "unfold"]:
            for mode in ["fwd", "fwd+bwd"]:
                assert (shape[:4], shape[4], method, mode) in measured
    assert all(r["ms"] > 0 and r["copy_bandwidth"] > 0 for r in op)
    assert all(r["error_vs_xla"] <= 1e-2 for r in op if r["method"] == "pallas_triton")
    models = [json.loads(line) for line in (logs / "model.jsonl").read_text().splitlines()]
    assert [(m["model"], m["implementation"], m["status"]) for m in models] == [
        ("resnet20_cifar", None, "ok"), ("ddf_mul_resnet20_cifar", "xla", "ok")]
    assert all(m["train_img_s"] > 0 for m in models)
    timm = json.loads((logs / "timm.json").read_text())
    assert timm["status"] in ("ok", "unavailable")
    tests = gpu_check_report.parse_pytest_log((logs / "tests_test_pallas_triton.log").read_text())
    assert tests["complete"] and tests["skipped"] > 0 and tests["passed"] == tests["failed"] == 0


# --- the pieces, without running the check ---------------------------------------------------


PYTEST_LOG = """\
============================= test session starts ==============================
collected 5 items

tests/test_x.py::test_a[3-1] PASSED                                      [ 20%]
tests/test_x.py::test_a[5 - 2] FAILED                                    [ 40%]
tests/test_x.py::test_b SKIPPED (needs a CUDA GPU)                       [ 60%]
tests/test_x.py::test_c ERROR                                            [ 80%]
tests/test_x.py::test_d PASSED                                           [100%]
"""


def test_pytest_log_counts_with_and_without_the_closing_line():
    cut = gpu_check_report.parse_pytest_log(PYTEST_LOG)
    assert cut == {"passed": 2, "failed": 1, "error": 1, "skipped": 1, "complete": False}
    closed = gpu_check_report.parse_pytest_log(
        PYTEST_LOG + "=========== 2 passed, 1 failed, 1 skipped, 1 error in 3.21s ===========\n")
    assert closed == {"passed": 2, "failed": 1, "error": 1, "skipped": 1, "complete": True}
    none = gpu_check_report.parse_pytest_log("===================== 25 deselected in 0.52s =====================\n")
    assert none["complete"] and not any(none[k] for k in ("passed", "failed", "error", "skipped"))


def test_passed_implementations_fastest_first_and_xla_without_a_verdict():
    smoke = {"rows": [{"implementation": "xla", "status": "pass", "fwd_bwd_ms": 3.0},
                      {"implementation": "pallas_triton", "status": "pass", "fwd_bwd_ms": 1.0},
                      {"implementation": "jax_triton", "status": "fail", "fwd_bwd_ms": 0.5}]}
    assert gpu_check_report.passed_implementations(smoke) == ["pallas_triton", "xla"]
    assert gpu_check_report.passed_implementations(None) == ["xla"]


def _op_row(method, mode, k, ms, copy_fraction, vs_depthwise, bwd_over_fwd=None):
    return {"shape": [32, 56, 56, 256], "kernel_size": k, "stride": 1, "method": method, "mode": mode, "ms": ms,
            "gbps": 1000.0 * copy_fraction * 4, "copy_fraction": copy_fraction, "vs_depthwise": vs_depthwise,
            "bwd_over_fwd": bwd_over_fwd, "dtype": "bfloat16", "copy_bandwidth": 4e12}


def test_goals_are_ratios_from_the_same_run():
    op = [
        _op_row("depthwise", "fwd", 3, 0.05, 0.5, 1.0),
        _op_row("pallas_triton", "fwd", 3, 0.04, 0.85, 0.8),
        _op_row("pallas_triton", "fwd+bwd", 3, 0.2, 0.5, 1.1, 5.0),
        _op_row("pallas_triton", "fwd", 7, 0.1, 0.6, 0.9),
    ]
    models = [{"model": "resnet50", "implementation": None, "status": "ok", "train_img_s": 3000.0},
              {"model": "ddf_mul_resnet50", "implementation": "pallas_triton", "status": "ok", "train_img_s": 2400.0}]
    timm = {"model": "timm resnet50", "status": "ok", "train_img_s": 2000.0}
    lines = gpu_check_report.goals(op, models, timm)
    assert "goal pallas_triton forward >= 80% of copy bandwidth: 85% (met)" in lines
    assert "goal pallas_triton forward <= 1.0x depthwise conv: 0.80x (met)" in lines
    assert "goal pallas_triton fwd+bwd <= 1.0x depthwise conv: 1.10x (not met)" in lines
    assert "measure pallas_triton fwd+bwd over fwd: 5.00x" in lines
    assert "goal pallas_triton fwd k=7 over k=3 <= 2.0: 2.50x (not met)" in lines
    assert "goal ddf_mul_resnet50 (pallas_triton) train img/s >= resnet50 (JAX): 0.80x (not met)" in lines
    assert "goal ddf_mul_resnet50 (pallas_triton) train img/s >= timm resnet50 (PyTorch): 1.20x (met)" in lines
    table = gpu_check_report.final_table(
        {"rows": [{"implementation": "pallas_triton", "status": "pass", "worst_error": 2e-3}]},
        {"test_pallas_triton": {"passed": 7, "failed": 0, "error": 0, "skipped": 0, "complete": True}},
        op, models, timm).splitlines()
    pallas = next(line for line in table if line.startswith("| pallas_triton |"))
    assert pallas == "| pallas_triton | 7/0 | 2.0e-03 | 0.04 | 3400 | 85% | 0.2 | 2000 | 50% | 2400 |"
    assert any(line.startswith("| timm resnet50 (PyTorch) |") and line.endswith("| 2000 |") for line in table)


def test_smoke_check_fails_a_wrong_result_and_passes_the_right_one():
    k, dtype = 3, jnp.dtype(jnp.float32)
    sets = gpu_smoke.make_sets((2, 7, 6, 5), k, dtype, 1)
    tolerance = gpu_smoke.TOLERANCE_ULPS * gpu_smoke.unit_roundoff(dtype)
    right = gpu_smoke.check("xla", sets, k, tolerance, 0.001, reference=None)
    assert right["status"] == "pass" and right["worst_error"] <= tolerance
    reference = tuple(np.asarray(a) for a in jax.jit(gpu_smoke.op_functions(k, "xla")[1])(*sets[0]))
    assert gpu_smoke.check("xla", sets, k, tolerance, 0.001, reference=reference)["status"] == "pass"
    # One wrong element of one gradient fails the check.
    wrong = list(reference)
    wrong[2] = wrong[2].copy()
    wrong[2][1, 3, 4] += 0.5 * np.abs(wrong[2]).max()
    row = gpu_smoke.check("xla", sets, k, tolerance, 0.001, reference=tuple(wrong))
    assert row["status"] == "fail" and row["errors"]["d_channel_filter"]["rel_max"] > 0.3
    nan = list(reference)
    nan[0] = np.full_like(nan[0], np.nan)
    assert gpu_smoke.check("xla", sets, k, tolerance, 0.001, reference=tuple(nan))["status"] == "fail"


def test_smoke_reports_an_implementation_that_cannot_run_here_as_unavailable():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU verdict of jax_triton")
    sets = gpu_smoke.make_sets((1, 5, 5, 4), 3, jnp.dtype(jnp.float32), 1)
    row = gpu_smoke.check("jax_triton", sets, 3, 1e-6, 0.001, reference=(None,) * 4)
    assert row["status"] == "unavailable" and "jax_triton" in row["message"]
