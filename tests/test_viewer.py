"""The forest viewer: one self-contained page per search, checked as HTML and in a real headless Chromium (Debian's
`chromium`, which `make install` installs): every node is in the DOM, a link to a node shows its full text, model
text cannot inject markup, and the screenshot is not blank."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
from PIL import Image, ImageStat

import fot
from fot.forest import Solution, SolveUsage
from fot.trees.base import TreeGraph

EVIL = '<script>alert("x")</script></script><img src=x onerror=alert(1)> & "quotes"'


def big_solution(nodes: int = 150) -> Solution:
    """A math tree of `nodes` answers (binary, so several levels deep), a Game-of-24 tree with a corrected step
    and a branch outside the beam, and a third tree pruned by sparse activation."""
    math = TreeGraph("tree0")
    math.add(text="A problem", kind="problem", q=0.0, visits=0, answer=None, failed=False)
    for i in range(1, nodes):
        text = f"Answer {i}: " + ("step " * 40) + (EVIL if i == 7 else "")
        math.add((i - 1) // 2, text=text, kind="answer", q=float(i % 90), visits=1, answer=str(i), failed=i == 9)
    math.graph.graph["answer_node"] = 20
    game = TreeGraph("tree1")
    game.add(numbers=["4", "6", "1", "10"], exprs=["4", "6", "1", "10"], step="", value=0.0, answer=None, failed=False)
    game.add(0, numbers=["1", "10", "10"], exprs=[], step="4 + 6 = 10 (left: 1 10 10)", value=3.0, answer=None,
             failed=False, corrected_from="4 + 6 = 11 (left: 1 10 11)")  # fmt: skip
    game.add(0, numbers=["4", "6", "11"], exprs=[], step="1 + 10 = 11", value=0.0, answer=None, failed=False,
             pruned=True)  # fmt: skip
    pruned = TreeGraph("tree2")
    pruned.add(text="A problem", kind="problem", q=0.0, visits=0, answer=None, failed=False)
    pruned.graph.graph["pruned_at_step"] = 1
    return Solution(
        problem="A problem " + EVIL, task="math", method="fot", answer="20", votes={"20": 2, EVIL: 1},
        confidence=0.67, decision="majority", tree_answers=["20", None, EVIL],
        trees=[t.to_dict() for t in (math, game, pruned)], usage=SolveUsage(requests=9, generated_tokens=99),
    )  # fmt: skip


def test_the_page_holds_every_node_and_escapes_model_text():
    s = big_solution()
    page = s.to_html()
    assert page.count('class="node') == 150 + 3 + 1
    assert "<script>alert" not in page and "<img src=x" not in page  # model text is data, never markup
    assert page.count("<script") == 2  # the node data and the viewer's own script
    assert "&lt;script&gt;alert" in page and "\\u003cscript\\u003ealert" in page
    assert "http://" not in page and "https://" not in page  # no CDN: the page works offline
    assert page.count('class="node chosen') == len(nx.shortest_path(s.graph(0), 0, 20))  # the path to the answer
    assert "self-corrected" in page and "outside the beam" in page and "pruned by sparse activation" in page
    assert "request failed" in page


def test_the_page_lists_the_repairs_escaped():
    from fot.correction import Repair

    repairs = [Repair(kind="arithmetic", source="3 * 12", claimed="38", actual="36"),
               Repair(kind="code", source=f"print({EVIL!r})", claimed=EVIL, actual="7")]  # fmt: skip
    page = big_solution().model_copy(update={"repairs": repairs}).to_html()
    assert "<h2>Repairs</h2>" in page and "<td>38</td><td>36</td>" in page and "<img src=x" not in page
    assert "Repairs" not in big_solution().to_html()


def test_cot_and_sc_pages_list_the_samples():
    s = big_solution().model_copy(update={"trees": [], "method": "sc", "tree_answers": ["3", "4"]})
    assert "Samples" in s.to_html() and s.to_html().count('class="node') == 0


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("no Chromium here: `make install` installs Debian's chromium package; run it")


def browse(url: str, tmp: Path, *flags: str) -> bytes:
    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp / 'profile'}",
            "--virtual-time-budget=3000", *flags, url]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, timeout=120, cwd=tmp)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout


def screenshot(page: Path, tmp: Path, size: str = "1400,1000", node: str = "") -> Image.Image:
    out = tmp / "shot.png"
    browse(page.as_uri() + (f"#node={node}" if node else ""), tmp, f"--screenshot={out}", f"--window-size={size}")
    image = Image.open(io.BytesIO(out.read_bytes())).convert("RGB")
    stats = ImageStat.Stat(image)
    assert max(stats.stddev) > 20, "the screenshot is blank"  # a blank page is one flat colour
    assert len(image.getcolors(1 << 20) or []) > 50
    return image


def test_chromium_draws_every_node_and_a_link_shows_a_node_in_full(tmp_path):
    s = big_solution()
    page = tmp_path / "forest.html"
    page.write_text(s.to_html())
    dom = browse(page.as_uri() + "#node=s0t0n7", tmp_path, "--dump-dom").decode()
    assert len(re.findall(r'<a class="node[^"]*" data-node="s0t\d+n\d+"', dom)) == 154
    panel = dom[dom.index('<aside id="detail"') :]
    assert "node 7" in panel and "step step" in panel  # the full text, not the preview
    assert "&lt;script&gt;alert" in panel and "<img src" not in dom  # written as text, never parsed
    link = browse(page.as_uri() + "#node=s0t1n1", tmp_path, "--dump-dom").decode()
    panel = link[link.index('<aside id="detail"') :]
    assert "before self-correction" in panel and "4 + 6 = 11 (left: 1 10 11)" in panel
    screenshot(page, tmp_path, "1400,3000")


def test_a_real_forest_in_chromium(tmp_path):
    """The embedded model's forest, as `fot solve --html` writes it. With FOT_SCREENSHOT=PATH the screenshot is
    kept there (the README's is docs/viewer.png, taken this way)."""
    sol = fot.solve(
        "Tom has 3 boxes with 12 apples in each box. He eats 5 apples. How many apples are left?",
        trees=4, config={"mctsr": {"rollouts": 2, "max_tokens": 96}},
    )  # fmt: skip
    page = tmp_path / "forest.html"
    page.write_text(sol.to_html())
    dom = browse(page.as_uri(), tmp_path, "--dump-dom").decode()
    assert len(re.findall(r'class="node[^"]*" data-node=', dom)) == sum(len(t["nodes"]) for t in sol.trees)
    chosen = next((i for i, t in enumerate(sol.trees) if t["graph"].get("answer_node") is not None), 0)
    node = sol.trees[chosen]["graph"].get("answer_node") or 0
    image = screenshot(page, tmp_path, "1400,1200", node=f"s0t{chosen}n{node}")  # its answer's node shown in full
    if os.environ.get("FOT_SCREENSHOT"):
        image.save(os.environ["FOT_SCREENSHOT"])


def test_fot_solve_writes_the_viewer(served_model_dir, tmp_path):
    out = tmp_path / "view.html"
    argv = [sys.executable, "-m", "fot.cli", "solve", "What is 2 + 3?", "4 6 1 10", "--model", str(served_model_dir),
            "--trees", "2", "--rollouts", "1", "--max-tokens", "24", "--html", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert page.count('class="solution"') == 2 and "forest viewer written to" in done.stderr
