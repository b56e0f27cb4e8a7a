"""What the CLI's start and exit skip, and what they must still do (issue 21, time to first image).

- ``generate`` ends its process with ``utils.signals.quick_exit``: the image and the samples are whole on disk
  when the process is gone; exit handlers, threads and buffered output are finished as at a normal exit.
- building the parser imports no evaluation study (``LazyChoices``), and ``eval --studies`` still checks its
  names.
- the swarm client defers ``scipy.optimize`` (``utils.imports.defer_import``), which hivemind imports but
  never uses on the client path; hivemind's averaging, which does use it, still gets it.

Each check runs in a fresh interpreter: what a process imports, and how it ends, is the subject.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_generate_process_has_written_its_image_and_samples_when_it_ends(tmp_path):
    from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

    experts, router = make_toy_swarm(tmp_path, ToySwarmSpec(["ddpm", "fm"], steps=2))
    out, samples = tmp_path / "grid.png", tmp_path / "s.npz"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "diffswarm", "generate", "--local", *map(str, experts), "--router",
                           str(router), "--n", "4", "--steps", "2", "--output", str(out), "--save-samples",
                           str(samples)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generated 4 images" in proc.stdout  # printed output is flushed before the process ends
    with Image.open(out) as im:
        im.verify()  # the whole PNG is there (a truncated file fails here)
    with np.load(samples) as z:
        assert z["samples"].shape == (4, 1, 8, 8) and np.isfinite(z["samples"]).all()


QUICK_EXIT = """
import atexit, sys, threading, time
from pathlib import Path
from diffswarm.utils.signals import quick_exit

d = Path(sys.argv[1])
atexit.register(lambda: (d / "atexit").write_text("ran"))
def late():
    time.sleep(0.3)
    (d / "thread").write_text("finished")
threading.Thread(target=late).start()  # a non-daemon thread: a normal exit waits for it, so does quick_exit
sys.stdout.write("no newline: still in the buffer")
quick_exit(3)
(d / "after").write_text("quick_exit returned")
"""


def test_quick_exit_finishes_threads_exit_handlers_and_output_then_ends(tmp_path):
    proc = _python(QUICK_EXIT, str(tmp_path))
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "no newline: still in the buffer"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "finished"
    assert not (tmp_path / "after").exists()


STUCK = """
import atexit, sys, threading
from pathlib import Path
from diffswarm.utils.signals import quick_exit

d = Path(sys.argv[1])
atexit.register(lambda: (d / "atexit").write_text("ran"))
def stuck_forever():
    threading.Event().wait()
threading.Thread(target=stuck_forever, name="stuck-thread").start()  # non-daemon: a normal exit would hang
print("written before the exit")
quick_exit(7, wait=1.0)
"""


def test_quick_exit_does_not_wait_forever_for_a_stuck_thread_and_names_it(tmp_path):
    proc = _python(STUCK, str(tmp_path))  # a hang fails on the helper's 300 s timeout
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "written before the exit\n"
    assert "stuck-thread" in proc.stderr.splitlines()[0] and "stuck_forever" in proc.stderr, proc.stderr
    assert not (tmp_path / "atexit").exists()  # the exit handlers come after the threads: skipped with them


def test_quick_exit_outside_the_main_thread_returns():
    import threading

    from diffswarm.utils.signals import quick_exit

    returned = []
    t = threading.Thread(target=lambda: returned.append(quick_exit(5) is None))
    t.start()
    t.join()
    assert returned == [True]


def test_building_the_parser_imports_no_study_and_eval_still_checks_study_names():
    code = """
import sys
from diffswarm.cli.parser import build_parser
p = build_parser()
print(sorted(m for m in sys.modules if m.startswith(("diffswarm.eval", "scipy"))))
print(p.parse_args(["eval", "--studies", "routing", "gmm"]).studies)
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "[]"
    assert lines[1] == "['routing', 'gmm']"



def test_eval_refuses_an_unknown_study_naming_the_known_ones(capsys):
    from diffswarm.cli.parser import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["eval", "--studies", "nope"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'nope'" in err and "'routing'" in err


def test_client_defers_scipy_optimize_and_hivemind_averaging_still_gets_it():
    code = """
import sys
import diffswarm.client.client, diffswarm.client.ensemble, diffswarm.api
from diffswarm.utils.imports import DeferredModule
print(type(sys.modules["scipy.optimize"]).__name__, "scipy.linalg" in sys.modules)
from hivemind.averaging.load_balancing import load_balance_peers  # its linprog call needs scipy.optimize
print(sum(load_balance_peers(100, (1.0, 2.0, None))))
import scipy.optimize
print(type(scipy.optimize).__name__, isinstance(sys.modules["scipy.optimize"], DeferredModule),
      callable(scipy.optimize.linprog))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["DeferredModule False", "100", "module False True"]


def test_defer_import_leaves_imported_and_unknown_modules_alone():
    from diffswarm.utils.imports import defer_import

    assert not defer_import("os")  # imported already
    assert not defer_import("diffswarm_no_such_module")
    assert "diffswarm_no_such_module" not in sys.modules


@pytest.mark.parametrize("attr", ["__file__", "__spec__"])
def test_deferred_module_answers_the_attributes_module_walkers_read_without_loading(attr):
    code = f"""
import sys
from diffswarm.utils.imports import defer_import
assert defer_import("json.tool")
m = sys.modules["json.tool"]
getattr(m, {attr!r})
print(type(sys.modules["json.tool"]).__name__)
print(callable(m.main), type(sys.modules["json.tool"]).__name__)
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["DeferredModule", "True module"]


def test_command_line_start_collects_again_once_planned_and_in_process_calls_leave_the_collector_alone(tmp_path):
    code = f"""
import gc, sys
sys.argv = ["diffswarm", "swarm", "down", "--run-dir", {str(tmp_path / "none")!r}]
from diffswarm.cli import main
print(main(), gc.isenabled(), gc.get_freeze_count() > 0)
gc.unfreeze()
gc.disable()
print(main(["swarm", "down", "--run-dir", {str(tmp_path / "none")!r}]), gc.isenabled(), gc.get_freeze_count())
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["2 True True", "2 False 0"]
