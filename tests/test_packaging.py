"""The built wheel, installed into a fresh virtual environment, works on its own.

An editable install can hide packaging mistakes (a module that is importable
from the source tree but missing from the wheel), so this builds the wheel,
installs it with `--no-deps` into a new venv, and imports it from outside the
source tree. The third-party dependencies come from the test environment's
site-packages through PYTHONPATH; `.pth` files (and so the editable install)
are not processed there, so `ddf_jax` can only come from the wheel.
"""

import os
import pathlib
import subprocess
import sys
import sysconfig
import venv
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (path,) = out.glob("ddf_jax-*.whl")
    return path


def test_wheel_ships_kernels_inside_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "ddf_jax/kernels/__init__.py" in names
    assert "ddf_jax/kernels/xla.py" in names
    assert "ddf_jax/kernels/tuning_table.json" in names, "the tuning table is package data"
    assert not any(n.startswith("kernels/") for n in names), "a top-level 'kernels' package would clash on PyPI"
    assert not any(n.startswith(("tests/", "experiments/")) for n in names)


@pytest.mark.slow
def test_wheel_works_in_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    script = (
        "import pathlib, importlib.util, ddf_jax, jax.numpy as jnp\n"
        "import ddf_jax.kernels as k\n"
        f"assert pathlib.Path(k.__file__).is_relative_to({str(env_dir)!r}), k.__file__\n"
        "assert importlib.util.find_spec('kernels') is None\n"
        "x = jnp.ones((1, 5, 5, 2)); cf = jnp.ones((1, 2, 9)); sf = jnp.ones((1, 5, 5, 9))\n"
        "out = ddf_jax.ddf(x, cf, sf, kernel_size=3)\n"
        "assert float(out[0, 2, 2, 0]) == 9.0, out\n"
        "print('ok', k.__file__)\n"
    )
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"], PYTHONNOUSERSITE="1")
    result = subprocess.run([python, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
