"""Every option of every subcommand either changes what happens or is refused with a message naming it.

The walk is mechanical: for each subcommand, a few base command lines (its modes: local vs swarm,
training vs serving, each routing strategy, ...); for each option of the subcommand, the base plus that
option with a non-default value is planned (``diffswarm.cli.dispatch.plan``: options -> config objects, no I/O but
a local swarm's swarm.json). The option must change the plan or be refused (argparse error or
``ValueError``) with a message that names it, in every base; and change the plan in at least one.
"""

from __future__ import annotations

import argparse
import json

import pytest

from diffswarm.cli import dispatch
from diffswarm.cli.parser import build_parser, command_path, given_options, subparsers

MADDR = "/ip4/127.0.0.1/tcp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
MADDR2 = "/ip4/127.0.0.1/tcp/4002/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
FOO = "foo@" + "3f9a" * 8  # full swarm names: NAME@FINGERPRINT (32 hex digits)
BAR = "bar@" + "c0de" * 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("opts")
    for name, swarm in (("run", FOO), ("run2", BAR)):
        (d / name).mkdir()
        (d / name / "swarm.json").write_text(json.dumps({"swarm": swarm, "initial_peers": [MADDR], "procs": []}))
    from diffswarm.training.jobs import TrainJob

    TrainJob(str(d / "p.json"), 1, str(d / "out")).save(d / "job.json")
    TrainJob(str(d / "p.json"), 2, str(d / "out2"), objective="ddpm").save(d / "job2.json")
    return d


def bases(f) -> dict[str, list[list[str]]]:
    run, p = str(f / "run"), str(f / "p.json")
    folder = ["--dataset", "folder", "--data-root", str(f / "images")]
    train = ["--partition", p, "--cluster", "0", "--out", str(f / "o")]
    local = ["--local", "a.safetensors"]
    remote = ["--initial-peers", MADDR, "--swarm", FOO]
    train0 = ["--partition", p, "--cluster", "0"]
    return {
        "partition": [[], folder],
        "train": [train, [*train, "--objective", "ddpm"]],
        "train-router": [["--partition", p]],
        "generate": [local, [*local, "b.safetensors", "--router", "r.safetensors"], [*local, "--routing", "threshold"],
                     [*local, "--routing", "sample-k"], [*local, "--routing", "full"], ["--run-dir", run], remote,
                     [*remote, "--loopback"]],
        "export": [["o", "--run", str(f / "r")], ["o", "--run-dir", run], ["o", *remote],
                   ["o", "--run", "r", "--routing", "threshold"], ["o", "--run", "r", "--routing", "sample-k"]],
        "dashboard": [["--run-dir", run], remote, [*remote, "--loopback"], [*remote, "--web"]],
        "peer": [[], ["--checkpoint", "c.safetensors", "--swarm", FOO], [*train0, "--swarm", FOO],
                 [*train0, "--objective", "ddpm", "--swarm", FOO], ["--train-job", str(f / "job.json"), "--swarm", FOO],
                 ["--metrics-port", "9100"],
                 ["--loopback"], ["--identity", str(f / "id.key")], ["--router", "r.safetensors"],
                 ["--router", "r.safetensors", "--validate", p]],
        "validate": [["--swarm", FOO, "--partition", p], ["--swarm", FOO, "--partition", p, "--loopback"],
                     ["--swarm", FOO, "--partition", p, "--identity", str(f / "id.key")]],
        "join": [remote, [*remote, "--loopback"], [*remote, "--identity", str(f / "id.key")]],
        "swarm up": [[], ["--checkpoints", "a.safetensors"], ["--partition", p], folder],
        "swarm down": [[]],
        "swarm status": [["--run-dir", run], remote, [*remote, "--loopback"]],
        "quality": [["s.npz"], ["s.npz", "--partition", p], ["s.npz", *folder]],
        "prepare": [[], folder],
        "demo": [[], folder],
        "eval": [["--out", str(f / "ev")], ["--quick"], ["--studies", "gmm"]],
    }


def sample_values(f) -> dict[str, list[str]]:
    """Values for options whose generic sample would be meaningless."""
    return {"initial_peers": [MADDR2], "run_dir": [str(f / "run2")], "train_job": [str(f / "job2.json")],
            "classes": ["3"], "announce_maddrs": ["/ip4/1.2.3.4/tcp/31337"], "dataset": ["digits"], "swarm": [BAR],
            "samples": ["64"], "validators": ["ab" * 16]}


def option_argv(action: argparse.Action, special: dict[str, list[str]], base: list[str]) -> list[str]:
    """The option with a value that is neither its default nor what ``base`` gives it."""
    flag = action.option_strings[-1]
    if action.nargs == 0:  # store_true
        return [flag]
    if action.dest in special:
        return [flag, *special[action.dest]]
    if action.choices:
        others = [str(c) for c in action.choices if str(c) not in base]
        return [flag, ([c for c in others if c != action.default] or others)[-1]]
    if action.type is int:
        return [flag, str((action.default or 0) + 3)]
    if action.type is float:
        return [flag, str((action.default or 0) + 0.25)]
    return [flag, "X"]


def without(argv: list[str], flags) -> list[str]:
    """``argv`` minus the option ``flags`` and the values that follow it."""
    out, skipping = [], False
    for tok in argv:
        if tok in flags:
            skipping = True
        elif skipping and tok.startswith("--"):
            skipping = False
        if not skipping:
            out.append(tok)
    return out


def plan_of(argv: list[str], capsys):
    """('plan', plan) or ('refused', message)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        return "refused", capsys.readouterr().err
    try:
        return "plan", dispatch.plan(args, given_options(parser, command_path(args), argv))
    except ValueError as e:
        return "refused", str(e)


def options_of(path: str) -> list[argparse.Action]:
    p = subparsers(build_parser())[path]
    return [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("path", list(bases(__import__("pathlib").Path("/x"))))
def test_every_option_changes_the_plan_or_is_refused(path, files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    special = sample_values(files)
    changed_somewhere: set[str] = set()
    problems = []
    for base in bases(files)[path]:
        kind, plan0 = plan_of(path.split() + base, capsys)
        assert kind == "plan", f"base {base} of `{path}` is itself refused: {plan0}"
        for action in options_of(path):
            extra = option_argv(action, special, base)
            if any(s in base for s in action.option_strings):
                if action.nargs == 0:
                    continue  # a flag the base sets already
                argv = without(base, action.option_strings) + extra  # the same option, another value
            else:
                argv = base + extra
            kind, result = plan_of(path.split() + argv, capsys)
            if kind == "refused":
                if not any(s in result for s in action.option_strings):
                    problems.append(f"{' '.join(argv)}: refused without naming {extra[0]}: {result}")
            elif result == plan0:
                problems.append(f"{' '.join(argv)}: {extra[0]} changes nothing")
            else:
                changed_somewhere.add(action.dest)
    never = [a.option_strings[-1] for a in options_of(path) if a.dest not in changed_somewhere]
    assert not problems, "\n".join(problems)
    assert not never, f"options of `{path}` that change nothing in any mode: {never}"


def test_the_walk_covers_every_subcommand():
    assert set(subparsers(build_parser())) == set(bases(__import__("pathlib").Path("/x")))


def test_refusals_explain_themselves(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    kind, msg = plan_of(["generate", "--local", "a", "--timeout", "3"], capsys)
    assert kind == "refused" and "--timeout has no effect with --local" in msg
    kind, msg = plan_of(["peer", "--checkpoint", "c", "--cluster", "1"], capsys)
    assert kind == "refused" and "--cluster has no effect with --checkpoint" in msg
    kind, msg = plan_of(["swarm", "up", "--checkpoints", "a", "--experts", "3", "--net", "mlp"], capsys)
    assert kind == "refused" and "--experts, --net have no effect with --checkpoints" in msg
    kind, msg = plan_of(["quality", "s.npz", "--partition", "p.json", "--size", "16"], capsys)
    assert kind == "refused" and "--size has no effect with --partition" in msg


def test_a_local_swarm_is_found_by_its_own_name(files, capsys):
    """`swarm up --swarm foo` then `generate`/`dashboard` without flags: the client looks under 'foo'."""
    run = str(files / "run")
    for cmd in (["generate"], ["dashboard"], ["swarm", "status"]):
        kind, p = plan_of([*cmd, "--run-dir", run], capsys)
        assert kind == "plan"
        src = p.swarm
        assert src.config.swarm == FOO and src.initial_peers == (MADDR,)
        assert src.config.net.host_maddrs == ["/ip4/127.0.0.1/tcp/0"] and src.config.net.client_mode
    kind, msg = plan_of(["generate", "--run-dir", run, "--swarm", BAR], capsys)
    assert kind == "refused" and f"is '{FOO}'" in msg
    kind, p = plan_of(["generate", "--run-dir", run, "--swarm", FOO.upper().replace("FOO", "foo")], capsys)
    assert kind == "plan" and p.swarm.config.swarm == FOO  # the fingerprint is case-insensitive
    # planning does not change the parsed options behind the caller's back (it used to flip args.loopback)
    args = build_parser().parse_args(["generate", "--run-dir", run])
    dispatch.plan(args, {})
    assert args.loopback is False


def test_shared_training_options_build_the_same_job(files, capsys):
    """`train` and `peer --cluster` read the same options into the same TrainJob."""
    common = ["--partition", "p.json", "--cluster", "2", "--objective", "ddpm", "--schedule", "linear",
              "--unconditional", "--ckpt-every", "7", "--minutes", "2.5", "--out", "o"]
    _, train = plan_of(["train", *common, "--resume"], capsys)
    _, peer = plan_of(["peer", *common, "--swarm", FOO], capsys)
    job = peer.config.train
    assert job.schedule == "linear" and job.unconditional and job.train.ckpt_every == 7 and job.train.minutes == 2.5
    assert job.train.resume and train.train.resume  # a peer always resumes its own folder
    assert (job.partition, job.cluster, job.objective, job.out) == (train.partition, train.cluster, train.objective,
                                                                    train.out)


def test_swarm_names_need_the_owner_fingerprint(files, capsys):
    """Clients and joining peers name a swarm NAME@FINGERPRINT; a bare name is refused with how to get the full
    one. Only a founding peer (with --router) or `swarm up` takes a bare NAME."""
    for argv in (["generate", "--initial-peers", MADDR, "--swarm", "foo"],
                 ["swarm", "status", "--initial-peers", MADDR, "--swarm", "foo@3f9a"],
                 ["peer", "--checkpoint", "c.safetensors", "--swarm", "foo"]):
        kind, msg = plan_of(argv, capsys)
        assert kind == "refused" and "--swarm" in msg and "NAME@FINGERPRINT" in msg, (argv, msg)
    kind, msg = plan_of(["generate", "--initial-peers", MADDR], capsys)
    assert kind == "refused" and "needs --swarm NAME@FINGERPRINT" in msg and "swarm up" in msg
    kind, msg = plan_of(["peer", "--checkpoint", "c.safetensors"], capsys)
    assert kind == "refused" and "needs --swarm NAME@FINGERPRINT" in msg
    kind, p = plan_of(["peer", "--router", "r.safetensors", "--swarm", "fashion", "--owner-key", "o.key"], capsys)
    assert kind == "plan" and (p.config.swarm, p.config.owner_key) == ("fashion", "o.key")
    kind, msg = plan_of(["peer", "--router", "r.safetensors", "--swarm", "bad name"], capsys)
    assert kind == "refused" and "--swarm" in msg
    kind, p = plan_of(["swarm", "up", "--swarm", "fashion"], capsys)
    assert kind == "plan" and p.swarm == "fashion" and p.owner_key is None
    kind, msg = plan_of(["peer", "--announce-period", "900"], capsys)
    assert kind == "refused" and "--announce-period" in msg
    old = files / "old"
    old.mkdir(exist_ok=True)
    (old / "swarm.json").write_text(json.dumps({"swarm": "diffswarm", "initial_peers": [MADDR], "procs": []}))
    kind, msg = plan_of(["generate", "--run-dir", str(old)], capsys)
    assert kind == "refused" and "older diffswarm" in msg
