"""The ``diffswarm`` command line: one subcommand per step of the path a user walks.

Parsing is only the first half (``diffswarm.cli.parser``): ``dispatch.plan(args, given)`` turns the options
into config objects and refuses, with a message naming the option, every combination in which an option
would have no effect (``given`` holds the options the user actually typed); ``dispatch.run`` executes the
plan. ``tests/test_cli_options.py`` walks every option of every subcommand and checks that it either
changes the plan or is refused.

Every command but ``peer`` (which announces ``offline`` on its own) runs under ``utils.signals.stop_on_signals``:
SIGTERM, SIGHUP and SIGINT stop it in order (its peers, daemons and workers with it) and it exits with 128 +
the signal's number; afterwards ``stop_children`` stops whatever child it left in its session.

Run as the process's command line (``argv`` None: the ``diffswarm`` script, ``python -m diffswarm``), a command
starts with the garbage collector off until it is planned: the imports (torch, hivemind) allocate millions of
objects that live as long as the process, and collecting among them costs ~15% of the import time; then
``gc.freeze()`` keeps them out of every later collection and the collector is back on. The short commands of
``QUICK_EXIT`` end the process with ``utils.signals.quick_exit``: their image or report is written and their
daemon stopped by then, and the interpreter's teardown would add 1-3 s to every call.
"""

from __future__ import annotations

import gc
import sys

from diffswarm.cli.parser import build_parser, command_path, given_options

QUICK_EXIT = frozenset({"generate", "swarm status"})  # commands whose process ends by quick_exit (see above)
_START_GC: list[bool] = []  # whether the collector was on when main turned it off for the start


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: this process's command line) and return its exit status."""
    entry = argv is None
    if entry:
        _START_GC.append(gc.isenabled())
        gc.disable()  # until the command is planned (module docstring); _run turns it back on
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from diffswarm.utils.log import console

    console()  # the package's log on the terminal, as plain lines (utils/log.py)
    name = command_path(args)
    args.argv = argv[1:] if name == "eval" else argv
    code = _run(parser, args, name, argv)
    if entry and name in QUICK_EXIT:
        from diffswarm.utils.signals import quick_exit

        quick_exit(code)
    return code


def _run(parser, args, name: str, argv: list[str]) -> int:
    """Plan and run command ``name``: its exit status, with errors reported as the user should see them."""
    from diffswarm.cli import dispatch
    from diffswarm.client.config import SwarmClientError
    from diffswarm.dht.node import SwarmNetworkError
    from diffswarm.router.routing import NoExpertsError
    from diffswarm.swarm.local import SwarmLaunchError
    from diffswarm.utils.signals import Stopped, children, stop_children, stop_on_signals

    before = children()
    try:
        plan = dispatch.plan(args, given_options(parser, name, argv))
        _collector_on()
        if name == "peer":  # the peer handles SIGTERM/SIGHUP/SIGINT itself (announces offline, stops its daemon)
            return dispatch.run(name, plan) or 0
        with stop_on_signals():
            return dispatch.run(name, plan) or 0
    except Stopped as e:
        print(f"diffswarm {name}: {e}; stopped what it started", file=sys.stderr)
        return e.exit_code
    except (ValueError, FileNotFoundError, NoExpertsError, SwarmClientError, SwarmLaunchError,
            SwarmNetworkError) as e:
        print(f"diffswarm {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _collector_on()  # also when planning failed
        stop_children(before)


def _collector_on() -> None:
    """After the start's imports: keep what they made out of later collections, and collect again (if ``main``
    turned the collector off: only as the process's command line)."""
    if _START_GC and _START_GC.pop():
        gc.freeze()
        gc.enable()
