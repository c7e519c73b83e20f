"""The GPU check's environment record: date, commit, source tree, device, driver, package versions,
ptxas and the carried wheels, taken without initialising any JAX backend (the stages do that).

Used by `experiments/gpu_check.sh`:
    python -m experiments.gpu_check_env --commit SHA --commit-source git --tree HASH --site DIR --json env.json
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys

PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "flax", "optax", "chex", "numpy",
            "triton", "jax-triton", "torch", "timm")


def _run(cmd) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (done.stdout or done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"not available ({type(error).__name__})"


def _ptxas_versions() -> dict:
    """`ptxas --version` of each ptxas found: on PATH, in the triton wheel, in NVIDIA's wheels."""
    found = {}
    if shutil.which("ptxas"):
        found["PATH"] = shutil.which("ptxas")
    try:
        spec = importlib.util.find_spec("triton")
        if spec and spec.origin:
            path = pathlib.Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
            if path.exists():
                found["triton"] = str(path)
    except (ImportError, ValueError):
        pass
    for path in sorted(glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia", "**", "ptxas"),
                                 recursive=True)):
        found.setdefault(f"nvidia wheel {pathlib.Path(path).parent.parent.name}", path)
    versions = {}
    for where, path in found.items():
        lines = _run([path, "--version"]).splitlines()
        versions[where] = f"{lines[-1] if lines else '?'} ({path})"
    return versions


def carried_packages(site: str) -> dict:
    """{name version: import result} of each distribution installed into the private folder `site`.

    Importing them here is what tells a broken carried package from a missing one early (on a
    CPU-only jax, jax_triton's import fails by design).
    """
    carried = {}
    if not site or not os.path.isdir(site):
        return carried
    for dist in importlib.metadata.distributions(path=[site]):
        top = (dist.read_text("top_level.txt") or dist.metadata["Name"].replace("-", "_")).split()
        results = []
        for module in top:
            try:
                done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                                      timeout=60)
                lines = done.stderr.strip().splitlines() or ["?"]
                last = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception)\b", line)), lines[-1])
                results.append(f"import {module}: " + ("ok" if done.returncode == 0 else f"fails ({last})"))
            except subprocess.TimeoutExpired:
                results.append(f"import {module}: took over 60 s")
        carried[f"{dist.metadata['Name']} {dist.version}"] = "; ".join(results)
    return carried


def environment(commit: str, commit_source: str, tree: str, site: str = "") -> dict:
    """The run's environment, without initialising any JAX backend (that is left to the stages)."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "commit_source": commit_source,
        "tree_sha256": tree,
        "host": platform.node(),
        "python": sys.version.split()[0],
        "packages": {},
    }
    for name in PACKAGES:
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                "--format=csv,noheader"])
    env["nvidia_smi"] = smi
    parts = [p.strip() for p in smi.split(",")] if "," in smi else []
    env["device"] = parts[0] if parts else None
    env["driver"] = parts[1] if len(parts) > 1 else None
    env["ptxas"] = _ptxas_versions()
    env["carried"] = carried_packages(site)
    env["jax_platforms"] = os.environ.get("JAX_PLATFORMS", "")
    return env


def main(argv=None) -> int:
    """Command-line entry point: prints the environment and writes it to --json; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--commit-source", default="unknown")
    parser.add_argument("--tree", default="unknown")
    parser.add_argument("--site", default="", help="the private folder the carried wheels went into")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    env = environment(args.commit, args.commit_source, args.tree, args.site)
    with open(args.json, "w") as f:
        json.dump(env, f, indent=1)
    for key, value in env.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
