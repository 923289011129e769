"""batchingest: a filesystem-backed batch ingest service."""

# A literal, not importlib.metadata: every built-in task process imports this package,
# and reading the installed metadata costs tens of milliseconds per start.
__version__ = "0.1.0"
