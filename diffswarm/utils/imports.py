"""``defer_import(name)``: a module that a dependency imports but never uses on our path is loaded on first use.

hivemind's package ``__init__`` imports ``hivemind.averaging``, whose ``load_balancing`` imports ``scipy.optimize``
at its top (about a third of hivemind's import time: scipy.optimize brings scipy.linalg, scipy.sparse, ...), for
one ``linprog`` call in averaging, which neither diffswarm nor hivemind's DHT and P2P use. The swarm client defers
it (``diffswarm.client``): ``sys.modules`` holds a stand-in until an attribute of the module is first read (any
attribute but ``__spec__`` and ``__file__``, which the import system and ``inspect`` read of every module), then
the real module is imported and answers; later ``import`` statements get the real module. Nothing of hivemind is
changed, and any code that does use the module gets it, only later (diffusers' UNet, imported when a client
builds its own copy of an expert, imports scipy.stats and with it scipy.optimize: then the cost is paid there).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

_LOCK = threading.Lock()


class DeferredModule(types.ModuleType):
    """Stand-in for a module not imported yet: the first attribute read imports it and is answered by it."""

    def __getattr__(self, attr: str):  # only for what the stand-in lacks: everything but its name and spec
        return getattr(self._real(), attr)

    def _real(self) -> types.ModuleType:
        name = self.__name__
        with _LOCK:
            if sys.modules.get(name) is self:
                del sys.modules[name]
                parent, _, child = name.rpartition(".")
                if parent and getattr(sys.modules.get(parent), child, None) is self:
                    delattr(sys.modules[parent], child)
        return importlib.import_module(name)  # the import system's own locks order concurrent first uses


def defer_import(name: str) -> bool:
    """Let ``name`` (a module not imported yet) load on first use instead of when something imports it. False
    (nothing done) if it is imported already or cannot be found."""
    if name in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec(name)  # imports the parent package (cheap: scipy's own is lazy)
    except (ImportError, ValueError):
        return False
    if spec is None or name in sys.modules:
        return False
    stand_in = DeferredModule(name)
    stand_in.__spec__ = spec  # not initializing: ``import name`` returns the stand-in without loading
    stand_in.__file__ = spec.origin  # what inspect.getmodule reads of every module (torch calls it at import)
    with _LOCK:
        sys.modules.setdefault(name, stand_in)
    return sys.modules[name] is stand_in
