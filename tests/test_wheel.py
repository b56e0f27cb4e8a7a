"""The wheel people install: `python -m build` makes an sdist and, from it, a wheel; the wheel installs into a
fresh venv and its `diffswarm` runs from there (`--version`, `--help`, a tiny local generation), not from this
checkout.

Offline: the build runs without isolation (this venv's setuptools), the new venv has no pip of its own (this venv's
pip installs into it with ``--python`` and ``--no-deps``), and torch and the other dependencies come from this venv's
site-packages, made visible to the new one by a ``.pth`` file written after the install (so pip sees a bare venv).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from diffswarm import __version__

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HANG = 600  # seconds: a bound on a hang only


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG, check=False)
    what = f"{' '.join(map(str, cmd))} failed ({r.returncode})"
    assert r.returncode == 0, f"{what}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.skipif(shutil.which("git") is None, reason="the source tree is copied with `git ls-files`")
def test_the_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    pytest.importorskip("build", reason="`build` is in the test extras (scripts/setup.sh installs it)")
    # 1. the tracked files (and this tree's untracked, unignored ones) into a clean folder: no build/ or egg-info here
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)], tmp_path)
    wheels = list((tmp_path / "dist").glob("diffswarm-*.whl"))
    sdists = list((tmp_path / "dist").glob("diffswarm-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list((tmp_path / "dist").iterdir())
    names = zipfile.ZipFile(wheels[0]).namelist()
    for want in ("diffswarm/py.typed", "diffswarm/tui/dashboard.tcss", "diffswarm/api/__init__.py",
                 "diffswarm/cli/__init__.py"):
        assert want in names, f"{want} is not in the wheel"
    assert not any(n.startswith("tests/") for n in names)
    with tarfile.open(sdists[0]) as t:
        assert any(n.endswith("/README.md") for n in t.getnames()) and any(n.endswith("/py.typed")
                                                                           for n in t.getnames())

    # 2. a bare venv; the wheel installed by this venv's pip; then this venv's packages made visible to it
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    py, exe = venv / "bin" / "python", venv / "bin" / "diffswarm"
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", str(wheels[0])], tmp_path)
    site = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    (Path(site) / "dev-site-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    # 3. run it from a folder outside the checkout, with nothing of the checkout on the path
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["DIFFSWARM_CACHE"] = str(tmp_path / "cache")
    where = run([str(py), "-c", "import diffswarm, diffswarm.api; print(diffswarm.__file__)"], cwd, env).stdout
    assert Path(where.strip()).is_relative_to(venv), f"diffswarm imported from {where.strip()}, not the new venv"
    assert run([str(exe), "--version"], cwd, env).stdout.strip() == f"diffswarm {__version__}"
    assert "generate" in run([str(exe), "--help"], cwd, env).stdout
    toy = ("from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm; "
           "make_toy_swarm('toy', ToySwarmSpec(('ddpm', 'fm'), size=8, width=16, depth=1, steps=2))")
    run([str(py), "-c", toy], cwd, env)
    out = run([str(exe), "generate", "--local", "toy/c0-ddpm/expert.safetensors", "toy/c1-fm/expert.safetensors",
               "--router", "toy/router.safetensors", "--n", "2", "--steps", "2", "--output", "g.png"], cwd, env)
    assert "generated 2 images locally" in out.stdout and (cwd / "g.png").stat().st_size > 0
