"""The dashboard at /ui: pages, their static files and the JSON they read.

The pages are shells rendered once by Jinja2 and hold no data, so they are served
without a token. The browser keeps the token the operator typed in sessionStorage and
sends it as `X-Api-Token` with every request it makes, to the JSON API and to
/ui/api/... (which the API middleware guards like any other route). No cookie carries
it, so a page on another site can neither send it nor read anything: a cross-site
request carries no credential, and it cannot add a custom header without a CORS
preflight, which the service never answers. The pages forbid inline scripts and any
other origin (Content-Security-Policy), so injected text cannot run and read the token.
"""

from __future__ import annotations

PAGES = frozenset({"/ui", "/ui/", "/ui/login", "/ui/jobs"})


def public(path: str) -> bool:
    """The pages and their static files: they hold no data, and the login page must load
    before there is a token. Everything under /ui/api/ needs the token."""
    if path in PAGES or path.startswith("/ui/static/"):
        return True
    return path.startswith("/ui/jobs/") and "/" not in path[len("/ui/jobs/") :]
