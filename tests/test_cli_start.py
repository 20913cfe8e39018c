"""The command line's start: importing `flowspec` (or the console script's `flowspec.cli`) imports no
dependency, and a Ctrl-C while the commands are imported is one line and exit 130, not a traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from conftest import ROOT, SPECS

import flowspec

HEAVY = ("pydantic", "lark", "typer", "rich", "torch", "numpy")


def test_importing_the_package_and_its_entry_point_imports_no_dependency():
    code = "import sys, flowspec, flowspec.cli; print(*{m.split('.')[0] for m in sys.modules})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert not set(HEAVY) & set(done.stdout.split())


def test_flowspec_errors_is_there_after_import_flowspec():
    code = (
        "import sys, flowspec; "
        "print(flowspec.errors.RunStopped.__name__, *{m.split('.')[0] for m in sys.modules})"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.split()[0] == "RunStopped" and not set(HEAVY) & set(done.stdout.split())


def test_the_public_names_are_imported_when_used():
    assert set(flowspec.__all__) <= set(dir(flowspec))
    spec = flowspec.load_spec(SPECS / "quickstart.flow")
    assert isinstance(spec, flowspec.FlowSpec) and isinstance(
        flowspec.build(spec, "meta"), flowspec.FlowModel
    )
    assert callable(flowspec.train) and issubclass(flowspec.UserError, Exception)
    assert flowspec.parse_spec and flowspec.load
    from flowspec import FlowSpec, train  # noqa: F401


def _interrupted_after(delay: float) -> subprocess.CompletedProcess[str]:
    """The console script's code, interrupted `delay` seconds after it starts importing flowspec."""
    code = (
        "import sys; print('go', flush=True)\n"
        "from flowspec.cli import main\n"
        f"sys.exit(main(['inspect', {str(SPECS / 'quickstart.flow')!r}]))\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout and child.stdout.readline() == "go\n"
    time.sleep(delay)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def test_ctrl_c_while_the_commands_are_imported_is_one_line():
    """The imports before the command runs take a few tenths of a second (torch's after them, with
    signals held, see app.py); a signal in them is one line. Each delay gets three tries: on a busy
    machine a signal can land in the few milliseconds before the entry point is called."""
    for delay in (0.02, 0.05, 0.1):
        for _ in range(3):
            done = _interrupted_after(delay)
            if done.returncode == 130 and "Traceback" not in done.stderr:
                break
        assert done.returncode == 130 and "Traceback" not in done.stderr, f"delay {delay}:\n{done.stderr}"
        assert done.stderr.startswith("error: interrupted (Ctrl-C)") and done.stderr.count("\n") == 1


def _entry_point(before: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """The console script's code, with `before` run first (a signal made to arrive at a chosen moment)."""
    code = f"import os, signal, sys\n{before}\nfrom flowspec.cli import main\nsys.exit(main({args!r}))\n"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_sigterm_while_the_commands_are_imported_is_one_line_and_exit_143():
    """Without a handler before `run` installs its own, SIGTERM ended the process silently (by the signal)."""
    sent_on_import = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def importing(name, *args, **kwargs):\n"
        "    if name == 'flowspec.cli.app':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = importing\n"
    )
    done = _entry_point(sent_on_import, ["validate", str(SPECS / "quickstart.flow")])
    assert done.returncode == 143, done.stderr
    assert done.stderr == "error: terminated (SIGTERM); files already written are kept\n"


def test_a_signal_after_the_command_is_done_leaves_its_exit_code_and_output():
    """While the interpreter exits (torch's exit handlers take tenths of a second), SIGINT and SIGTERM
    printed a traceback from an exit handler, or ended the process by the signal. An exit handler
    registered before `flowspec.cli` was imported runs after its last one: the signals are ignored then."""
    at_exit = (
        "import atexit, time\n"
        "def signalled():\n"
        "    for signum in (signal.SIGINT, signal.SIGTERM):\n"
        "        os.kill(os.getpid(), signum)\n"
        "    time.sleep(0.1)\n"
        "atexit.register(signalled)\n"
    )
    done = _entry_point(at_exit, ["validate", str(SPECS / "quickstart.flow")])
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("ok: ")


def test_a_signal_stops_an_exit_that_hangs_with_the_commands_exit_code_and_output():
    """A streaming data worker stuck in a read (a stalled network filesystem) held the exit, which joins
    the workers (and they ignore SIGTERM, as the main process handles stop signals): with SIGINT and
    SIGTERM ignored until the process ended, only SIGKILL stopped it. Here a worker that stays until its
    parent is gone stands for it."""
    code = (
        "import atexit, multiprocessing, os, signal, sys, time\n"
        "from flowspec.cli import main\n"
        "def stuck(parent):\n"
        "    for signum in (signal.SIGINT, signal.SIGTERM):\n"
        "        signal.signal(signum, signal.SIG_IGN)\n"
        "    null = os.open(os.devnull, os.O_WRONLY)\n"
        "    os.dup2(null, 1)\n"
        "    os.dup2(null, 2)\n"
        "    while os.getppid() == parent:\n"
        "        time.sleep(0.05)\n"
        "context = multiprocessing.get_context('fork')\n"
        "context.Process(target=stuck, args=(os.getpid(),), daemon=True).start()\n"
        "atexit.register(os.write, 2, b'exiting\\n')  # runs before multiprocessing joins the worker\n"
        f"sys.exit(main(['validate', {str(SPECS / 'quickstart.flow')!r}]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr.readline() == "exiting\n"  # the command is done; its exit handlers run
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()  # (the worker leaves with it)
    assert (proc.returncode, stderr) == (0, "")
    assert stdout.startswith("ok: ")  # the output still buffered is written


def test_the_entry_point_runs_in_a_thread_other_than_the_main_one():
    """Only the main thread may set signal handlers: elsewhere they are left alone, not a ValueError."""
    code = (
        "import sys, threading\n"
        "from flowspec.cli import main\n"
        "codes = []\n"
        "def entry():\n"
        "    try:\n"
        f"        main(['validate', {str(SPECS / 'quickstart.flow')!r}])\n"
        "    except SystemExit as done:\n"
        "        codes.append(done.code)\n"
        "thread = threading.Thread(target=entry)\n"
        "thread.start(); thread.join()\n"
        "sys.exit(codes == [0] and 7)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 7 and "Traceback" not in done.stderr, done.stderr
