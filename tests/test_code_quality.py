"""The tree stays clean: ruff passes, imports point one way, and the hivemind internals we rely on still exist."""

from __future__ import annotations

import ast
import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "diffswarm"

# Components from the bottom up. A module may import its own component and components of lower
# ranks only; components of one rank (peer and client) must not import each other.
RANKS = [
    {"diffswarm", "diffswarm.utils"},
    {"diffswarm.data"},
    {"diffswarm.experts"},
    {"diffswarm.sampling"},
    {"diffswarm.router"},
    {"diffswarm.training"},
    {"diffswarm.eval"},
    {"diffswarm.protocol"},
    {"diffswarm.dht"},
    {"diffswarm.peer", "diffswarm.client"},
    {"diffswarm.swarm"},
    {"diffswarm.api"},
    {"diffswarm.tui"},
    {"diffswarm.demo"},
    {"diffswarm.cli"},
    {"diffswarm.__main__", "diffswarm.testing"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every diffswarm module ``path`` imports, at module level or inside functions (lazy imports count)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("diffswarm"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("diffswarm"):
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names
                           if (PKG.parent / (f"{target}.{a.name}".replace(".", "/") + ".py")).exists())
    return out - {mod}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def component(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2])


def rank(comp: str) -> int:
    return next(i for i, r in enumerate(RANKS) if comp in r)


def test_every_component_has_a_rank():
    comps = {component(m) for m in graph()}
    assert not comps - set().union(*RANKS), "give new modules a place in RANKS"


def test_imports_point_down():
    bad = []
    for mod, deps in graph().items():
        c = component(mod)
        for d in deps:
            dc = component(d)
            if dc != c and rank(dc) >= rank(c):
                bad.append(f"{mod} imports {d}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for d in g.get(m, ()):
            if d not in g:
                continue
            if state.get(d) == 1:
                cycle.extend(stack[stack.index(d):] + [d] if d in stack else [m, d])
                return True
            if state.get(d) is None and visit(d, stack + [d]):
                return True
        state[m] = 2
        return False

    for m in sorted(g):
        if state.get(m) is None and visit(m, [m]):
            break
    assert not cycle, " -> ".join(cycle)


def test_the_checker_sees_lazy_relative_imports(tmp_path, monkeypatch):
    """The graph is only worth something if it sees function-level relative imports (how cycles hid before)."""
    assert "diffswarm.demo" in imports_of(PKG / "cli" / "eval_runs.py")  # an absolute import inside a function
    pkg = tmp_path / "diffswarm"
    (pkg / "a").mkdir(parents=True)
    (pkg / "c").mkdir()
    (pkg / "c" / "d.py").write_text("X = 1\n")
    (pkg / "a" / "b.py").write_text("def f():\n    from ..c import d\n    from ..c.d import X\n    return d, X\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    assert imports_of(pkg / "a" / "b.py") == {"diffswarm.c", "diffswarm.c.d"}


@pytest.mark.skipif(shutil.which("ruff", path=str(Path(sys.executable).parent)) is None
                    and shutil.which("ruff") is None, reason="ruff is installed by scripts/setup.sh (test extras)")
def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    r = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# hivemind internals (listed in docs/protocol.md): this fails when an upgrade removes one


def test_hivemind_handle_names_match_the_wire_contract():
    from diffswarm.peer.servicer import ExpertServicer
    from diffswarm.protocol.wire import NAMESPACE, RPCS, SERVICER, handle_name

    assert ExpertServicer.__name__ == SERVICER
    for rpc in RPCS:
        assert hasattr(ExpertServicer, rpc)
        assert ExpertServicer._get_handle_name(NAMESPACE, rpc) == handle_name(rpc)


def test_our_unary_limit_fits_hivemind_s():
    from hivemind.p2p.p2p_daemon_bindings.control import MAX_UNARY_PAYLOAD_SIZE

    from diffswarm.protocol.wire import MAX_UNARY_BYTES

    assert MAX_UNARY_BYTES <= MAX_UNARY_PAYLOAD_SIZE


def test_identity_files_load_through_the_pickle_path(tmp_path):
    """``load_identity`` builds hivemind's RSAPrivateKey via ``__setstate__`` (its unpickling path)."""
    from hivemind.p2p import P2P

    from diffswarm.dht.entries import peer_id_of_public_key
    from diffswarm.dht.node import identity_peer_id, load_identity

    path = tmp_path / "id.key"
    P2P.generate_identity(str(path))
    key = load_identity(path)
    assert key.sign(b"x") and peer_id_of_public_key(key.get_public_key().to_bytes()) == identity_peer_id(path)


def test_p2p_private_attributes_exist():
    """``P2P._client.connect`` (dial a record's addresses) and ``P2P._client_listen_maddr`` (sockets to clean up)."""
    from hivemind.p2p import P2P

    async def go():
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False, auto_nat=False,
                               nat_port_map=False)
        try:
            assert callable(p2p._client.connect)
            assert "unix" in str(p2p._client_listen_maddr)
        finally:
            await p2p.shutdown()

    asyncio.run(go())


def test_the_math_core_imports_without_hivemind():
    """Experts, sampling and the router are usable offline, in a notebook, without the networking stack."""
    code = ("import sys, diffswarm.experts.train, diffswarm.experts.checkpoint, diffswarm.sampling.loop, "
            "diffswarm.router.ensemble, diffswarm.router.local, diffswarm.router.stats.router; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'hivemind'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
