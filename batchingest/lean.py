"""Packages whose submodules the service imports without the package's own `__init__`.

Some packages' `__init__` imports far more than the service uses: uvicorn's brings its
command line (click, the reloaders with watchfiles and multiprocessing), and
prometheus-client's its HTTP servers and push gateway client (http.server,
urllib.request, wsgiref): about 3 MiB of resident memory, on every process that serves
the API, for nothing. `lazy_package(name)` puts the package into sys.modules without
running its `__init__`, so that `from uvicorn.server import Server` imports just that
submodule (and what it imports; a submodule's `from . import values` too). The first
time a name the package itself defines is asked for (`uvicorn.Config`, `from
prometheus_client import Counter`: anything that is not a submodule), its `__init__`
runs after all, so other code that uses the package the usual way (tests, libraries)
sees no difference. The service's processes set this up (`service_packages`) before
anything imports those packages; elsewhere (tests, operator commands, tasks) they are
imported as usual.

`lazy_module(name)` does the same for a plain module (or a package whose submodules
nobody asks for) that the libraries import only to have it at hand: uvicorn's settings
import logging.config (with logging.handlers, pickle, socketserver, queue) for a log
configuration the service never gives it; Starlette imports http.client for the
reason phrase of an HTTPException without a detail (which ours always have), http.cookies
for cookies the API neither reads nor sets, and html (with its table of 2,000 entities)
for the debug page of its error middleware, which the service does not turn on: about
2 MiB together. The module is put into sys.modules and onto its package, and runs the
first time any of its names is asked for (a `from http import cookies` does not ask for
a name of the module; `http.client.responses` does).

A package or module already imported stays as it is; one that is not installed is left
for the import that follows to report.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Callable

_lock = threading.RLock()


def service_packages() -> None:
    """What `batchingest serve` and its extra API processes use of uvicorn,
    prometheus-client and the standard library modules above, without the rest: called
    before any of them is imported."""
    lazy_package("uvicorn", Config="config", Server="server")
    lazy_package("prometheus_client")
    for name in ("logging.config", "http.client", "http.cookies", "html"):
        lazy_module(name)


def lazy_package(name: str, **names: str) -> None:
    """Let name's submodules be imported without running name's `__init__` (see above).

    names: names the `__init__` takes from a submodule that are cheap to import
    (`Config="config"`: uvicorn.Config is uvicorn.config.Config), for submodules that
    import them from the package.
    """

    def own_name(attr: str) -> object | None:
        if attr in names:
            found: object = getattr(importlib.import_module(f"{name}.{names[attr]}"), attr)
            return found
        submodule = f"{name}.{attr}"
        if submodule in sys.modules or importlib.util.find_spec(submodule) is not None:
            # `from . import values` in a submodule: just that one
            return importlib.import_module(submodule)
        return None

    _put_off(name, own_name, package=True)


def lazy_module(name: str) -> None:
    """Put module `name` in place without running it, until a name of its own is asked
    for (see above)."""
    _put_off(name, lambda attr: None, package=False)


def _put_off(name: str, cheap: Callable[[str], object | None], *, package: bool) -> None:
    """Module `name` in sys.modules (and on its package) with its code not run yet: a
    name asked of it is `cheap(name)` if that gives one, else the code runs, now and
    once, and the name is looked up in what it made."""
    with _lock:
        if name in sys.modules:
            return
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return
        if package and spec.submodule_search_locations is None:
            return
        module = importlib.util.module_from_spec(spec)
        loader = spec.loader

        def __getattr__(attr: str) -> object:  # a module's own, as PEP 562 has it
            found = cheap(attr)
            if found is not None:
                return found
            with _lock:
                if module.__dict__.pop("__getattr__", None) is not None:
                    loader.exec_module(module)  # the module's own code, now and once
            return getattr(module, attr)

        module.__dict__["__getattr__"] = __getattr__
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
