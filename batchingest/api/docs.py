"""`/docs`: the API reference as a page, drawn in the browser from `/openapi.json`.

One self-contained page (its script and style inline, nothing from another host), so
it works offline and behind any proxy. It needs no token, like the document it reads.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>batchingest API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:60rem;padding:1rem 2rem}
h2{border-bottom:1px solid #ccc;margin-top:2rem} code,pre{font:13px ui-monospace,monospace}
details{border:1px solid #ddd;border-radius:4px;margin:.4rem 0;padding:.3rem .6rem}
summary{cursor:pointer} .m{display:inline-block;width:4.5rem;font-weight:bold}
table{border-collapse:collapse} td{border-top:1px solid #eee;padding:.15rem .5rem;vertical-align:top}
pre{background:#f6f6f6;padding:.5rem;overflow:auto}
</style></head><body>
<h1 id="title">batchingest API</h1><p id="intro"></p><div id="api">loading /openapi.json ...</div>
<script>
"use strict";
const el = (tag, text) => { const e = document.createElement(tag); if (text) e.textContent = text; return e; };
function row(table, cells) { const tr = el("tr"); for (const c of cells) tr.append(el("td", c)); table.append(tr); }
function schemaText(s) { return s ? JSON.stringify(s, null, 1) : ""; }
function operation(path, method, op) {
  const d = el("details"), s = el("summary");
  s.append(el("span", method.toUpperCase())); s.firstChild.className = "m";
  s.append(el("code", path), " \\u2014 " + (op.summary || ""));
  d.append(s, el("p", "operationId: " + op.operationId + (op.security && !op.security.length ? " (no token needed)" : "")));
  if (op.parameters) {
    const t = el("table"); row(t, ["parameter", "in", "schema", "description"]);
    for (const p of op.parameters) row(t, [p.name, p.in, schemaText(p.schema), p.description || ""]);
    d.append(t);
  }
  if (op.requestBody) for (const [type, c] of Object.entries(op.requestBody.content || {}))
    d.append(el("p", "body " + type + ": "), el("pre", schemaText(c.schema)));
  const t = el("table"); row(t, ["status", "answer"]);
  for (const [status, r] of Object.entries(op.responses || {})) row(t, [status, r.description || ""]);
  d.append(t);
  return d;
}
fetch("openapi.json").then(r => r.json()).then(spec => {
  document.getElementById("title").textContent = spec.info.title + " " + spec.info.version;
  document.getElementById("intro").textContent = spec.info.description || "";
  const api = document.getElementById("api"); api.textContent = "";
  for (const tag of spec.tags || []) {
    api.append(el("h2", tag.name));
    for (const [path, ops] of Object.entries(spec.paths))
      for (const [method, op] of Object.entries(ops))
        if ((op.tags || []).includes(tag.name)) api.append(operation(path, method, op));
  }
  api.append(el("h2", "documents"));
  for (const [name, s] of Object.entries(spec.components.schemas)) {
    const d = el("details"); d.append(el("summary", name), el("pre", schemaText(s))); api.append(d);
  }
}).catch(e => { document.getElementById("api").textContent = "cannot read /openapi.json: " + e; });
</script></body></html>
"""


async def page(request: Request) -> Response:
    return Response(
        PAGE,
        media_type="text/html",
        headers={
            "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
            "script-src 'unsafe-inline'"
        },
    )
