"""The diff page opened in a real headless browser (Debian's `chromium`): rendered DOM and a screenshot.

Without chromium these tests skip on a workstation and fail in CI (CI=true), where `.ci/run`
installs it: a skipped browser test there would hide a broken page.
"""

from __future__ import annotations

import os
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


def _dom(browser: str, page: Path, tmp_path: Path, fragment: str = "") -> _Dom:
    result = _chromium(browser, tmp_path / "profile", "--dump-dom", page.resolve().as_uri() + fragment)
    assert result.returncode == 0, result.stderr[-2000:]
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
