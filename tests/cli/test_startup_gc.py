"""node/_startup.py: the collector is off during start-up and back on, with start-up's
objects frozen, once the command has started. Run in subprocesses: it changes
process-wide state."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_pause_then_resume_freezes_startup_objects() -> None:
    out = _run("import gc; from autoglm.node._startup import pause, resume\n"
               "pause(); off = gc.isenabled(); frozen0 = gc.get_freeze_count()\n"
               "import autoglm.node._store\n"
               "resume(); print(off, gc.isenabled(), frozen0, gc.get_freeze_count() > 10000)")
    assert out == "False True 0 True"


def test_resume_without_pause_leaves_the_collector_alone() -> None:
    # The library API (and the test suite) never paused: resume must not freeze their objects.
    out = _run("import gc; from autoglm.node._startup import resume\n"
               "resume(); print(gc.isenabled(), gc.get_freeze_count())\n"
               "gc.disable(); resume(); print(gc.isenabled())")
    assert out.split() == ["True", "0", "False"]


def test_every_command_but_join_resumes_before_it_runs() -> None:
    # `ls` runs through main() after pause(): the collector is on by the time the command runs.
    out = _run("import gc, sys, io, contextlib, tempfile\n"
               "from autoglm.node._startup import pause\n"
               "from autoglm.node.cli import _fetch_cmds\n"
               "seen = []\n"
               "orig = _fetch_cmds.cmd_ls\n"
               "def spy(args):\n"
               "    seen.append(gc.isenabled()); return orig(args)\n"
               "_fetch_cmds.cmd_ls = spy\n"
               "from autoglm.node.cli._main import main\n"
               "pause()\n"
               "with contextlib.redirect_stdout(io.StringIO()):\n"
               "    rc = main(['--data-dir', tempfile.mkdtemp(), 'ls'])\n"
               "print(rc, seen)")
    assert out == "0 [True]"


def test_httpx_loads_without_its_command_line_client() -> None:
    # py-libp2p imports httpx; its CLI would pull in click, rich.console and pygments (node/_startup.py).
    out = _run("import sys\n"
               "from autoglm.node._startup import skip_unused_imports\n"
               "skip_unused_imports()\n"
               "import httpx\n"
               "print(callable(httpx.Client), callable(httpx.main), 'click' in sys.modules, 'rich.console' in sys.modules, "
               "'pygments' in sys.modules)")
    assert out.split() == ["True", "True", "False", "False", "False"]
