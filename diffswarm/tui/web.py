"""The dashboard in a browser: textual-serve runs the same Textual app, one dashboard process per browser tab.

``diffswarm dashboard --web`` serves a page (xterm.js) whose websocket drives ``diffswarm dashboard`` with the
same options minus the web ones (``dashboard_command``); each tab that connects gets its own process, with its
own swarm client, and the process ends when the tab closes. The page can start generations on this machine,
so the server listens on 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import shlex
import socket
import sys
from collections.abc import Sequence

WEB_FLAGS = {"--web": 0, "--port": 1, "--host": 1}  # the web server's own options, and how many values each takes
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def dashboard_command(argv: Sequence[str]) -> str:
    """The shell command each browser tab runs: this interpreter, ``-m diffswarm`` and ``argv`` (the CLI's
    arguments, from ``dashboard`` on) without ``--web``, ``--port`` and ``--host``; ``exec``, so the dashboard
    replaces textual-serve's shell and gets its pipes and signals itself."""
    out, skip = [], 0
    for tok in argv:
        if skip:
            skip -= 1
            continue
        name = tok.split("=", 1)[0]
        if name in WEB_FLAGS:
            skip = 0 if "=" in tok else WEB_FLAGS[name]
            continue
        out.append(tok)
    return "exec " + shlex.join([sys.executable, "-m", "diffswarm", *out])


def public_url(host: str, port: int) -> str:
    """The URL the page's websocket connects back to: the host itself, or this machine's name when the server
    listens on every interface (a browser elsewhere cannot reach 0.0.0.0)."""
    name = socket.gethostname() if host in WILDCARD_HOSTS else host
    name = f"[{name}]" if ":" in name else name
    return f"http://{name}:{port}"


def serve(command: str, host: str, port: int, title: str = "diffswarm dashboard") -> None:
    """Serve ``command`` (a Textual app) on ``host:port`` until SIGINT/SIGTERM."""
    try:
        from textual_serve.server import Server
    except ImportError:
        raise ValueError("--web needs textual-serve: pip install 'diffswarm[web]' (or textual-serve)") from None
    if host in WILDCARD_HOSTS:
        print("warning: the dashboard listens on every interface: whoever reaches this port can generate "
              "on this machine", file=sys.stderr, flush=True)
    server = Server(command, host=host, port=port, title=title, public_url=public_url(host, port))
    print(f"dashboard at {public_url(host, port)}/ (one dashboard process per browser tab; Ctrl+C stops)",
          flush=True)
    server.serve()
