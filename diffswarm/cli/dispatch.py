"""The dispatch table: each subcommand path ("generate", "swarm up", ...) -> its plan and its runner.

``plan(args, given)`` turns the parsed options into the config objects the library runs on (no I/O but a
local swarm's ``swarm.json``); ``run(command, plan)`` executes them.
"""

from __future__ import annotations

from collections.abc import Callable

from diffswarm.cli.client_plans import plan_dashboard, plan_export, plan_generate, plan_swarm_status
from diffswarm.cli.client_runs import run_dashboard, run_export, run_generate, run_swarm_status
from diffswarm.cli.eval_plans import plan_demo, plan_eval, plan_prepare, plan_quality
from diffswarm.cli.eval_runs import run_demo, run_eval, run_prepare, run_quality
from diffswarm.cli.join_plans import plan_join
from diffswarm.cli.join_runs import run_join
from diffswarm.cli.parser import command_path
from diffswarm.cli.peer_plans import plan_peer, plan_validate
from diffswarm.cli.serve_runs import run_peer, run_swarm_down, run_swarm_up
from diffswarm.cli.swarm_plans import plan_swarm_down, plan_swarm_up
from diffswarm.cli.train_plans import plan_partition, plan_train, plan_train_router
from diffswarm.cli.train_runs import run_partition, run_train, run_train_router

COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "partition": (plan_partition, run_partition),
    "train": (plan_train, run_train),
    "train-router": (plan_train_router, run_train_router),
    "generate": (plan_generate, run_generate),
    "export": (plan_export, run_export),
    "dashboard": (plan_dashboard, run_dashboard),
    "peer": (plan_peer, run_peer),
    "validate": (plan_validate, run_peer),
    "join": (plan_join, run_join),
    "swarm up": (plan_swarm_up, run_swarm_up),
    "swarm down": (plan_swarm_down, run_swarm_down),
    "swarm status": (plan_swarm_status, run_swarm_status),
    "quality": (plan_quality, run_quality),
    "prepare": (plan_prepare, run_prepare),
    "demo": (plan_demo, run_demo),
    "eval": (plan_eval, run_eval),
}


def plan(args, given: dict[str, str]):
    """The plan of the parsed command ``args``; ``given``: {dest: option string} of the typed options."""
    return COMMANDS[command_path(args)][0](args, given)


def run(command: str, p) -> int:
    """Execute the plan ``p`` of subcommand ``command`` (the I/O half)."""
    return COMMANDS[command][1](p)
