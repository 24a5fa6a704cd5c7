"""The diff page opened in a real headless browser (Debian's `chromium`): rendered DOM and a screenshot.

Without chromium these tests skip on a workstation and fail in CI (CI=true), where `.ci/run`
installs it: a skipped browser test there would hide a broken page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from conftest import LIGHT, MODELS

import onnxmorph
from onnxmorph.cli import main
from onnxmorph.diff import diff

CIFAR = MODELS / "cifar10_quick.onnx"
CHILDREN = {
    "deepen": ("deepen", {"layer": "conv2"}),
    "widen": ("widen", {"layer": "conv2", "width": 48}),
    "subnet": ("subnet", {"layer": "conv2", "kind": "parallel", "kernels": "1,3,5"}),
}


@pytest.fixture(scope="module")
def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "Debian's chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must run the browser tests (.ci/run installs it)")
        # Outside CI (a developer without the browser) the page tests skip; in CI they fail above.
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """{morph: (child, page)}: each child of cifar10_quick and its page, written by `onnxmorph diff --html`."""
    folder = tmp_path_factory.mktemp("pages")
    out = {}
    for key, (name, params) in CHILDREN.items():
        child, _ = onnxmorph.morph(CIFAR, name, **params)
        path = onnxmorph.save(child, folder / f"{key}.onnx")
        page = folder / f"{key}.html"
        assert main(["diff", str(CIFAR), str(path), "--html", str(page), "-q"]) == 0
        out[key] = (path, page)
    return out


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root, where chromium refuses its sandbox; the page is our own.
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _dom(browser: str, page: Path, tmp_path: Path, fragment: str = "", *args: str) -> _Dom:
    # --enable-logging: the page's console (an uncaught exception in its script) goes to stderr
    result = _chromium(browser, tmp_path / "profile", *args, "--enable-logging=stderr", "--v=0", "--dump-dom",
                       page.resolve().as_uri() + fragment)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Uncaught" not in result.stderr, [line for line in result.stderr.splitlines() if "Uncaught" in line]
    dom = _Dom()
    dom.feed(result.stdout)
    return dom


class _Dom(HTMLParser):
    """The drawn nodes of each side, the details panel's text and the body's attributes of a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, dict[str, dict[str, str]]] = {"parent": {}, "child": {}}
        self.collapsed = 0
        self.body: dict[str, str] = {}
        self.details = ""
        self._side = ""
        self._depth_in_details = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        elif tag == "svg" and "data-side" in a:
            self._side = a["data-side"]
        elif tag == "g" and "data-node" in a:
            self.nodes[self._side][a["data-node"]] = a
        elif tag == "g" and "data-collapsed" in a:
            self.collapsed += 1
        if tag == "aside" and a.get("id") == "details" or self._depth_in_details:
            self._depth_in_details += 1

    def handle_endtag(self, tag: str) -> None:
        if self._depth_in_details:
            self._depth_in_details -= 1

    def handle_data(self, data: str) -> None:
        if self._depth_in_details:
            self.details += data + " "


@pytest.mark.parametrize("morph", sorted(CHILDREN))
def test_rendered_page_marks_what_the_morph_made(browser: str, pages: dict[str, tuple[Path, Path]],
                                                morph: str, tmp_path: Path) -> None:
    child, page = pages[morph]
    d = diff(CIFAR, child)
    dom = _dom(browser, page, tmp_path)
    assert "data-render-ms" in dom.body  # the page's script ran in the browser
    drawn = dom.nodes["child"]
    expected = {name: "added" for name in d.added} or {"conv2": "grown", "conv3": "grown"}
    assert expected and len(expected) == (3 if morph == "deepen" else 4 if morph == "subnet" else 2)
    for name, change in expected.items():
        assert change in drawn[name]["class"].split() and drawn[name]["data-change"] == change
    if d.removed:
        assert dom.nodes["parent"]["conv2"]["data-change"] == "removed"
    # the untouched rest is collapsed, and context nodes are drawn unmarked
    assert dom.collapsed >= 2 and drawn["relu1"]["data-change"] == "context"
    assert len(drawn) < len(d.child.nodes)


def test_details_panel_shows_op_attributes_and_weight_shapes(browser: str, pages: dict[str, tuple[Path, Path]],
                                                             tmp_path: Path) -> None:
    dom = _dom(browser, pages["deepen"][1], tmp_path, "#child:" + quote("conv2/morph_deepen/conv_b", safe=""))
    assert "conv2/morph_deepen/conv_b" in dom.details and "op Conv" in dom.details
    assert "kernel_shape" in dom.details and "32x32x3x3" in dom.details and "became" not in dom.details
    assert "from: conv2" in dom.details
    assert "pinned" in dom.nodes["child"]["conv2/morph_deepen/conv_b"]["class"]
    dom = _dom(browser, pages["widen"][1], tmp_path, "#child:conv2")
    assert "32x32x5x5 \u2192 48x32x5x5" in dom.details


def test_screenshot_is_not_blank_and_shows_the_marks(browser: str, pages: dict[str, tuple[Path, Path]],
                                                     tmp_path: Path) -> None:
    from matplotlib.image import imread  # the train extra, installed in CI

    shot = tmp_path / "shot.png"
    result = _chromium(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,1000",
                       pages["deepen"][1].resolve().as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = (imread(shot)[..., :3] * 255).round().astype(np.int16)
    assert pixels.shape[:2] == (1000, 1400)
    assert pixels.std() > 20  # not one flat colour
    # the added nodes' green and the removed node's red fill are painted
    for fill in ((0xDA, 0xFB, 0xE1), (0xFF, 0xEB, 0xE9)):
        assert (np.abs(pixels - np.array(fill)).max(axis=-1) <= 2).sum() > 2000


def test_page_is_self_contained(pages: dict[str, tuple[Path, Path]]) -> None:
    text = pages["subnet"][1].read_text()
    assert "<link" not in text and " src=" not in text and "@import" not in text and "href=" not in text
    # the only URL is the SVG namespace, which is an identifier, not fetched
    assert text.count("http") == text.count("http://www.w3.org/2000/svg") == 2


def test_resnet50_page_collapses_the_untouched_rest(browser: str, tmp_path: Path) -> None:
    parent = LIGHT / "light_resnet50.onnx"
    child, _ = onnxmorph.morph(parent, "widen", layer="n10", width=384, verify=False)
    child_path = onnxmorph.save(child, tmp_path / "wide.onnx")
    page = tmp_path / "wide.html"
    assert main(["diff", str(parent), str(child_path), "--html", str(page), "-q"]) == 0
    assert page.stat().st_size < 200_000
    dom = _dom(browser, page, tmp_path)
    drawn = dom.nodes["child"]
    assert {"n10", "n12", "n16", "n22", "n44"} <= {n for n, a in drawn.items() if a["data-change"] == "grown"}
    assert len(drawn) < 60 and dom.collapsed >= 3 and "data-render-ms" in dom.body
    # a click on the child's last grown node scrolls the parent's pane to its counterpart
    before, after = _geometry(browser, page, tmp_path, then="click('child', 'n44')")
    assert _in_view(before["child"], before["child"]["first"]) and _in_view(before["parent"], before["parent"]["first"])
    assert not _in_view(before["parent"], "n44") and _in_view(after["parent"], "n44")


def test_drawn_region_is_capped_with_a_note(pages: dict[str, tuple[Path, Path]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxmorph.diff import page as diffhtml

    d = diff(CIFAR, pages["deepen"][0])
    monkeypatch.setattr(diffhtml, "MAX_DRAWN", 4)
    parent_pane, child_pane = diffhtml.render(d).split('id="child-pane"')
    # the child's 3 new nodes and their 2 neighbours pass the cap: the neighbours go
    assert "neighbours left out" in child_pane and child_pane.count('data-change="added"') == 3
    assert 'data-node="relu1"' not in child_pane
    assert 'data-node="relu1"' in parent_pane and "left out" not in parent_pane  # 1 removed + 2 neighbours
    monkeypatch.setattr(diffhtml, "MAX_DRAWN", 2)
    page = diffhtml.render(d)
    assert "only the first 2 are drawn" in page and page.count('data-change="added"') == 2


@pytest.mark.parametrize("seed", range(6))
def test_layout_keeps_boxes_apart_and_edges_downward(seed: int) -> None:
    from onnxmorph.diff.layout import NODE_H, NODE_W, layered_layout

    rng = np.random.default_rng(seed)
    names = [f"n{k}" for k in range(60)]
    edges = [(names[a], names[b]) for a, b in rng.integers(0, 60, size=(120, 2)) if a != b]
    layout = layered_layout(names, edges)
    assert set(layout.centres) == set(names)
    rows: dict[float, list[float]] = {}
    for x, y in layout.centres.values():
        rows.setdefault(y, []).append(x)
        assert NODE_W / 2 <= x <= layout.width - NODE_W / 2 and NODE_H / 2 <= y <= layout.height - NODE_H / 2
    for xs in rows.values():
        xs.sort()
        assert all(b - a >= NODE_W for a, b in zip(xs, xs[1:]))  # no two boxes overlap
    for u, v, points in layout.edges:
        assert all(q[1] > p[1] for p, q in zip(points, points[1:]))  # every edge runs downward
        assert points[0][1] == layout.centres[u][1] + NODE_H / 2 and points[-1][1] == layout.centres[v][1] - NODE_H / 2


def test_layout_of_a_long_chain_needs_no_recursion() -> None:
    from onnxmorph.diff.layout import layered_layout

    names = [f"n{k}" for k in range(3000)]
    layout = layered_layout(list(reversed(names)), list(zip(names, names[1:])))  # every edge points backwards
    assert len({y for _, y in layout.centres.values()}) == 3000


# Measures the drawn nodes where the browser put them, once on load and once after `then` (a
# statement using click(side, name)): {side: {view: the pane's visible rectangle, first, scale,
# nodes: {name: rectangle}, pinned}}, written to <body data-geometry> for --dump-dom.
_PROBE = """<script>
window.addEventListener('load', function () {
  function measure() {
    var out = {window: [scrollX, scrollY]};
    ['parent', 'child'].forEach(function (side) {
      var box = document.querySelector('#' + side + '-pane .scroll'), b = box.getBoundingClientRect();
      var left = b.left + box.clientLeft, top = b.top + box.clientTop, svg = box.querySelector('svg');
      var nodes = {}, pinned = null;
      svg.querySelectorAll('g.node[data-node]').forEach(function (g) {
        var r = g.getBoundingClientRect();
        nodes[g.dataset.node] = [r.left, r.top, r.right, r.bottom];
        if (g.classList.contains('pinned')) pinned = g.dataset.node;
      });
      out[side] = {view: [Math.max(left, 0), Math.max(top, 0), Math.min(left + box.clientWidth, innerWidth),
                          Math.min(top + box.clientHeight, innerHeight)],
                   first: svg.dataset.first, scale: svg.width.baseVal.value / svg.viewBox.baseVal.width,
                   nodes: nodes, pinned: pinned};
    });
    return out;
  }
  function click(side, name) {
    var g = document.querySelector('svg[data-side=' + side + '] g[data-node="' + CSS.escape(name) + '"]');
    g.dispatchEvent(new MouseEvent('click', {bubbles: true}));
  }
  var before = measure();
  THEN;
  document.body.dataset.geometry = JSON.stringify([before, measure()]);
});
</script>"""


def _geometry(browser: str, page: Path, tmp_path: Path, fragment: str = "", then: str = "") -> list[dict]:
    """[on load, after `then`] as _PROBE measures them, in a 1400x1000 window, the page opened at `fragment`."""
    probe = tmp_path / f"probe-{page.name}"
    probe.write_text(page.read_text().replace("</body>", _PROBE.replace("THEN", then) + "</body>"))
    dom = _dom(browser, probe, tmp_path, fragment, "--window-size=1400,1000")
    return json.loads(dom.body["data-geometry"])


def _in_view(pane: dict, name: str) -> bool:
    """Whether the node's whole box lies in the visible part of its pane."""
    box, view = pane["nodes"][name], pane["view"]
    return box[0] >= view[0] - 1 and box[1] >= view[1] - 1 and box[2] <= view[2] + 1 and box[3] <= view[3] + 1


@pytest.fixture(scope="module")
def transformer_page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny Llama (2 pre-norm blocks, TorchScript export) grown by a block after block 0, and their page."""
    hf_support = pytest.importorskip("hf_support")  # torch and transformers
    folder = tmp_path_factory.mktemp("transformer")
    parent = hf_support.export("llama", False, folder).path
    child = onnxmorph.save(onnxmorph.block(parent, after=0), folder / "grown.onnx")
    page = folder / "grown.html"
    assert main(["diff", str(parent), str(child), "--html", str(page), "-q"]) == 0
    return parent, child, page


def _page_data(page: Path) -> dict:
    found = re.search(r'<script type="application/json" id="diff-data">(.*?)</script>', page.read_text())
    assert found
    return json.loads(found.group(1))


def test_transformer_page_opens_at_the_first_change_at_a_readable_zoom(
        browser: str, transformer_page: tuple[Path, Path, Path], tmp_path: Path) -> None:
    parent, child, page = transformer_page
    d = diff(parent, child)
    [(geometry, _)] = [_geometry(browser, page, tmp_path)]
    assert geometry["window"] == [0, 0]  # the page fits the window: the panes scroll, not the page
    kid, old = geometry["child"], geometry["parent"]
    assert kid["first"] in d.added and old["first"] in d.changes("parent")
    assert _in_view(kid, kid["first"]) and _in_view(old, old["first"])
    view = kid["view"]
    assert view[2] - view[0] > 400 and view[3] - view[1] > 400
    # the child's drawing (a whole block: 9 boxes across) is zoomed out to fit, not below a readable 70%
    assert 0.7 - 1e-6 <= kid["scale"] < 1 and old["scale"] == 1
    seen = [n for n in d.added if _in_view(kid, n)]
    assert len(seen) >= 8 and len(seen) < len(d.added)  # the change fills the pane; the rest is a scroll away
    # the page is small, and its FLOPs are numbers, counted at verification's sequence length
    text = page.read_text()
    assert page.stat().st_size < 200_000
    assert "<tr><th>FLOPs per example</th><td>758 k</td><td>1.09 M</td><td>+328 k, +43.2%</td></tr>" in text
    assert "at input sizes input_ids 1x16, attention_mask 1x16" in text


def test_transformer_page_scrolls_to_the_node_a_link_names(
        browser: str, transformer_page: tuple[Path, Path, Path], tmp_path: Path) -> None:
    parent, child, page = transformer_page
    d = diff(parent, child)
    target = [n for n in d.added if d.child.nodes[n].op == "MatMul"][-1]  # the new block's down projection
    assert target.endswith("mlp/down_proj/MatMul")
    [(plain, _)] = [_geometry(browser, page, tmp_path)]
    assert not _in_view(plain["child"], target)  # the link has to scroll there
    [(linked, _)] = [_geometry(browser, page, tmp_path, "#child:" + quote(target, safe=""))]
    assert linked["child"]["pinned"] == target and _in_view(linked["child"], target)
    # the parent has no counterpart of a new node: its pane shows the nearest node that has one
    near = _page_data(page)["child"][target]["near"]
    assert near in d.parent.nodes and _in_view(linked["parent"], near)
    [(back, _)] = [_geometry(browser, page, tmp_path, "#parent:" + quote(near, safe=""))]
    assert back["parent"]["pinned"] == near and _in_view(back["parent"], near)
    missing = _dom(browser, page, tmp_path, "#child:no-such-node")
    assert "not drawn" in missing.details


def test_transformer_page_screenshot_shows_the_new_block(
        browser: str, transformer_page: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from matplotlib.image import imread  # the train extra, installed in CI

    shot = tmp_path / "shot.png"
    result = _chromium(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,1000",
                       transformer_page[2].resolve().as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = (imread(shot)[..., :3] * 255).round().astype(np.int16)
    green = (np.abs(pixels - np.array((0xDA, 0xFB, 0xE1))).max(axis=-1) <= 2)
    # the new block's green boxes are painted in the child's pane (the middle column) on load
    assert green[:, 530:1060].sum() > 20_000
