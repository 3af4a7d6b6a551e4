"""The page skeleton and the HTML building blocks shared by the diagnosis and audit reports.

Design constraints:
    - One self-contained file: CSS, script and images inline, no request to the network (the
      page may be read offline, or attached to a bug report).
    - The script is optional sugar (copy buttons, sortable tables), plain DOM, every handler
      guarded so it never logs a console error; without it the page reads the same.
    - Every user-provided string goes through ``esc``.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from nanscope import __version__

CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#dde1e8;--bg:#fff;--soft:#f5f7fa;--bad:#c62828;--warn:#b26a00;--ok:#2e7d32;--accent:#3949ab}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:1100px;margin:0 auto;padding:24px 28px 60px}
header.top{border-bottom:3px solid var(--bad);padding-bottom:14px;margin-bottom:8px}
header.top.clean{border-color:var(--ok)} header.top.warn{border-color:var(--warn)}
.brand{font-size:13px;color:var(--muted);letter-spacing:.04em}
h1{font-size:22px;margin:6px 0 8px;line-height:1.3}
h2{font-size:17px;margin:30px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:15px;margin:16px 0 6px}
.pill{display:inline-block;padding:2px 10px;border-radius:999px;font-size:13px;font-weight:600;background:var(--bad);color:#fff;margin-right:6px;vertical-align:middle}
.pill.warning,.pill.warn{background:var(--warn)} .pill.clean,.pill.ok{background:var(--ok)} .pill.soft{background:var(--soft);color:var(--fg);border:1px solid var(--line)}
.meta{color:var(--muted);font-size:13px} .meta b{color:var(--fg);font-weight:600}
.explain{background:var(--soft);border-left:4px solid var(--accent);padding:10px 14px;margin:12px 0}
.explain strong{display:block;margin-bottom:2px}
code,pre{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:13px}
code{background:var(--soft);padding:1px 4px;border-radius:3px}
pre.source{background:#fbfbfd;border:1px solid var(--line);border-radius:6px;padding:8px 0;overflow-x:auto;margin:8px 0}
pre.source span.ln{display:inline-block;width:4.5em;text-align:right;padding-right:1em;color:#98a0ad;user-select:none}
pre.source div{padding:0 10px;white-space:pre} pre.source div.hit{background:#ffe3e3;border-left:4px solid var(--bad);font-weight:600}
table{border-collapse:collapse;width:100%;margin:8px 0;font-size:13.5px}
th,td{border-bottom:1px solid var(--line);padding:5px 8px;text-align:left;vertical-align:top}
th{background:var(--soft);font-weight:600} table.sortable th{cursor:pointer;user-select:none} table.sortable th:after{content:" \\2195";color:#aab}
td.num{text-align:right;font-variant-numeric:tabular-nums} tr.bad td,td.bad{background:#ffecec} td.bad{color:var(--bad);font-weight:600}
tr.warning td{background:#fff6e6}
ol.fixes{padding-left:22px} ol.fixes li{margin:6px 0} ol.fixes li:first-child{font-weight:600}
button.copy{font-size:11px;margin-left:4px;padding:0 6px;border:1px solid var(--line);border-radius:4px;background:#fff;cursor:pointer;color:var(--muted)}
.path{display:flex;flex-wrap:wrap;align-items:stretch;gap:0;margin:10px 0}
.path .node{border:1px solid var(--line);border-radius:6px;padding:6px 10px;background:#fff;max-width:300px}
.path .node.origin{border-color:var(--bad);background:#fff3f3} .path .node.end{border-color:#444;background:var(--soft)}
.path .node small{display:block;color:var(--muted);overflow-wrap:anywhere}
.path .arrow{align-self:center;padding:0 8px;color:var(--muted);font-size:18px}
figure.plot{margin:10px 0} figure.plot img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:6px}
figure.plot figcaption,.note{color:var(--muted);font-size:13px}
.samples{display:flex;flex-wrap:wrap;gap:14px}
.sample{border:1px solid var(--line);border-radius:6px;padding:8px;background:#fff;max-width:340px}
.sample .pair{display:flex;gap:8px}
.sample figure{margin:0;text-align:center} .sample figcaption{font-size:12px;color:var(--muted);max-width:180px}
.sample img.thumb{width:144px;height:auto;image-rendering:pixelated;border:1px solid #ccd}
.sample .title{font-size:13px;font-weight:600;margin-bottom:6px}
.tokens{font-family:ui-monospace,monospace;font-size:12px;display:flex;flex-wrap:wrap;gap:3px}
.tokens span{border:1px solid var(--line);padding:1px 4px;border-radius:3px} .tokens span sub{color:#98a0ad}
.tokens span.bad{background:#ffecec;border-color:var(--bad)}
ul.evidence li{margin:3px 0}
details{margin:10px 0} summary{cursor:pointer;color:var(--accent)}
.legend span{display:inline-block;width:12px;height:12px;vertical-align:middle;margin:0 4px 0 10px;border:1px solid #999}
footer{margin-top:40px;color:var(--muted);font-size:12px;border-top:1px solid var(--line);padding-top:8px}
.strip{height:12px;width:100%;max-width:520px;image-rendering:pixelated;border:1px solid #ccd;display:block}
"""

# Plain DOM, guarded: a missing clipboard (file:// pages, old browsers) falls back to selecting
# the text; nothing here can throw into the console.
SCRIPT = """
(function(){
  function selectText(el){try{var r=document.createRange();r.selectNodeContents(el);var s=window.getSelection();s.removeAllRanges();s.addRange(r);}catch(e){}}
  function copy(btn){
    var el=btn.previousElementSibling; if(!el){return;}
    var text=el.textContent||"";
    function done(ok){btn.textContent=ok?"copied":"selected"; setTimeout(function(){btn.textContent="copy";},1200);}
    try{
      if(navigator.clipboard&&window.isSecureContext){navigator.clipboard.writeText(text).then(function(){done(true);},function(){selectText(el);done(false);});}
      else{selectText(el);done(false);}
    }catch(e){selectText(el);done(false);}
  }
  function cellValue(td){var v=td.getAttribute("data-v"); if(v===null){v=td.textContent||"";} var n=parseFloat(v); return (v!==""&&!isNaN(n)&&isFinite(v))?n:v.toLowerCase();}
  function sortBy(table,col,th){
    var body=table.tBodies[0]; if(!body){return;}
    var asc=th.getAttribute("data-dir")!=="asc";
    var ths=table.tHead?table.tHead.rows[0].cells:[]; for(var i=0;i<ths.length;i++){ths[i].removeAttribute("data-dir");}
    th.setAttribute("data-dir",asc?"asc":"desc");
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=cellValue(a.cells[col]),y=cellValue(b.cells[col]); if(typeof x!==typeof y){x=String(x);y=String(y);} return (x<y?-1:x>y?1:0)*(asc?1:-1);});
    rows.forEach(function(r){body.appendChild(r);});
  }
  document.addEventListener("click",function(ev){
    var t=ev.target; if(!t||!t.closest){return;}
    var btn=t.closest("button.copy"); if(btn){copy(btn);return;}
    var th=t.closest("table.sortable th");
    if(th){var table=th.closest("table"); sortBy(table,th.cellIndex,th);}
  });
})();
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


_CODE = re.compile(r"`([^`]+)`")


def rich_text(text: str, *, copy: bool = True) -> str:
    """Escape ``text``, turning `backticked` spans into code with a copy button."""
    out, pos = [], 0
    for m in _CODE.finditer(text):
        out.append(esc(text[pos : m.start()]))
        out.append(
            f"<code>{esc(m.group(1))}</code>"
            + ('<button class="copy" type="button">copy</button>' if copy else "")
        )
        pos = m.end()
    out.append(esc(text[pos:]))
    return "".join(out)


def pill(text: str, kind: str = "") -> str:
    return f'<span class="pill {esc(kind)}">{esc(text)}</span>'


def section(title: str, body: str, *, id: str) -> str:
    return f'<section id="{esc(id)}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def plot(uri: str | None, caption: str, *, id: str) -> str:
    if not uri:
        return ""
    return (
        f'<figure class="plot" id="{esc(id)}"><img src="{uri}" alt="{esc(caption)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def table(
    headers: Sequence[str] | None,
    rows: Iterable[Sequence[Any]],
    *,
    sortable: bool = False,
    id: str | None = None,
    row_class: Sequence[str] | None = None,
    bad_cells: set[tuple[int, int]] | None = None,
) -> str:
    """A table; numbers are right-aligned and sort numerically (``data-v``)."""
    rows = [list(r) for r in rows]
    cls = ' class="sortable"' if sortable else ""
    ident = f' id="{esc(id)}"' if id else ""
    head = (
        "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead>"
        if headers
        else ""
    )
    body = []
    for i, r in enumerate(rows):
        tr_cls = f' class="{esc(row_class[i])}"' if row_class and row_class[i] else ""
        cells = []
        for j, v in enumerate(r):
            classes = []
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                classes.append("num")
                shown = fmt_num(v)
                attr = f' data-v="{esc(v)}"'
            else:
                shown, attr = (v.html if isinstance(v, Raw) else esc(v)), ""
            if bad_cells and (i, j) in bad_cells:
                classes.append("bad")
            c = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{c}{attr}>{shown}</td>")
        body.append(f"<tr{tr_cls}>{''.join(cells)}</tr>")
    return f"<table{cls}{ident}>{head}<tbody>{''.join(body)}</tbody></table>"


class Raw:
    """Already-escaped HTML for a table cell."""

    def __init__(self, html_text: str) -> None:
        self.html = html_text

    def __str__(self) -> str:
        return self.html


def fmt_num(v: float | int) -> str:
    from nanscope.core.summary import fmt

    if isinstance(v, int):
        return f"{v:,}"
    return fmt(v)


def document(title: str, body: str, *, data: dict | None = None) -> str:
    """The whole page. ``data`` (the JSON the page was made from) rides along, inert, for tools."""
    embedded = ""
    if data is not None:
        # "</" would end the script element early: escape it (JSON reads "\\/" as "/").
        text = json.dumps(data, default=str).replace("</", "<\\/")
        embedded = f'<script type="application/json" id="nanscope-data">{text}</script>'
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="generator" content="nanscope ' + esc(__version__) + '">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body><main>\n{body}\n"
        f"<footer>written by nanscope {esc(__version__)}: the text output and the JSON are the contract; "
        "this page is for looking. Everything on it is inline: it works offline.</footer>\n"
        f"</main>{embedded}<script>{SCRIPT}</script></body></html>\n"
    )
