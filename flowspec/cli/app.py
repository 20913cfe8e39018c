"""The typer app shared by all command modules, and the error boundary of every command."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any

import typer
from typer._click.exceptions import BadParameter, ClickException  # typer carries its own copy of click
from typer.core import TyperArgument, TyperCommand, TyperGroup

from flowspec.errors import PEER_STOPPED, Terminated, UserError, job_number, os_error_message


def _usage_name(argument: Any) -> str:
    """An argument as the usage line names it: `SPEC`, `[B]`, `SPEC...` (typer writes `{SPEC}...`)."""
    name = argument.metavar or argument.name.upper()
    return (name if argument.required else f"[{name}]") + ("..." if argument.nargs != 1 else "")


class _Argument(TyperArgument):
    """An argument as the help's Arguments panel shows it: by its name alone, `SPEC...` for several
    (typer writes `SPEC` and a python type beside it: `<list[Path]>`)."""

    @property
    def display_name_raw(self) -> str:
        return super().display_name_raw + ("..." if self.nargs != 1 else "")

    def display_type_rich(self, ctx: Any) -> None:
        return None


def _readable(params: list[Any]) -> list[Any]:
    """`params` as the help should show them: no type for a flag (typer shows `<bool>`, as if it took a
    value, unless the option has a metavar) and arguments as `_Argument`s."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif type(param) is TyperArgument:
            param.__class__ = _Argument  # typer makes the parameters: no subclass can be asked for
    return params


class Command(TyperCommand):
    """A command whose help shows plain argument names and no type for flags."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _readable(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        arguments = [p for p in self.get_params(ctx) if p.param_type_name == "argument"]
        return [*([self.options_metavar] if self.options_metavar else []), *map(_usage_name, arguments)]


#: the commands in the order of the pipeline, as the help lists them
PIPELINE = ("specs", "validate", "show", "inspect", "diff", "train", "ablate", "eval", "sample", "export")


class Group(TyperGroup):
    """The app's group: its commands in pipeline order, and no type shown for its flags either."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _readable(super().get_params(ctx))

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted(super().list_commands(ctx), key=lambda name: (PIPELINE + (name,)).index(name))


class _Typer(typer.Typer):
    """An app whose commands are `Command`s."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return super().command(*args, **{"cls": Command, **kwargs})


app = _Typer(
    cls=Group,
    name="flowspec",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from flowspec import __version__

        print(f"flowspec {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Declarative normalizing-flow image models: specs, validate, show, inspect, diff, train, ablate, eval,
    sample, export; cache (the prepared data)."""


EXIT_USER, EXIT_BUG, EXIT_SIGINT, EXIT_SIGTERM = 2, 1, 130, 143
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run(argv: list[str] | None = None) -> int:
    """Run the app and return its exit code: the error boundary of every command.

    - a `UserError`, an operating-system error on a path (a full disk, a read-only folder) and running
      out of memory print a one-paragraph message on stderr: exit 2, no traceback;
    - usage errors (bad options) keep typer's own message: exit 2;
    - Ctrl-C prints one line: exit 130; SIGTERM likewise: exit 143 (`train` stops after the current step
      and saves, see the trainer);
    - anything else is a bug in flowspec: its traceback, then a line asking to report it: exit 1.

    Under torchrun, the language tools print on rank 0 alone; the other processes check the same and
    report only their errors (each machine of a job may hold a copy of the spec of its own).
    """
    received: list[int] = []
    args = sys.argv[1:] if argv is None else argv
    hidden = _command(args) in LANGUAGE_TOOLS and _lenient("WORLD_SIZE", 1) > 1 and _lenient("RANK", 0) > 0
    if _command(args) in TORCH_COMMANDS and not {"-h", "--help"} & set(args):
        with _signals_held(received):
            _preload()
        if received:
            return _interrupted(received[0])
    try:
        with _signals_raise(received), _output_hidden(hidden):
            result = app(args=argv, prog_name="flowspec", standalone_mode=False)
    except UserError as error:
        return _fail(str(error), error.exit_code)
    except OSError as error:
        if error.filename is None:
            return _bug()
        return _fail(os_error_message(error), EXIT_USER)
    except MemoryError:
        return _fail(OUT_OF_MEMORY, EXIT_USER)
    except ClickException as error:  # usage errors: bad options, missing arguments
        if isinstance(error, BadParameter):  # typer refuses a choice in pydantic's words: "Value error, ..."
            error.message = error.message.removeprefix("Value error, ")
        error.show()
        return error.exit_code
    except (KeyboardInterrupt, typer.Abort) as error:
        if isinstance(error.__cause__, EOFError):  # typer's Abort for an EOFError (a short read), not Ctrl-C
            return _bug()
        received.append(signal.SIGINT)
        result = None
    except Exception as error:
        if _is_out_of_memory(error):
            return _fail(OUT_OF_MEMORY, EXIT_USER)
        if _peer_stopped(error):
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return _fail(f"{PEER_STOPPED}. ({first})", EXIT_USER)
        return _bug()
    if received:  # typer turns Ctrl-C into exit code 130 silently: say what happened
        return _interrupted(received[0])
    return result if isinstance(result, int) else 0


#: the read-only language tools, which only print: under torchrun only rank 0 prints what they show
LANGUAGE_TOOLS = {"validate", "show", "inspect", "diff"}
#: the commands that import torch (validate and show start without it)
TORCH_COMMANDS = {"inspect", "diff", "train", "eval", "sample", "export", "ablate"}


def _command(args: list[str]) -> str | None:
    return next((a for a in args if not a.startswith("-")), None)


def _preload() -> None:
    import torch  # noqa: F401  (numpy with it)


def _interrupted(signum: int) -> int:
    if signum == signal.SIGTERM:
        return _fail("terminated (SIGTERM); files already written are kept", EXIT_SIGTERM)
    return _fail("interrupted (Ctrl-C); files already written are kept", EXIT_SIGINT)


@contextmanager
def _signals_held(received: list[int]) -> Iterator[None]:
    """SIGINT and SIGTERM recorded in `received` but not raised: an interrupt inside torch's or numpy's
    import leaves them half-initialised (odd errors, even an abort), so those imports finish first. A
    second signal ends the process at once (nothing has been written yet)."""

    def hold(signum: int, frame: object) -> None:
        if received:
            os._exit(_interrupted(signum))
        received.append(signum)

    with _handled_by(hold):
        yield


@contextmanager
def _handled_by(handler: Callable[[int, object], None]) -> Iterator[None]:
    """SIGINT and SIGTERM go to `handler` (in the main thread; elsewhere they are left alone)."""
    try:
        previous = {s: signal.signal(s, handler) for s in SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


OUT_OF_MEMORY = (
    "out of memory: the model, batch or data is too large for this machine; lower the batch "
    "(--set train.batch=N) or the model's size (e.g. --set defaults.coupling.filters=N)"
)


def _lenient(name: str, default: int) -> int:
    """`job_number(name, default)`, and `default` for a value that is not a number (an error's report and
    the language tools do not depend on it)."""
    try:
        return job_number(name, default)
    except UserError:
        return default


@contextmanager
def _output_hidden(hidden: bool) -> Iterator[None]:
    """Standard output discarded while `hidden` (errors still go to standard error)."""
    if not hidden:
        yield
        return
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
        yield


def _fail(message: str, code: int) -> int:
    rank = _lenient("RANK", 0)  # under torchrun each process says it: name the others
    print(f"error{f' (rank {rank})' if rank else ''}: {message}", file=sys.stderr)
    return code


def _bug() -> int:
    from flowspec import __version__

    traceback.print_exc()
    print(
        f"this is a bug in flowspec {__version__}, not a mistake of yours: please report it with the "
        f"command line and the traceback above",
        file=sys.stderr,
    )
    return EXIT_BUG


def _peer_stopped(error: Exception) -> bool:
    """Under torchrun, a collective that failed because another process of the job stopped (a gloo
    connection reset, torch's `DistError`s), without importing torch."""
    if _lenient("WORLD_SIZE", 1) < 2:
        return False
    distributed = {"DistError", "DistBackendError", "DistNetworkError"}
    return any(c.__name__ in distributed for c in type(error).__mro__) or "gloo/transport" in str(error)


def _is_out_of_memory(error: Exception) -> bool:
    """torch's `OutOfMemoryError` and CPU allocation failures (`RuntimeError`s), without importing torch."""
    return type(error).__name__ == "OutOfMemoryError" or "DefaultCPUAllocator: can't allocate" in str(error)


@contextmanager
def _signals_raise(received: list[int]) -> Iterator[None]:
    """While a command runs, Ctrl-C raises `KeyboardInterrupt` and SIGTERM `Terminated` (a kind of
    `KeyboardInterrupt`, so the same clean-up runs); `received` records the signal. A command may install
    its own handlers (the trainer does) and restore these."""

    def handle(signum: int, frame: object) -> None:
        received.append(signum)
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    with _handled_by(handle):
        yield


from flowspec.cli import caches, inference, inspecting, language, shipped, training  # noqa: E402, F401  (register the commands)
