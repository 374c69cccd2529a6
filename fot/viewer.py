"""The forest viewer: solutions as one self-contained HTML page (inline CSS and script, no CDN: it works offline).

Every tree is drawn as an indented tree, one line per node: a preview of its text, its Q (MCTSr) or value (ToT),
its answer. The path to the tree's answer is highlighted; trees pruned by sparse activation and branches outside
ToT's beam are greyed; self-corrected steps carry a mark, and clicking any node shows its full text, with the text
self-correction replaced beside the one that replaced it (`page.html#node=s0t1n4` opens with that node shown).
Subtrees fold, so trees of hundreds of nodes stay readable.

Model text is untrusted: the page writes it only through `html.escape` and, in the script, `textContent`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

import networkx as nx

PREVIEW = 90  # characters of a node's text on its line

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1d2430; background: #f6f7f9; }
main { display: grid; grid-template-columns: minmax(0, 1fr) 30rem; gap: 1rem; padding: 1rem; }
section.solution, aside { background: #fff; border: 1px solid #d8dde4; border-radius: 8px; padding: 1rem; }
aside { position: sticky; top: 1rem; align-self: start; max-height: calc(100vh - 4rem); overflow: auto; }
h1 { font-size: 1.15rem; margin: 0 0 .5rem; } h2 { font-size: 1rem; margin: 1rem 0 .4rem; }
.answer { font-size: 1.3rem; font-weight: 600; } .muted, .pruned > .line, .pruned-tree { color: #8a93a0; }
table { border-collapse: collapse; margin: .3rem 0; } td, th { padding: 2px 10px 2px 0; text-align: left; }
.bar { display: inline-block; height: .7rem; background: #4c7bd9; border-radius: 2px; vertical-align: middle; }
ul.tree, ul.tree ul { list-style: none; margin: 0; padding-left: 1.1rem; }
ul.tree { padding-left: 0; } ul.tree ul { border-left: 1px solid #c9d0da; }
ul.tree li { position: relative; padding-left: .7rem; }
ul.tree ul > li::before { content: ""; position: absolute; left: 0; top: .75rem; width: .55rem;
  border-top: 1px solid #c9d0da; }
.node { cursor: pointer; white-space: nowrap; display: inline-flex; vertical-align: top; padding: 1px 4px;
  border-radius: 4px; max-width: calc(100% - 1.4rem); color: inherit; text-decoration: none; }
.preview { overflow: hidden; text-overflow: ellipsis; min-width: 3rem; } .metric, .badge { flex: none; }
.node:hover { background: #eef2f8; } .node.selected { outline: 2px solid #4c7bd9; }
.node.chosen { background: #e3f4e6; font-weight: 600; } .node.failed { color: #b3261e; }
.pruned .node, .pruned-tree .node { color: #8a93a0; }
.metric { color: #56606d; font-variant-numeric: tabular-nums; margin-left: .4rem; }
.badge { font-size: .75rem; border-radius: 3px; padding: 0 4px; margin-left: .3rem; background: #fde9c8; }
.badge.ans { background: #dde7fb; } .badge.bad { background: #f9d6d3; }
details > summary { cursor: pointer; list-style: none; white-space: nowrap; }
details > summary::-webkit-details-marker { display: none; }
details > summary::before { content: "\\25be"; color: #8a93a0; margin-right: .2rem; }
details:not([open]) > summary::before { content: "\\25b8"; }
pre { white-space: pre-wrap; word-break: break-word; background: #f3f5f8; padding: .5rem; border-radius: 4px; }
.before { background: #fbeceb; } .after { background: #e8f5ea; }
"""

SCRIPT = r"""
const nodes = JSON.parse(document.getElementById("fot-nodes").textContent);
const panel = document.getElementById("detail");
function show(el) {
  document.querySelectorAll(".node.selected").forEach(n => n.classList.remove("selected"));
  el.classList.add("selected");
  const info = nodes[el.dataset.node];
  panel.replaceChildren();
  const h = document.createElement("h2"); h.textContent = info.title; panel.appendChild(h);
  for (const [name, text, kind] of info.fields) {
    const label = document.createElement("div"); label.className = "muted"; label.textContent = name;
    const body = document.createElement("pre"); body.textContent = text; if (kind) body.className = kind;
    panel.append(label, body);
  }
}
document.querySelectorAll(".node").forEach(el => el.addEventListener("click", e => {
  e.preventDefault(); show(el); history.replaceState(null, "", "#node=" + el.dataset.node);
}));
const linked = /^#node=(\w+)$/.exec(location.hash);  // a link to one node opens with it shown
const target = linked && document.querySelector(`.node[data-node="${linked[1]}"]`);
if (target) { show(target); target.scrollIntoView({block: "center"}); }
"""


def page(solutions: Sequence[dict[str, Any]], title: str = "fot: forest viewer") -> str:
    """The page for one or more solutions, each as `Solution.model_dump()` gives it: the viewer reads data only,
    so it sits below the search and imports nothing of it."""
    details: dict[str, dict] = {}
    body = "\n".join(solution_html(s, k, details) for k, s in enumerate(solutions))
    data = json.dumps(details).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>\n'
        f'<body><main><div>{body}</div><aside id="detail"><p class="muted">Click a node to see its full text.</p>'
        f'</aside></main>\n<script type="application/json" id="fot-nodes">{data}</script>\n'
        f"<script>{SCRIPT}</script></body></html>\n"
    )


def solution_html(s: dict[str, Any], k: int, details: dict[str, dict]) -> str:
    e = html.escape
    total = max(sum(s["votes"].values()), 1)
    votes = "".join(
        f'<tr><td>{e(a)}</td><td>{n}</td><td><span class="bar" style="width:{round(120 * n / total)}px"></span></td>'
        "</tr>"
        for a, n in sorted(s["votes"].items(), key=lambda kv: -kv[1])
    )
    u = s["usage"]
    usage = {
        "requests": u["requests"],
        "prompt tokens": u["prompt_tokens"],
        "generated tokens": u["generated_tokens"],
        "backend calls (batches)": u["backend_calls"],
        "forward passes": u["forward_passes"],
        "drafts accepted": f"{u['accepted_tokens']} / {u['draft_tokens']}",
        "tree-steps skipped (sparse activation)": u["tree_steps_skipped"],
        "tokens saved (estimated)": u["tokens_saved"],
        "self-corrections": u["corrections"],
        "code blocks checked / made-up outputs / repaired": (
            f"{u['code_checks']} / {u['code_failures']} / {u['code_repairs']}"
        ),
        "statements recomputed / wrong / repaired": (
            f"{u['arithmetic_checks']} / {u['arithmetic_failures']} / {u['arithmetic_repairs']}"
        ),
        "seconds": f"{u['seconds']:.2f}",
    }
    rows = "".join(f"<tr><th>{e(name)}</th><td>{e(str(v))}</td></tr>" for name, v in usage.items())
    answer = e(s["answer"]) if s["answer"] is not None else '<span class="muted">no answer</span>'
    samples = ""
    if not s["trees"]:  # cot and sc search no trees: their samples are the answers
        samples = "<h2>Samples' answers</h2><p>" + ", ".join(e(str(a)) for a in s["tree_answers"]) + "</p>"
    if s["repairs"]:  # what the rule checks repaired: the claim and the right value
        samples += (
            '<h2>Repairs</h2><table class="repairs"><tr><th>check</th><th>of</th><th>claimed</th><th>right</th></tr>'
        )
        samples += "".join(
            f"<tr><td>{e(r['kind'])}</td><td><code>{e(' '.join(r['source'].split())[:80])}</code></td>"
            f"<td>{e(r['claimed'])}</td><td>{e(r['actual'])}</td></tr>"
            for r in s["repairs"]
        )
        samples += "</table>"
    trees = "".join(tree_html(s, k, i, details) for i in range(len(s["trees"])))
    return (
        f'<section class="solution" data-solution="{k}"><h1>{e(s["problem"])}</h1>'
        f'<div class="answer">{answer}</div>'
        f'<p class="muted">{e(s["task"])} · {e(s["method"])} · decided by <b>{e(s["decision"])}</b> · confidence '
        f"{s['confidence']:.2f}</p><h2>Votes</h2><table>{votes}</table><h2>Usage</h2><table>{rows}</table>"
        f"{samples}{trees}</section>"
    )


def tree_graph(data: dict[str, Any]) -> nx.DiGraph:
    """A tree of a solution, stored as networkx node-link data (a tree's `to_dict`), as a DiGraph again."""
    return nx.node_link_graph(data, edges="edges")


def tree_html(s: dict[str, Any], k: int, i: int, details: dict[str, dict]) -> str:
    g = tree_graph(s["trees"][i])
    meta = g.graph
    chosen: set[int] = set()
    node = meta.get("answer_node")
    while node is not None:  # the path from the answer up to the root
        chosen.add(node)
        node = next(iter(g.predecessors(node)), None)
    pruned = meta.get("pruned_at_step")
    head = f"tree {i}: answer {html.escape(str(s['tree_answers'][i]))}"
    if pruned is not None:
        head += f" · pruned by sparse activation before step {pruned}"
    roots = [n for n in g.nodes if g.in_degree(n) == 0]
    inner = "".join(node_html(g, n, f"s{k}t{i}", chosen, details) for n in roots)
    cls = "tree-block pruned-tree" if pruned is not None else "tree-block"
    return f'<div class="{cls}" data-tree="{i}"><h2>{head}</h2><ul class="tree">{inner}</ul></div>'


def node_html(g, n: int, prefix: str, chosen: set[int], details: dict[str, dict]) -> str:
    """One node and, folded under it, its subtree (written iteratively: a deep tree must not hit the recursion
    limit)."""
    out: list[str] = []
    stack: list[tuple[int, bool]] = [(n, False)]
    while stack:
        node, closing = stack.pop()
        if closing:
            out.append("</ul></details></li>" if g.out_degree(node) else "</li>")
            continue
        a, key = g.nodes[node], f"{prefix}n{node}"
        details[key] = node_details(a, node)
        classes = ["node"] + ["chosen"] * (node in chosen) + ["failed"] * bool(a.get("failed"))
        line = (
            f'<a class="{" ".join(classes)}" data-node="{key}" href="#"><span class="preview">'
            f"{html.escape(label(a))}</span>{metrics(a)}{badges(a)}</a>"
        )
        li = '<li class="pruned">' if a.get("pruned") else "<li>"
        kids = sorted(g.successors(node))
        if kids:
            out.append(f"{li}<details open><summary>{line}</summary><ul>")
        else:
            out.append(f"{li}{line}")
        stack.append((node, True))
        stack.extend((kid, False) for kid in reversed(kids))
    return "".join(out)


def label(a: dict) -> str:
    if "numbers" in a:  # a Game-of-24 state
        left, step = " ".join(a["numbers"]), a.get("step", "")
        if not step:
            return f"numbers: {left}"
        return step if "left" in step else f"{step}  (left: {left})"
    text = " ".join(str(a.get("text", "")).split())
    return ("problem: " if a.get("kind") == "problem" else "") + (text[:PREVIEW] + "…" if len(text) > PREVIEW else text)


def metrics(a: dict) -> str:
    if "q" in a and a.get("kind") != "problem":
        return f'<span class="metric">Q {a["q"]:.1f} · N {a.get("visits", 0)}</span>'
    if "value" in a and a.get("step"):
        return f'<span class="metric">value {a["value"]:.1f}</span>'
    return ""


def badges(a: dict) -> str:
    out = ""
    if a.get("answer") is not None:
        out += f'<span class="badge ans">= {html.escape(str(a["answer"]))}</span>'
    if "corrected_from" in a:
        out += '<span class="badge">self-corrected</span>'
    if a.get("failed"):
        out += '<span class="badge bad">request failed</span>'
    if a.get("pruned"):
        out += '<span class="badge bad">outside the beam</span>'
    return out


def node_details(a: dict, node: int) -> dict:
    """What the side panel shows for a node: its full text and everything the search recorded about it."""
    fields: list[tuple[str, str, str]] = []
    if "corrected_from" in a:
        fields.append(("before self-correction", str(a["corrected_from"]), "before"))
        fields.append(("after self-correction", str(a.get("step") or a.get("text", "")), "after"))
    elif "numbers" in a:
        fields.append(("step", str(a.get("step") or "(start)"), ""))
    else:
        fields.append(("text", str(a.get("text", "")), ""))
    if "numbers" in a:
        fields.append(("numbers left", " ".join(a["numbers"]), ""))
        fields.append(("expressions", "  ".join(a.get("exprs", [])), ""))
    if a.get("critique"):
        fields.append(("critique it answered", str(a["critique"]), ""))
    extra = {k: a[k] for k in ("answer", "q", "visits", "rewards", "value", "failed", "pruned") if k in a}
    fields.append(("scores", json.dumps(extra), ""))
    return {"title": f"node {node}", "fields": fields}
