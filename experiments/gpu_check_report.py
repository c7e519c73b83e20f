"""The GPU check's verdicts: the implementations that passed the smoke stage, and the summary with
its final table (the environment record is `experiments.gpu_check_env`).

Used by `experiments/gpu_check.sh`:
    python -m experiments.gpu_check_report implementations smoke.json    # passed ones, fastest first
    python -m experiments.gpu_check_report summary --work DIR --out summary.txt

`summary` reads what the stages left in DIR (stages.tsv, env.json,
smoke.json, tests_*.log, op.jsonl, model.jsonl, timm.json), writes
summary.txt (`key: value` lines, the goals, then the table) and prints the
same table last. Every input may be missing or cut short: a stage that timed
out still gets its line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

# Which test file checks which implementation.
TEST_FILES = {"xla": "test_ops", "pallas_triton": "test_pallas_triton", "jax_triton": "test_jax_triton"}
_RESULT = re.compile(r"^(\S.*?::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)")

# --------------------------------------------------------------------------------------
# reading the stages' outputs
# --------------------------------------------------------------------------------------


def parse_pytest_log(text: str) -> dict:
    """Counts of a `pytest -v` log: passed, failed, error, skipped; `complete` if its closing line is there."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "complete": False}
    for line in text.splitlines():
        match = _RESULT.match(line)
        if match:
            status = match.group(2).lower()
            key = {"xfail": "skipped", "xpass": "passed"}.get(status, status)
            counts[key] += 1
    for line in reversed(text.splitlines()):
        if line.startswith("=") and (" in " in line) and _COUNTS.search(line):
            closing = {}
            for number, what in _COUNTS.findall(line):
                what = {"errors": "error", "xfailed": "skipped", "xpassed": "passed"}.get(what, what)
                closing[what] = closing.get(what, 0) + int(number)
            for key in ("passed", "failed", "error", "skipped"):
                counts[key] = closing.get(key, 0)
            counts["complete"] = True
            break
        if line.startswith("=") and "no tests ran" in line:
            counts["complete"] = True
            break
    return counts


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_jsonl(path) -> list:
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass  # a line cut short by a timeout
    except OSError:
        pass
    return rows


def read_stages(path) -> list[dict]:
    """stages.tsv: name, status, exit code, seconds, time limit."""
    stages = []
    try:
        with open(path) as f:
            for line in f:
                fields = line.rstrip("\n").split("\t")
                if len(fields) >= 5:
                    stages.append(dict(zip(("name", "status", "exit", "seconds", "limit"), fields[:5])))
    except OSError:
        pass
    return stages


def passed_implementations(smoke: dict | None) -> list[str]:
    """Implementations that passed the smoke check, fastest fwd+bwd first; ["xla"] without a verdict."""
    rows = [r for r in (smoke or {}).get("rows", []) if r.get("status") == "pass"]
    names = [r["implementation"] for r in sorted(rows, key=lambda r: r.get("fwd_bwd_ms", float("inf")))]
    return names or ["xla"]


# --------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------


def _goal_rows(op_rows: list) -> dict:
    """(method, mode) -> row at the op benchmark's first shape (the goal shape, k as measured there)."""
    if not op_rows:
        return {}
    first = (tuple(op_rows[0]["shape"]), op_rows[0]["kernel_size"], op_rows[0]["stride"])
    return {(r["method"], r["mode"]): r for r in op_rows
            if (tuple(r["shape"]), r["kernel_size"], r["stride"]) == first}


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _num(value) -> str:
    """A positive quantity with about three significant digits: 3210, 42.5, 0.0123."""
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def final_table(smoke, tests: dict, op_rows: list, model_rows: list, timm) -> str:
    """The short table: one row per implementation, then the baselines and the peers."""
    goal = _goal_rows(op_rows)
    smoke_rows = {r["implementation"]: r for r in (smoke or {}).get("rows", [])}
    trained = {}
    for r in model_rows:
        if r.get("status") == "ok" and r.get("train_img_s"):
            trained[(r["model"], r.get("implementation"))] = r["train_img_s"]
    ddf_model = next((r["model"] for r in model_rows if r["model"].startswith("ddf_")), "ddf model")
    lines = [
        f"| implementation | tests pass/fail | error vs xla | fwd ms | fwd GB/s | fwd of copy | fwd+bwd ms "
        f"| fwd+bwd GB/s | fwd+bwd of copy | {ddf_model} train img/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def op_cells(method):
        cells = []
        for mode in ("fwd", "fwd+bwd"):
            r = goal.get((method, mode))
            if r is None:
                cells += ["-", "-", "-"]
            else:
                frac = r.get("copy_fraction")
                cells += [f"{r['ms']:.3g}", _num(r["gbps"]), "-" if frac is None else f"{_num(100 * frac)}%"]
        return cells

    for impl, test_file in TEST_FILES.items():
        t = tests.get(test_file)
        if t is None:
            test_cell = "not run"
        elif not any(t[k] for k in ("passed", "failed", "error", "skipped")):
            test_cell = "none selected" if t["complete"] else "cut short before any result"
        else:
            test_cell = f"{t['passed']}/{t['failed'] + t['error']}"
            if t["skipped"]:
                test_cell += f" ({t['skipped']} skipped)"
            if not t["complete"]:
                test_cell += " cut short"
        s = smoke_rows.get(impl, {})
        if s.get("status") in ("pass", "fail"):
            error = f"{s['worst_error']:.1e}" + ("" if s["status"] == "pass" else " FAIL")
            if impl == "xla":
                error += " (vs f32)"
        else:
            error = s.get("status", "not run")
        img = trained.get((ddf_model, impl))
        lines.append(f"| {impl} | {test_cell} | {error} | " + " | ".join(op_cells(impl)) + f" | {_fmt(img, '.0f')} |")
    lines.append("| depthwise conv (XLA; cuDNN on GPU) | - | - | " + " | ".join(op_cells("depthwise")) + " | - |")
    lines.append("| unfold port | - | - | " + " | ".join(op_cells("unfold")) + " | - |")
    for (model, impl), img in trained.items():
        if not model.startswith("ddf_"):
            lines.append(f"| {model} (JAX, conv twin) | - | - | - | - | - | - | - | - | {img:.0f} |")
    if timm is not None:
        value = f"{timm['train_img_s']:.0f}" if timm.get("status") == "ok" else timm.get("status", "?")
        lines.append(f"| {timm.get('model', 'timm')} (PyTorch) | - | - | - | - | - | - | - | - | {value} |")
    return "\n".join(lines)


def goals(op_rows: list, model_rows: list, timm) -> list[str]:
    """The GPU goals (BENCHMARKS.md), each as measured in this run: a ratio, and whether it is met."""
    out = []
    goal = _goal_rows(op_rows)
    for impl in ("xla", "pallas_triton", "jax_triton"):
        fwd, both = goal.get((impl, "fwd")), goal.get((impl, "fwd+bwd"))
        if fwd is None:
            continue
        frac = fwd.get("copy_fraction")
        if frac is not None:
            out.append(f"goal {impl} forward >= 80% of copy bandwidth: {100 * frac:.0f}% ({'met' if frac >= 0.8 else 'not met'})")
        for mode, r in (("forward", fwd), ("fwd+bwd", both)):
            if r is not None and r.get("vs_depthwise") is not None:
                v = r["vs_depthwise"]
                out.append(f"goal {impl} {mode} <= 1.0x depthwise conv: {v:.2f}x ({'met' if v <= 1.0 else 'not met'})")
        if both is not None and both.get("bwd_over_fwd") is not None:
            out.append(f"measure {impl} fwd+bwd over fwd: {both['bwd_over_fwd']:.2f}x")
        # k=7 over k=3 on the goal shape (same N, H, W, C, stride), when both were measured.
        base = (tuple(fwd["shape"]), fwd["stride"])
        for mode in ("fwd", "fwd+bwd"):
            k3 = goal.get((impl, mode))
            k7 = next((r for r in op_rows if r["method"] == impl and r["mode"] == mode and r["kernel_size"] == 7
                       and (tuple(r["shape"]), r["stride"]) == base), None)
            if k3 is not None and k7 is not None:
                v = k7["ms"] / k3["ms"]
                out.append(f"goal {impl} {mode} k=7 over k=3 <= 2.0: {v:.2f}x ({'met' if v <= 2.0 else 'not met'})")
    ok = [r for r in model_rows if r.get("status") == "ok" and r.get("train_img_s")]
    twins = [r for r in ok if not r["model"].startswith("ddf_")]
    for r in (r for r in ok if r["model"].startswith("ddf_")):
        for peer, name in [(t["train_img_s"], f"{t['model']} (JAX)") for t in twins] + (
            [(timm["train_img_s"], f"{timm['model']} (PyTorch)")] if timm and timm.get("status") == "ok" else []
        ):
            v = r["train_img_s"] / peer
            out.append(f"goal {r['model']} ({r['implementation']}) train img/s >= {name}: "
                       f"{v:.2f}x ({'met' if v >= 1.0 else 'not met'})")
    return out


DRY_RUN_NOTE = [
    "dry_run: CPU only, tiny shapes; no number here says anything about a GPU",
    "dry_run_exercised: every stage and its time limit; the carried-wheel install into a private folder "
    "(when wheels are given) and the private package layout; the smoke check of xla and pallas_triton "
    "(Pallas interpret mode); pytest's GPU selection per test file (the GPU tests skip); the op benchmark's "
    "method (rotation, device loop, copy bandwidth, baselines, error column); the model benchmark (xla only); "
    "the PyTorch peer (if timm is installed); the archive and this summary",
    "dry_run_not_exercised: jax_triton (jax_triton cannot be imported on a CPU-only jax, so it reports "
    "unavailable; its kernels run in Triton's interpreter only in tests/test_jax_triton.py); Triton and "
    "cuDNN compilation and every GPU test; pallas_triton inside a whole model (interpret mode is too slow "
    "there); nvidia-smi, the driver and ptxas; the real shapes, sizes and time budget",
]


def summary(work: str, out: str, dry_run: bool, budget: str, total: str) -> str:
    """Writes summary.txt from the stage outputs in `work`; returns the final table."""
    work = pathlib.Path(work)
    env = _read_json(work / "env.json") or {}
    smoke = _read_json(work / "smoke.json")
    tests = {}
    for name in TEST_FILES.values():
        path = work / f"tests_{name}.log"
        if path.exists():
            tests[name] = parse_pytest_log(path.read_text(errors="replace"))
    op_rows = _read_jsonl(work / "op.jsonl")
    model_rows = _read_jsonl(work / "model.jsonl")
    timm = _read_json(work / "timm.json")
    stages = read_stages(work / "stages.tsv")

    packages = env.get("packages", {})
    lines = [
        "ddf-jax GPU check",
        f"mode: {'dry run (CPU)' if dry_run else 'gpu'}",
        f"date: {env.get('date', '?')}",
        f"commit: {env.get('commit', '?')} (from {env.get('commit_source', '?')})",
        f"tree_sha256: {env.get('tree_sha256', '?')}",
        f"device: {env.get('device') or (smoke or {}).get('device', '?')} (jax backend: {(smoke or {}).get('backend', '?')})",
        f"driver: {env.get('driver') or '-'}",
    ]
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "triton", "jax-triton", "flax", "torch", "timm"):
        lines.append(f"{name}: {packages.get(name) or 'not installed'}")
    for name, result in (env.get("carried") or {}).items():
        lines.append(f"carried: {name} ({result})")
    ptxas = env.get("ptxas") or {}
    lines.append("ptxas: " + ("; ".join(f"{k}: {v}" for k, v in ptxas.items()) if ptxas else "not found"))
    copy = next((r.get("copy_bandwidth") for r in op_rows if r.get("copy_bandwidth")), None)
    lines.append(f"copy_bandwidth: {_fmt(copy and copy / 1e9, '.1f', ' GB/s')} (read + write, this run)")
    suspect = [f"{r['method']} {r['mode']} {r['shape']} k={r['kernel_size']}" for r in op_rows if r.get("suspect")]
    if suspect:
        lines.append("suspect op rows (faster than the copy bandwidth: cache hits or elided work): " + "; ".join(suspect))
    lines.append(f"budget: {budget} s; total: {total} s")
    for s in stages:
        lines.append(f"stage {s['name']}: {s['status']} (exit {s['exit']}, {s['seconds']} s of {s['limit']} s)")
    if smoke:
        for r in smoke.get("rows", []):
            detail = r.get("message", "")
            if "worst_error" in r:
                detail = (f"worst error {r['worst_error']:.2e} vs {r['against']}; fwd {r['fwd_ms']:.4g} ms looped, "
                          f"{r['fwd_ms_dispatched']:.4g} ms dispatched; fwd+bwd {r['fwd_bwd_ms']:.4g} ms")
            lines.append(f"smoke {r['implementation']}: {r['status']} ({detail})")
    lines.append("model_implementations: " + ",".join(
        sorted({str(r.get("implementation")) for r in model_rows if r["model"].startswith("ddf_")})))
    if dry_run:
        lines += DRY_RUN_NOTE
    if dry_run:
        lines.append("goals: (dry run: the lines below show that the check computes them; their CPU numbers mean nothing)")
    lines += goals(op_rows, model_rows, timm)
    table = final_table(smoke, tests, op_rows, model_rows, timm)
    shape = f"{op_rows[0]['shape']} {op_rows[0]['dtype']} k={op_rows[0]['kernel_size']}" if op_rows else "-"
    lines += ["", f"final table (op columns at {shape}; error: worst over the output and the three gradients):", table]
    text = "\n".join(lines) + "\n"
    pathlib.Path(out).write_text(text)
    return table


def main(argv=None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_impl = sub.add_parser("implementations", help="print the implementations that passed the smoke check")
    p_impl.add_argument("smoke_json")
    p_sum = sub.add_parser("summary", help="write summary.txt and print the final table")
    p_sum.add_argument("--work", required=True)
    p_sum.add_argument("--out", required=True)
    p_sum.add_argument("--dry-run", action="store_true")
    p_sum.add_argument("--budget", default="?")
    p_sum.add_argument("--total", default="?")
    args = parser.parse_args(argv)

    if args.command == "implementations":
        print(",".join(passed_implementations(_read_json(args.smoke_json))))
    else:
        print(summary(args.work, args.out, args.dry_run, args.budget, args.total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
