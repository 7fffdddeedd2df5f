"""`harness view` and `harness report --html` in a real headless Chromium (Debian's chromium and
chromium-driver, driven by selenium; nothing is downloaded): the numbers shown equal `harness report
--json`, filters and paging return the right questions, images render, a raw answer with <script>
shows as text, and images outside the run's image roots are refused."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest

from tests.harness.view.conftest import SCRIPT_RAW

os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to download a browser
SCREENSHOTS = os.environ.get("HARNESS_SCREENSHOT_DIR")  # set to save the README's screenshots


def _chromium() -> tuple[str, str] | None:
    b = shutil.which("chromium") or shutil.which("chromium-browser")
    d = shutil.which("chromedriver")
    return (b, d) if b and d else None


@pytest.fixture(scope="module")
def driver():
    found = _chromium()
    if found is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    o = webdriver.ChromeOptions()
    o.binary_location = found[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1400,1000"):
        o.add_argument(a)
    o.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    d = webdriver.Chrome(service=Service(found[1]), options=o)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def server(runs):
    from harness.view.server import ServerThread, Viewer

    order = ["image", "image_b", "binary", "text", "incomplete"]
    v = Viewer([runs[k] for k in order])
    with ServerThread(v) as s:
        s.ids = {k: i for i, k in enumerate(order)}
        yield s


_nav = [0]


def goto(d, server, hashpart: str, page: str | None = None):
    """Load the page fresh at a route and wait until it has rendered."""
    _nav[0] += 1
    d.get(f"{server.url}?n={_nav[0]}#{hashpart}")
    page = page or hashpart.split("?")[0]
    wait(d, lambda: d.execute_script(
        f"const m = document.getElementById('main'); return m && m.dataset.ready === '1' && m.dataset.page === '{page}'"))


def wait(d, cond, timeout: float = 15.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(Exception):
            if cond():
                return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page")


def report_json(*paths) -> list[dict]:
    import harness.cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert harness.cli.main(["report", "--json", *map(str, paths)]) == 0
    out = json.loads(buf.getvalue())
    return out if isinstance(out, list) else [out]


def latest(folder: Path) -> dict[str, dict]:
    """qid -> the last line of that qid (what the index must show)."""
    out = {}
    for line in (folder / "results.jsonl").read_bytes().splitlines():
        rec = orjson.loads(line)
        out.pop(rec["qid"], None)  # the position of its last line (the order the viewer lists)
        out[rec["qid"]] = rec
    return out


def status(rec: dict) -> str:
    if rec.get("error") is not None:
        return "failed"
    if rec.get("option") is not None:
        if rec.get("yes") is None or rec["yes"] < 0:
            return "unparsed"
        is_truth = rec["choices"][rec["option"]].lower() == rec["truth"].lower()
        return "right" if (rec["yes"] == 1) == is_truth else "wrong"
    if rec.get("prediction") is None:
        return "unparsed"
    return "right" if rec["prediction"].lower() == rec["truth"].lower() else "wrong"


def rows(d) -> list[dict]:
    return d.execute_script("""return [...document.querySelectorAll('.question-row')].map(e => ({
        qid: e.dataset.qid, status: e.dataset.status, level: e.dataset.level, truth: e.dataset.truth,
        item: e.dataset.item}))""")


def total(d) -> int:
    return int(d.execute_script("return document.querySelector('.pageinfo').dataset.total"))


def _value(summary: dict, key: str):
    node = summary
    for part in key.split("."):
        node = node[part]
    return node


# ------------------------------------------------------------------ overview

def test_overview_numbers_equal_report_json(driver, server, runs):
    goto(driver, server, "overview")
    cells = driver.execute_script("""return [...document.querySelectorAll('#overview-table [data-key], #levels-table [data-key]')]
        .map(e => ({run: e.dataset.run, key: e.dataset.key, value: e.dataset.value, text: e.firstChild.textContent}))""")
    by_run = defaultdict(dict)
    for c in cells:
        by_run[int(c["run"])][c["key"]] = c
    for name, rid in server.ids.items():
        expected = report_json(runs[name])[0]
        shown = by_run[rid]
        for key in ("n_items", "hca", "leaf_acc", "por", "strict_por", "tor", "leaf_right_ancestor_wrong",
                    "ancestors_right_leaf_wrong", "n_questions", "n_unanswered", "n_errors",
                    *[f"per_level.{lv}" for lv in expected["per_level"]]):
            want = _value(expected, key)
            assert key in shown, (name, key)
            assert json.loads(shown[key]["value"]) == want, (name, key, shown[key], want)
            if isinstance(want, float):
                assert abs(float(shown[key]["text"].replace(",", "")) - want) <= 0.0051, (name, key)
        assert json.loads(shown["hca_ci"]["value"]) == expected["hca_ci"]
    # the incomplete run has its banner; the finished ones none
    banners = driver.execute_script(
        "return [...document.querySelectorAll('.banner.incomplete')].map(e => [e.dataset.run, e.textContent])")
    assert [b[0] for b in banners] == [str(server.ids["incomplete"])]
    assert "incomplete" in banners[0][1]
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SCREENSHOTS) / "viewer-overview.png"))


# ------------------------------------------------------------------ questions: filters and paging

def test_filters_and_paging_return_the_right_questions(driver, server, runs):
    lines = latest(runs["image"])
    rid = server.ids["image"]
    want = [q for q, r in lines.items() if r["level"] == 2 and status(r) == "wrong"]
    goto(driver, server, f"questions?run={rid}&level=2&status=wrong&per=5", "questions")
    assert total(driver) == len(want)
    seen: list[str] = []
    while True:
        page = rows(driver)
        assert all(r["status"] == "wrong" and r["level"] == "2" for r in page)
        seen += [r["qid"] for r in page]
        nxt = driver.find_element("css selector", ".pager .next")
        if not nxt.is_enabled():
            break
        before = driver.execute_script("return document.querySelector('.pageinfo').dataset.page")
        nxt.click()
        wait(driver, lambda before=before: driver.execute_script(
            "const p = document.querySelector('.pageinfo'); return p && p.dataset.page !== arguments[0] "
            "&& document.getElementById('main').dataset.ready === '1'", before))
    assert seen == want  # every matching question once, in file order

    # the filter form: pick a status in the page and apply
    goto(driver, server, f"questions?run={rid}", "questions")
    assert total(driver) == len(lines)
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("css selector", "form.filters select[name=status]")).select_by_value("right")
    driver.find_element("id", "apply").click()
    wait(driver, lambda: "status=right" in driver.current_url
         and driver.execute_script("return document.getElementById('main').dataset.ready") == "1")
    assert total(driver) == sum(status(r) == "right" for r in lines.values())
    assert {r["status"] for r in rows(driver)} <= {"right"}

    # leaf right, an ancestor wrong: items whose deepest scored level is right and another wrong
    per_item = defaultdict(dict)
    for r in lines.values():
        if r.get("scored", True):
            per_item[r["item"]][r["level"]] = status(r) == "right"
    lraw_items = {i for i, lv in per_item.items() if lv[max(lv)] and not all(lv.values())}
    goto(driver, server, f"questions?run={rid}&lraw=1&per=200", "questions")
    assert total(driver) == sum(r["item"] in lraw_items for r in lines.values())
    assert {r["item"] for r in rows(driver)} == lraw_items

    # two runs that disagree: same item and level, other prediction
    other = latest(runs["image_b"])
    pred_b = {(r["item"], r["level"]): (status(r), (r["prediction"] or "").lower()) for r in other.values()}
    disagree = [q for q, r in lines.items()
                if (r["item"], r["level"]) in pred_b and pred_b[(r["item"], r["level"])] != (status(r), (r["prediction"] or "").lower())]
    goto(driver, server, f"questions?run={rid}&other={server.ids['image_b']}&per=200", "questions")
    assert total(driver) == len(disagree) > 0
    assert [r["qid"] for r in rows(driver)] == disagree
    assert driver.execute_script("return document.querySelectorAll('.question-row .other').length") == len(disagree)

    # binary statements: status from yes/no against the truth
    blines = latest(runs["binary"])
    goto(driver, server, f"questions?run={server.ids['binary']}&status=wrong&per=10", "questions")
    assert total(driver) == sum(status(r) == "wrong" for r in blines.values())
    if SCREENSHOTS:
        goto(driver, server, f"questions?run={rid}&status=wrong&per=10", "questions")
        wait(driver, lambda: driver.execute_script(
            "return [...document.querySelectorAll('img.thumb')].every(i => i.complete)"))
        driver.save_screenshot(str(Path(SCREENSHOTS) / "viewer-questions.png"))


def test_question_row_shows_the_question_options_and_raw_answer(driver, server, runs):
    rid = server.ids["image"]
    goto(driver, server, f"questions?run={rid}&per=1", "questions")
    rec = next(iter(latest(runs["image"]).values()))
    card = driver.find_element("css selector", ".question-row")
    assert card.get_attribute("data-qid") == rec["qid"]
    text = card.find_element("css selector", "pre.question").text
    for letter, opt in rec["choices"].items():
        assert f"{letter}. {opt}" in text  # the options in the order the model saw them
    truth = card.find_element("css selector", "ul.options li.truth")
    assert rec["truth"] in truth.text


# ------------------------------------------------------------------ images and escaping

def test_an_image_renders(driver, server, runs):
    rid = server.ids["image"]
    goto(driver, server, f"questions?run={rid}&per=3", "questions")
    wait(driver, lambda: driver.execute_script(
        "const i = document.querySelector('img.thumb'); return i && i.complete && i.naturalWidth > 0"))
    item = rows(driver)[0]["item"]
    goto(driver, server, f"item?item={quote(item, safe='')}", "item")
    wait(driver, lambda: driver.execute_script(
        "const i = document.querySelector('#item-card img'); return i && i.complete && i.naturalWidth === 64"))
    # the item card: every level of the item, in every run
    n_levels = driver.execute_script(
        f"return document.querySelectorAll('table.item-run[data-run=\"{rid}\"] tr[data-level]').length")
    assert n_levels == sum(r["item"] == item for r in latest(runs["image"]).values())
    assert driver.execute_script("return document.querySelectorAll('table.item-run').length") == len(server.ids)
    if SCREENSHOTS:
        driver.save_screenshot(str(Path(SCREENSHOTS) / "viewer-item.png"))


def test_a_raw_answer_with_script_shows_as_text(driver, server, runs):
    rec = next(r for r in latest(runs["image"]).values() if r["raw"] == SCRIPT_RAW)
    goto(driver, server, f"item?item={quote(rec['item'], safe='')}", "item")
    raws = driver.execute_script("return [...document.querySelectorAll('pre.raw, table.item-run code')].map(e => e.textContent)")
    assert SCRIPT_RAW in raws
    assert driver.execute_script("return window.__pwned") is None
    assert driver.execute_script("return document.querySelectorAll('#main script, #main img[src=x]').length") == 0


@pytest.mark.parametrize("path", ["../secret.png", "img/../../secret.png", "/etc/passwd",
                                  "{base}/secret.png", "img/link-out.png"])
def test_image_paths_outside_the_roots_are_refused(driver, server, runs, path):
    path = path.format(base=runs["base"])
    url = f"{server.url}img?run={server.ids['image']}&root=0&path={quote(path, safe='')}"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url)
    assert e.value.code == 403
    driver.get(url)
    assert "refused" in driver.find_element("tag name", "body").text
    assert "not for the viewer" not in driver.page_source
    ok = f"{server.url}img?run={server.ids['image']}&root=0&path=img%2F0000.png"
    assert urllib.request.urlopen(ok).read()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ taxonomy map

def test_taxonomy_map_click_lists_the_node_questions(driver, server, runs):
    rid = server.ids["image"]
    goto(driver, server, f"map?run={rid}", "map")
    nodes = driver.execute_script("""return [...document.querySelectorAll('#sunburst path')].map(p => ({
        level: p.dataset.level, truth: p.dataset.truth, n: +p.dataset.n, right: +p.dataset.right}))""")
    lines = latest(runs["image"]).values()
    for n in nodes:  # accuracy per node: the questions whose truth is that node
        mine = [r for r in lines if str(r["level"]) == n["level"] and r["truth"] == n["truth"]]
        assert n["n"] == len(mine) and n["right"] == sum(status(r) == "right" for r in mine), n
    assert len({n["level"] for n in nodes}) == 4
    if SCREENSHOTS:
        driver.save_screenshot(str(Path(SCREENSHOTS) / "viewer-map.png"))
    target = next(n for n in nodes if n["level"] == "2")
    el = driver.find_element("css selector", f"#sunburst path[data-level='2'][data-truth='{target['truth']}']")
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", el)
    wait(driver, lambda: driver.execute_script(
        "const m = document.getElementById('main'); return m.dataset.page === 'questions' && m.dataset.ready === '1'"))
    assert total(driver) == target["n"]
    assert {(r["level"], r["truth"]) for r in rows(driver)} == {("2", target["truth"])}


# ------------------------------------------------------------------ the HTML report

def test_html_report_is_self_contained_and_shows_the_report_numbers(driver, runs, tmp_path):
    import harness.cli

    out = tmp_path / "report.html"
    paths = [runs["image"], runs["binary"], runs["incomplete"]]
    assert harness.cli.main(["report", *map(str, paths), "--html", str(out)]) == 0
    html = out.read_text()
    assert "<script" not in html.lower()  # no script of ours, and no raw answer's either
    expected = report_json(*paths)
    driver.get_log("performance")  # drop earlier entries
    driver.get(out.as_uri())
    requests = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    urls = {m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"}
    assert {u for u in urls if not u.startswith("data:")} == {out.as_uri()}
    cells = driver.execute_script("""return [...document.querySelectorAll('[data-key]')].map(e => ({
        run: +e.dataset.run, key: e.dataset.key, value: e.dataset.value}))""")
    got = {(c["run"], c["key"]): c["value"] for c in cells}
    for k, exp in enumerate(expected):
        for key in ("hca", "leaf_acc", "por", "tor", "n_items", "n_unanswered",
                    *[f"per_level.{lv}" for lv in exp["per_level"]]):
            assert float(got[(k, key)]) == _value(exp, key), (k, key)
    # the gallery's thumbnails are embedded and render
    wait(driver, lambda: driver.execute_script(
        "const i = [...document.querySelectorAll('.card img')]; return i.length > 0 && i.every(x => x.complete && x.naturalWidth > 0)"))
    assert "incomplete" in driver.find_element("css selector", ".banner").text
    assert driver.find_elements("css selector", "[data-category=failed]")
    if SCREENSHOTS:
        driver.save_screenshot(str(Path(SCREENSHOTS) / "report-html.png"))
