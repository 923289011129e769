"""batchingest: a filesystem-backed batch ingest service."""

# A literal, not importlib.metadata: every built-in task process imports this package,
# and reading the installed metadata costs tens of milliseconds per start.
__version__ = "0.1.0"

# uvicorn and prometheus-client: their submodules without their packages' __init__
from batchingest import lean as _lean

_lean.lazy_package("uvicorn", Config="config", Server="server")
_lean.lazy_package("prometheus_client")
