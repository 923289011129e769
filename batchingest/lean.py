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

A package already imported stays as it is; one that is not installed is left for the
import that follows to report.
"""

from __future__ import annotations

import importlib.util
import sys
import threading

_lock = threading.RLock()


def service_packages() -> None:
    """What `batchingest serve` and its extra API processes use of uvicorn and
    prometheus-client, without the rest: called before either is imported."""
    lazy_package("uvicorn", Config="config", Server="server")
    lazy_package("prometheus_client")


def lazy_package(name: str, **names: str) -> None:
    """Let name's submodules be imported without running name's `__init__` (see above).

    names: names the `__init__` takes from a submodule that are cheap to import
    (`Config="config"`: uvicorn.Config is uvicorn.config.Config), for submodules that
    import them from the package.
    """
    with _lock:
        if name in sys.modules:
            return
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            return
        module = importlib.util.module_from_spec(spec)
        loader = spec.loader

        def __getattr__(attr: str) -> object:  # a module's own, as PEP 562 has it
            if attr in names:
                return getattr(importlib.import_module(f"{name}.{names[attr]}"), attr)
            submodule = f"{name}.{attr}"
            if submodule in sys.modules or importlib.util.find_spec(submodule) is not None:
                # `from . import values` in a submodule: just that one
                return importlib.import_module(submodule)
            with _lock:
                if module.__dict__.pop("__getattr__", None) is not None:
                    loader.exec_module(module)  # the package's __init__, now and once
            return getattr(module, attr)

        module.__dict__["__getattr__"] = __getattr__
        sys.modules[name] = module
