"""The ``diffswarm`` command line: one subcommand per step of the path a user walks.

Parsing is only the first half (``diffswarm.cli.parser``): ``dispatch.plan(args, given)`` turns the options
into config objects and refuses, with a message naming the option, every combination in which an option
would have no effect (``given`` holds the options the user actually typed); ``dispatch.run`` executes the
plan. ``tests/test_cli_options.py`` walks every option of every subcommand and checks that it either
changes the plan or is refused.

Every command but ``peer`` (which announces ``offline`` on its own) runs under ``utils.signals.stop_on_signals``:
SIGTERM, SIGHUP and SIGINT stop it in order (its peers, daemons and workers with it) and it exits with 128 +
the signal's number; afterwards ``stop_children`` stops whatever child it left in its session.
"""

from __future__ import annotations

import sys

from diffswarm.cli.parser import build_parser, command_path, given_options


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from diffswarm.cli import dispatch
    from diffswarm.client.config import SwarmClientError
    from diffswarm.dht.node import SwarmNetworkError
    from diffswarm.router.routing import NoExpertsError
    from diffswarm.swarm.local import SwarmLaunchError
    from diffswarm.utils.log import console
    from diffswarm.utils.signals import Stopped, children, stop_children, stop_on_signals

    console()  # the package's log on the terminal, as plain lines (utils/log.py)
    name = command_path(args)
    args.argv = argv[1:] if name == "eval" else argv
    before = children()
    try:
        plan = dispatch.plan(args, given_options(parser, name, argv))
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
        stop_children(before)
