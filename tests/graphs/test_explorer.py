"""Tests for circuitfinder.graphs.explorer: the self-contained circuit.html page and the comparison page.

Run folders are built here from small synthetic scores (no model). The page is checked as a file
(self-contained, under 5 MB with 70,651 scored edges) and in a real headless browser: Debian's
``chromium`` driven through ``chromedriver`` by Selenium (console messages read from the
browser log, clicks and keys sent as a user's). Browser tests skip when chromium, chromedriver
or selenium is missing (``apt-get install chromium chromium-driver``; ``pip install selenium``).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from circuitfinder.engine.adapter import ModelShape
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.graphs.circuit import Circuit
from circuitfinder.graphs.explorer import (
    FULL_EDGES,
    check_attention,
    markdown_to_html,
    write_compare_page,
    write_explorer,
)
from circuitfinder.graphs.tables import scores_table

ASSETS = Path(__file__).resolve().parents[2] / "graphs" / "assets"


# ---- synthetic run folders ----------------------------------------------------------------------


def make_run(folder: Path, shape: ModelShape, n_circuit: int, seed: int = 0, extras: bool = True) -> Circuit:
    """A run folder with random scores: circuit.json (the top ``n_circuit`` edges, pruned),
    scores.parquet and, with ``extras``, summary.json, curve.csv, roles.csv, necessity.csv, validation.csv."""
    graph = EdgeGraph(shape)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(graph.n_senders, graph.n_receivers, generator=g, dtype=torch.float64) ** 3
    everything = Circuit.from_scores(graph, scores, model="toy", task="ioi", method="eap-ig")
    circuit = everything.top(n_circuit)  # not pruned: a top-n circuit of random scores may have no input → logits path
    nodes = circuit.nodes()  # once: Circuit.heads() recomputes them per sender
    heads = [n for n in graph.sender_names if n in nodes and n.startswith("a")]
    roles = {
        h: {"role": "name mover" if k % 2 == 0 else None, "induction": 0.1 * k, "direct_effect": -0.01 * k}
        for k, h in enumerate(heads)
    }
    circuit = circuit.replace(roles=roles, metadata={"faithfulness": 0.83})
    folder.mkdir(parents=True, exist_ok=True)
    circuit.save(folder / "circuit.json")
    scores_table(circuit).to_parquet(folder / "scores.parquet", index=False)
    if extras:
        total = graph.n_edges
        (folder / "summary.json").write_text(
            json.dumps(
                {"faithfulness": 0.83, "metric": "logit_difference", "ablation": "counterfactual", "edges_total": total}
            )
        )
        sizes = sorted({max(1, total // d) for d in (100, 30, 10, 3, 1)})
        pd.DataFrame(
            {
                "percent": [100 * n / total for n in sizes],
                "top_n": sizes,
                "edges_kept": sizes,
                "faithfulness": [0.1 + 0.9 * k / (len(sizes) - 1) for k in range(len(sizes))],
            }
        ).to_csv(folder / "curve.csv", index=False)
        pd.DataFrame(
            [
                {
                    "node": f"a{l}.h{h}",
                    "layer": l,
                    "head": h,
                    "induction": 0.01 * h,
                    "role": "induction" if h == 0 else "",
                }
                for l in range(shape.n_layers)
                for h in range(shape.n_heads)
            ]
        ).to_csv(folder / "roles.csv", index=False)
        names = circuit.edge_names()
        pd.DataFrame(
            {
                "edge": names,
                "score": [e["score"] for e in circuit.edges],
                "metric_drop": [0.5] * len(names),
                "distance_rise": [0.25] * len(names),
            }
        ).to_csv(folder / "necessity.csv", index=False)
        pd.DataFrame(
            {
                "edge": names,
                "group": ["top"] * len(names),
                "score": [e["score"] for e in circuit.edges],
                "exact_effect": [0.125] * len(names),
            }
        ).to_csv(folder / "validation.csv", index=False)
    return circuit


def attention_for(head: str, n_tokens: int = 6) -> dict:
    tokens = [f" t{k}" for k in range(n_tokens)]
    pattern = [[1.0 / (q + 1) if k <= q else 0.0 for k in range(n_tokens)] for q in range(n_tokens)]
    return {head: {"tokens": [tokens, tokens[:4]], "patterns": [pattern, [r[:4] for r in pattern[:4]]]}}


SMALL = ModelShape(6, 4, 2, d_model=32)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    circuit = make_run(folder, SMALL, 40)
    head = circuit.heads()[0]
    page = write_explorer(folder, attention=attention_for(head))
    return folder, circuit, page, head


@pytest.fixture(scope="module")
def large_run(tmp_path_factory):
    """SmolLM2's shape: 70,651 scored edges."""
    folder = tmp_path_factory.mktemp("large")
    circuit = make_run(folder, ModelShape(30, 9, 3, d_model=576), 300, seed=1)
    return folder, circuit, write_explorer(folder)


def page_data(page: Path) -> tuple[dict, dict]:
    text = page.read_text(encoding="utf-8")
    blocks = dict(re.findall(r'<script type="application/json" id="(cf-\w+)">(.*?)</script>', text, flags=re.S))
    return json.loads(blocks["cf-data"]), json.loads(blocks["cf-rest"])


# ---- the file -----------------------------------------------------------------------------------


def test_page_is_self_contained(small_run):
    folder, circuit, page, _ = small_run
    assert page == folder / "circuit.html"
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\ssrc=|<link[^>]*stylesheet|@import", text), "everything must be inlined"
    assert "cytoscape" in text and "cytoscapeDagre" in text
    data, rest = page_data(page)
    assert len(data["circuit"]["i"]) == circuit.n_edges
    assert data["about"]["n_scored"] == EdgeGraph(SMALL).n_edges == len(data["top"]["v"]) + len(rest["v"])
    assert data["about"]["scores_source"] == "scores.parquet" and data["curve"] and data["roles"]
    assert len(data["necessity"]["i"]) == circuit.n_edges and len(data["validation"]["i"]) == circuit.n_edges
    v = data["top"]["v"] + rest["v"]
    assert all(abs(a) >= abs(b) for a, b in zip(v, v[1:])), "edges are in rank order"


def test_script_data_cannot_close_its_tag(tmp_path):
    make_run(tmp_path, SMALL, 10, extras=False)
    page = write_explorer(
        tmp_path,
        tmp_path / "x.html",
        attention={"a1.h1": {"tokens": [["</script>", "<!--"]], "patterns": [[[1, 0], [0.5, 0.5]]]}},
    )
    data, _ = page_data(page)
    assert data["attention"]["a1.h1"]["tokens"] == [["</script>", "<!--"]]
    assert data["about"]["scores_source"] == "scores.parquet" and "summary" in data["about"]


def test_run_without_scores_or_extras(tmp_path):
    circuit = make_run(tmp_path, SMALL, 12, extras=False)
    (tmp_path / "scores.parquet").unlink()
    data, rest = page_data(write_explorer(tmp_path))
    assert data["about"]["scores_source"] == "circuit.json" and data["about"]["n_scored"] == circuit.n_edges
    assert data["curve"] == [] and rest["v"] == []


def test_large_run_page_is_small(large_run):
    folder, circuit, page = large_run
    size = page.stat().st_size
    assert size < 5_000_000, f"{size:,} bytes"
    data, rest = page_data(page)
    assert data["about"]["n_scored"] == 70_651
    assert len(data["top"]["v"]) == FULL_EDGES and len(rest["s"]) == 70_651 - FULL_EDGES
    assert all(float(f"{x:.4g}") == x for x in rest["v"][:1000]), "the compact tail keeps 4 significant digits"


def test_attention_is_checked():
    good = check_attention(attention_for("a1.h2"))
    assert good["a1.h2"]["labels"] == ["prompt 0", "prompt 1"]
    with pytest.raises(ValueError, match="not a head"):
        check_attention({"m1": attention_for("a1.h2")["a1.h2"]})
    with pytest.raises(ValueError, match="rows"):
        check_attention({"a0.h0": {"tokens": [["a", "b"]], "patterns": [[[1.0]]]}})


def test_markdown_tables_are_escaped():
    out = markdown_to_html("# Title\n\n- A: <b>\n\n| metric | value |\n|:---|---:|\n| x\\|y | <i> |\n")
    assert "<h2>Title</h2>" in out and "<li>A: &lt;b&gt;</li>" in out
    assert "<td>x|y</td><td>&lt;i&gt;</td>" in out and "<th>metric</th>" in out


def test_assets_are_documented():
    readme = (ASSETS / "README.md").read_text()
    import hashlib

    for name in (
        "cytoscape.min.js",
        "cytoscape-dagre.min.js",
        "LICENSE.cytoscape",
        "LICENSE.cytoscape-dagre",
        "LICENSE.dagre",
    ):
        assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() in readme, name


# ---- in the browser -----------------------------------------------------------------------------

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
except ImportError:
    selenium = None
browser_only = pytest.mark.skipif(
    not (CHROMIUM and DRIVER and selenium),
    reason="needs chromium, chromedriver and selenium (apt-get install chromium chromium-driver; pip install selenium)",
)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def open_page(driver, page: Path, timeout: float = 20) -> float:
    """Load a page and wait for the explorer to be ready; returns the seconds it took."""
    driver.get_log("browser")  # forget earlier pages' messages
    start = time.monotonic()
    driver.get(page.resolve().as_uri())
    while not driver.execute_script("return document.body && document.body.dataset.ready === '1'"):
        assert time.monotonic() - start < timeout, "the page did not get ready"
        time.sleep(0.05)
    return time.monotonic() - start


def console_problems(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def counts(driver) -> dict:
    return driver.execute_script("return window.explorer.counts()")


def click_node(driver, name: str) -> None:
    """Click a drawn node where it is on screen, as a user would."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    graph = driver.find_element(By.ID, "cf-graph")
    driver.execute_script(
        "const n = explorer.cy.getElementById(arguments[0]); explorer.cy.zoom(1.2); explorer.cy.center(n);", name
    )
    p = driver.execute_script("return explorer.nodePosition(arguments[0])", name)
    size = graph.size
    ActionChains(driver).move_to_element_with_offset(
        graph, int(p["x"] - size["width"] / 2), int(p["y"] - size["height"] / 2)
    ).click().perform()


@browser_only
def test_default_view_matches_circuit_json(browser, small_run):
    _, circuit, page, _ = small_run
    open_page(browser, page)
    c = counts(browser)
    assert c["mode"] == "circuit" and not c["restParsed"]
    assert (c["nodes"], c["edges"]) == (len(circuit.nodes()), circuit.n_edges)
    assert browser.execute_script("return [+document.body.dataset.nodes, +document.body.dataset.edges]") == [
        c["nodes"],
        c["edges"],
    ]
    browser.execute_script("explorer.setLevel('node')")
    g = circuit.to_networkx()
    assert (counts(browser)["nodes"], counts(browser)["edges"]) == (g.number_of_nodes(), g.number_of_edges())
    browser.execute_script("explorer.setLayout('dagre')")
    assert counts(browser)["edges"] == g.number_of_edges()
    assert console_problems(browser) == []
    assert browser.execute_script("return explorer.errors") == []


@browser_only
def test_edge_control_changes_what_is_drawn(browser, small_run):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _, circuit, page, _ = small_run
    open_page(browser, page)
    total = EdgeGraph(SMALL).n_edges
    slider = browser.find_element(By.ID, "cf-slider")
    slider.send_keys(Keys.HOME)
    time.sleep(0.3)
    assert counts(browser)["mode"] == "top" and counts(browser)["edges"] == 1
    slider.send_keys(Keys.END)
    time.sleep(0.3)
    assert counts(browser)["edges"] == total
    number = browser.find_element(By.ID, "cf-number")
    number.clear()
    number.send_keys("25", Keys.ENTER)
    time.sleep(0.3)
    assert counts(browser)["edges"] == 25
    faith = browser.find_element(By.ID, "cf-faith").text
    assert "held-out faithfulness" in faith and ("interpolated" in faith or "curve.csv point" in faith)
    browser.execute_script("explorer.setThreshold(arguments[0])", 1.0)
    scores = pd.read_parquet(page.parent / "scores.parquet").score
    assert counts(browser)["edges"] == int((scores.abs() >= 1.0).sum()) > 0
    assert console_problems(browser) == []


@browser_only
def test_clicking_a_node_opens_its_panel(browser, small_run):
    from selenium.webdriver.common.by import By

    _, circuit, page, head = small_run
    open_page(browser, page)
    click_node(browser, head)
    panel = browser.find_element(By.ID, "cf-panel")
    assert panel.is_displayed()
    assert panel.find_element(By.TAG_NAME, "h2").text == head
    assert "role" in panel.text and "Attention pattern" in panel.text
    assert len(panel.find_elements(By.TAG_NAME, "canvas")) == 2
    highlighted, connected = browser.execute_script(
        "return [explorer.cy.edges('.hl').length, explorer.cy.getElementById(arguments[0]).connectedEdges().length]",
        head,
    )
    assert highlighted == connected > 0
    search = browser.find_element(By.ID, "cf-search")
    search.send_keys("logits\n")
    time.sleep(0.3)
    assert panel.find_element(By.TAG_NAME, "h2").text == "logits"
    assert console_problems(browser) == []


@browser_only
def test_hovering_an_edge_shows_its_score(browser, small_run):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    _, _, page, _ = small_run
    open_page(browser, page)
    # the strongest edge, centred and zoomed so that its midpoint is clear of nodes
    p = browser.execute_script("""
        const e = explorer.cy.edges().max(x => x.data('w')).ele;
        explorer.cy.zoom(2); explorer.cy.center(e); return e.renderedMidpoint();""")
    graph = browser.find_element(By.ID, "cf-graph")
    ActionChains(browser).move_to_element_with_offset(
        graph, int(p["x"] - graph.size["width"] / 2), int(p["y"] - graph.size["height"] / 2)
    ).perform()
    tip = browser.find_element(By.ID, "cf-tip")
    assert tip.is_displayed()
    assert re.search(rf"rank \d+ of {EdgeGraph(SMALL).n_edges:,} by \|score\|", tip.text), tip.text
    assert "score" in tip.text and "in the circuit" in tip.text
    assert "metric drop 0.5" in tip.text and "exact effect 0.125" in tip.text


@browser_only
def test_drawing_is_not_blank_and_exports(browser, small_run):
    from PIL import Image

    _, circuit, page, _ = small_run
    open_page(browser, page)
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    assert len(set(shot.getdata())) > 20, "the screenshot is one colour"
    png = browser.execute_script("return explorer.exportPNG()")
    assert png.startswith("data:image/png;base64,")
    import base64

    image = Image.open(io.BytesIO(base64.b64decode(png.split(",", 1)[1]))).convert("RGB")
    assert len(set(image.getdata())) > 20
    svg = browser.execute_script("return explorer.exportSVG()")
    import xml.etree.ElementTree as ET

    root = ET.fromstring(svg)
    assert len(root.findall("{http://www.w3.org/2000/svg}path")) == circuit.n_edges
    assert console_problems(browser) == []


@browser_only
def test_large_page_opens_quickly(browser, large_run):
    _, circuit, page = large_run
    seconds = open_page(browser, page)
    assert seconds < 10, f"took {seconds:.1f} s"
    c = counts(browser)
    assert (c["edges"], c["total"], c["restParsed"]) == (circuit.n_edges, 70_651, False)
    browser.execute_script("explorer.setTop(3000)")
    c = counts(browser)
    assert c["edges"] == 3000 and c["restParsed"]
    browser.execute_script("explorer.setLevel('node')")
    top = circuit.top(3000)
    assert (counts(browser)["nodes"], counts(browser)["edges"]) == (
        len(top.nodes()),
        top.to_networkx().number_of_edges(),
    )
    assert console_problems(browser) == []


@browser_only
def test_compare_page(browser, tmp_path):
    a = make_run(tmp_path / "a", SMALL, 30, seed=3, extras=False)
    b = make_run(tmp_path / "b", SMALL, 45, seed=3, extras=False)  # the same scores, more edges: mostly shared
    deeper = make_run(tmp_path / "c", ModelShape(9, 2, 1, d_model=8), 20, seed=5, extras=False)
    page = write_compare_page(tmp_path / "a", b, tmp_path / "compare.html")
    open_page(browser, page)
    ea, eb = set(a.edge_names()), set(b.edge_names())
    c = counts(browser)
    assert (c["edges"], c["shared"], c["a_only"], c["b_only"]) == (
        len(ea | eb),
        len(ea & eb),
        len(ea - eb),
        len(eb - ea),
    )
    assert c["nodes"] == len(a.nodes() | b.nodes())
    assert "Metrics" in browser.find_element("id", "cf-table").text
    page = write_compare_page(a, deeper, tmp_path / "compare2.html", table_markdown="| x | y |\n|---|---|\n| 1 | 2 |")
    open_page(browser, page)
    c = counts(browser)
    assert (c["shared"], c["a_only"], c["b_only"]) == (0, a.n_edges, deeper.n_edges)
    assert console_problems(browser) == []
