"""report.html: built at the end of ``cifarlab run``, self-contained, and rendered by a real browser."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from markupsafe import escape
from safetensors.torch import save_file

from cifarlab import checkpoints, cli, explain, pipeline, report, templates, visualize
from cifarlab.cli import train as cli_train
from cifarlab.data import CIFAR10
from cifarlab.doctor import diagnose
from cifarlab.errors import CifarlabError
from cifarlab.evaluate import confusion_matrix, evaluate_model
from cifarlab.models import build_model
from cifarlab.transforms import Normalization

SECTION_IDS = [sid for sid, _ in report.SECTIONS]
NEW_SECTIONS = ["quality", "calibration", "shift", "explanations", "examples", "map"]  # issues 12, 22
NEW_IMAGES = ["reliability diagram", "attribution maps of every method", "deletion and insertion curves",
              "cascading randomization", "examples classes"]
# few images and steps: the tests check the plumbing; the README gives the defaults' cost
QUICK_EXPLAIN = ["--faithfulness-images", "12", "--faithfulness-steps", "4", "--sanity-images", "4",
                 "--example-images", "300"]
QUICK_SETTINGS = explain.ExplainSettings(faithfulness_images=12, faithfulness_steps=4, sanity_images=4,
                                         example_images=300)
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HOSTILE = ["<script>window.__pwned = 'script'</script>", '"><img src=x onerror="window.__pwned = \'img\'">',
           "n" * 9_990 + "</td></tr>"]  # 10,000 characters, closing the cell it is written into


_FOR_METHOD = visualize.StimulusSettings.for_method


def _quick(method="default", **overrides):
    """Few ascent steps: the tests check the plumbing, bench/ measures the real settings."""
    return _FOR_METHOD(method, **dict(overrides, steps=overrides.get("steps") or 4))


@pytest.fixture(scope="module")
def small(cifar):
    return CIFAR10(train=cifar.train.subset(slice(0, 2000)), test=cifar.test.subset(slice(0, 1000)),
                   classes=cifar.classes, root=cifar.root)


@pytest.fixture(scope="module")
def cli_run(small, tmp_path_factory):
    """``cifarlab run`` end to end (train -> evaluate -> report) on 2,000 training images."""
    runs = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_train, "load_data", lambda args, **kwargs: small)
        mp.setattr(visualize.StimulusSettings, "for_method", staticmethod(_quick))
        rc = cli.main(["run", "--epochs", "1", "--batch-size", "64", "--runs-dir", str(runs), "--name", "r",
                       "--no-progress", "--threads", "2", "--val-split", "200", *QUICK_EXPLAIN])
    assert rc == 0
    return runs / "r"


@pytest.fixture(scope="module")
def truth(cli_run, small):
    """The run's predictions on the test set computed here, independently of the files the report read."""
    ckpt = checkpoints.load_checkpoint(cli_run)
    ev = evaluate_model(ckpt.model, small.test.images, small.test.labels, small.classes,
                        Normalization.from_dict(ckpt.meta["normalization"]), tta=0)
    return ev.labels, ev.predictions


def _inputs(run: Path, data, cap: int, points: int, names: dict | None = None, **meta) -> report.ReportInputs:
    """The page's inputs gathered from a finished run's files (no visualize pass; stimuli of 4 steps).
    ``names``: class names replaced after the files are read, everywhere the page shows one; ``meta``:
    checkpoint metadata replaced."""
    ckpt = checkpoints.load_checkpoint(run)
    results, predictions = report._results(run, ckpt, data, log=lambda *a: None)
    saved = json.loads((run / "visualize" / "summary.json").read_text())
    vis = visualize.VisualizationResult(run / "visualize", saved["method"], saved["files"],
                                        saved["class_probabilities"], saved["seconds"])
    visual = report._visual_outputs(vis)
    if names:
        results, meta["classes"] = _rename(results, names), _rename(ckpt.meta["classes"], names)
        visual.class_probabilities = _rename(visual.class_probabilities, names)
    from cifarlab.transforms import Normalization

    stimuli = visualize.all_stimuli(ckpt.model.cpu().eval(), Normalization.from_dict(ckpt.meta["normalization"]),
                                    _quick(), 0)  # what render_all hands the report (VisualizationResult.stimuli)
    ckpt.meta = dict(ckpt.meta, **meta)
    layers, pages = report.stimuli_pages(stimuli, visual, data.test.images, list(ckpt.meta["classes"]))
    return report.ReportInputs(run, ckpt, results, run / "training_curves.png",
                               report.confusion_block(results["classes"], predictions, data.test.images, cap),
                               report.feature_map_block(ckpt, data, predictions, "pca", points, 0),
                               visual, layers, pages)


def test_run_writes_a_self_contained_report(cli_run):
    page = (cli_run / "report.html").read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in page
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) >= 12 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from the network
    styles = re.sub(r"<script.*?</script>", "", page, flags=re.S)
    assert not re.search(r"url\((?![\"']?data:)", styles)  # CSS fetches nothing either
    # One script, the page's own, allowed by its hash; the other two <script> elements are JSON data.
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, re.S)
    assert [attrs for attrs, _ in scripts] == [' type="application/json" id="confusion-data"',
                                               ' type="application/json" id="map-data"', ""]
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', page).group(1)
    csp = html.unescape(csp)
    assert csp.startswith("default-src 'none'; img-src data:;") and templates.inline_script("report.js")[1] in csp
    assert "Not available" not in page
    assert "Total params: 1,084,234" in page
    results = json.loads((cli_run / "eval" / "results.json").read_text())
    assert f"{100 * results['accuracy']:.2f}%" in page
    for key in ("precision", "recall", "f1"):
        assert all(key in q for q in results["per_class"].values())
    assert results["calibration"]["after"]["ece"] >= 0 and results["calibration"]["temperature"] > 0
    assert "Per-class quality" in page and "Brier score" in page
    summary = json.loads((cli_run / "visualize" / "summary.json").read_text())
    explained = summary["explanations"]
    assert explained["faithfulness"]["settings"] == dict(explained["faithfulness"]["settings"], n=12, steps=4)
    assert set(explained["faithfulness"]["methods"]) == set(explained["sanity"]["methods"]) == set(
        explained["settings"]["methods"])
    assert explained["examples"]["images"] == 300
    for method, probs in summary["class_probabilities"].items():
        assert f"{min(probs.values()):.3f}" in page
    # one channel page per stimulus: every conv channel and every class
    channels = sum(len(layer["channels"]) for layer in explained["examples"]["layers"].values())
    assert page.count('<article class="channel-page"') == channels == 16 + 32 + 32 + 64 + 10


def test_predictions_file_is_checked_when_read(cli_run, small, tmp_path):
    path = cli_run / "eval" / pipeline.PREDICTIONS_FILE
    stored = pipeline.load_predictions(path, 10, 1000)
    assert np.array_equal(stored["labels"], small.test.labels.numpy())
    results = json.loads((cli_run / "eval" / "results.json").read_text())
    assert confusion_matrix(stored["labels"], stored["predicted"], 10).tolist() == results["confusion_matrix"]
    assert ((0 <= stored["confidence"]) & (stored["confidence"] <= 1)).all()
    with pytest.raises(CifarlabError, match="expected torch.int64 \\(999,\\)"):
        pipeline.load_predictions(path, 10, 999)            # another test set's size
    with pytest.raises(CifarlabError, match="for 100 classes"):
        pipeline.load_predictions(path, 100, 1000)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CifarlabError, match="truncated or damaged"):
        pipeline.load_predictions(truncated, 10, 1000)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CifarlabError, match="not a regular file"):
        pipeline.load_predictions(fifo, 10, 1000)           # refused at once, not a hang
    sparse = tmp_path / "sparse.safetensors"
    with open(sparse, "wb") as f:
        f.truncate(20 << 30)
    with pytest.raises(CifarlabError, match="predictions|size|large|bytes"):
        pipeline.load_predictions(sparse, 10, 1000)
    out_of_range = tmp_path / "range.safetensors"
    save_file({"labels": torch.full((1000,), 12), "predicted": torch.zeros(1000, dtype=torch.int64),
               "confidence": torch.ones(1000)}, out_of_range,
              metadata={"format": pipeline.PREDICTIONS_FORMAT, "classes": "10"})
    with pytest.raises(CifarlabError, match="labels outside 0..9"):
        pipeline.load_predictions(out_of_range, 10, 1000)


def test_report_evaluates_again_when_the_predictions_are_not_this_test_set(cli_run, small, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cli_run, run, ignore=shutil.ignore_patterns("report.html"))
    ckpt = checkpoints.load_checkpoint(run)
    report._results(run, ckpt, small, lambda *a: None)  # results.json names the copied run's checkpoint now
    other = CIFAR10(train=small.train, test=small.test.subset(slice(1, 1001)), classes=small.classes,
                    root=small.root)  # the same size, shifted by one image
    logged = []
    results, predictions = report._results(run, ckpt, other, logged.append)
    assert any("another test set" in line and "evaluating" in line for line in logged), logged
    assert np.array_equal(predictions["labels"], other.test.labels.numpy())
    logged.clear()
    report._results(run, ckpt, other, logged.append)
    assert logged == []  # now they match: reused


def test_build_report_fills_in_what_is_missing(trained_run, cifar, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # trained by train() alone: no eval/, no training_curves.png
    small = CIFAR10(train=cifar.train.subset(slice(0, 10)), test=cifar.test.subset(slice(0, 500)),
                    classes=cifar.classes, root=cifar.root)
    logged = []
    path = report.build_report(run, data=small, log=logged.append, settings=_quick("exercise"), images=[5],
                               explanations=QUICK_SETTINGS, map_points=100, cell_images=5)
    assert path == run / "report.html" and path.exists()
    assert (run / "eval" / "results.json").exists() and (run / "training_curves.png").exists()
    assert (run / "eval" / pipeline.PREDICTIONS_FILE).exists()
    assert any("evaluating" in line for line in logged)
    assert "100 of 500 test images (a random subsample, seed 0)" in path.read_text()
    logged.clear()
    report.build_report(run, data=small, log=logged.append, settings=_quick("exercise"), images=[5],
                        explanations=False)  # the explanations were checked above: only the reuse is tested here
    assert json.loads((run / "eval" / "results.json").read_text())["num_images"] == 500
    assert not any("evaluating" in line for line in logged)  # results.json and the predictions reused


def test_report_errors(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing"), "--no-download"]) == cli.EXIT_ERROR
    assert "not a run folder" in capsys.readouterr().err
    with pytest.raises(report.ReportError):
        report.build_report(tmp_path / "missing")
    with pytest.raises(report.ReportError, match="unknown map method 'tsne'"):
        report.build_report(tmp_path, map_method="tsne")


def test_pca_map_is_the_top_two_principal_components():
    rng = np.random.default_rng(0)
    # two clusters apart along one direction of a 20-D space, plus small noise in all directions
    direction = rng.normal(size=20)
    x = rng.normal(scale=0.1, size=(400, 20)) + np.outer(np.repeat([-1.0, 1.0], 200), direction)
    xy, how = report.project_2d(x, "pca")
    cov_eigen = np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1]
    assert np.allclose(xy.var(0, ddof=1), cov_eigen[:2])   # the variances of the top two components
    assert abs(np.corrcoef(xy[:, 0], np.repeat([-1.0, 1.0], 200))[0, 1]) > 0.99  # the clusters along PC1
    share = cov_eigen[:2].sum() / cov_eigen.sum()
    assert f"explain {100 * share:.1f}% of their variance" in how
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(report.ReportError, match="pip install umap-learn"):
            report.project_2d(x, "umap")
    else:
        assert report.project_2d(x, "umap")[0].shape == (400, 2)


def _sections_html(sections) -> str:
    return templates.environment().from_string(
        '{% import "macros.html" as m %}{% for s in sections %}{{ m.section(s) }}{% endfor %}').render(
        sections=sections)


# Validation accuracy peaks at epoch 5 and falls while training accuracy climbs: over-fitting.
OVERFIT_HISTORY = [{"epoch": i + 1, "train_loss": tl, "train_acc": ta, "val_loss": vl, "val_acc": va, "lr": 0.01,
                    "seconds": 1.0, "images_per_s": 1000.0}
                   for i, (ta, va, tl, vl) in enumerate(zip([.60, .75, .85, .92, .96, .971],
                                                            [.58, .70, .76, .80, .804, .788],
                                                            [1.1, .7, .45, .25, .12, .08],
                                                            [1.2, .85, .7, .62, .68, .8]))]


def test_report_diagnoses_the_training_curves(tmp_path):
    """A real checkpoint (untrained weights, no training: the section only reads the meta) whose history over-fits."""
    model = build_model("exercise")
    classes = [f"c{i}" for i in range(10)]
    meta = {"architecture": model.declaration, "classes": classes, "epoch": 6, "val_source": "test set",
            "normalization": Normalization.named("exercise").to_dict(), "history": OVERFIT_HISTORY,
            "val_size": 10_000}
    ckpt = checkpoints.load_checkpoint(checkpoints.save_checkpoint(tmp_path / "ckpt", model, meta))
    results = {"accuracy": .79, "loss": .8, "num_images": 10_000, "classes": classes,
               "per_class_accuracy": dict.fromkeys(classes, .79)}
    page = _sections_html(report._numbers_sections(tmp_path, ckpt, results, None))
    assert page.index('<section id="curves">') < page.index('<section id="diagnosis">') < page.index(
        '<section id="confusion">')
    section = re.search(r'<section id="diagnosis">.*?</section>', page, re.S).group(0)
    findings = diagnose(OVERFIT_HISTORY, 10_000, "test set")
    assert [f.kind for f in findings] == ["overfitting"]
    assert html.escape(findings[0].text) in section and "97.10%" in section and "Over-fitting" in section
    # the trainer's stored diagnosis wins, and its text is escaped like every other
    ckpt.meta["diagnosis"] = [{"kind": "overfitting", "text": "<img src=x onerror=alert(1)>", "numbers": {}}]
    section = _sections_html([report._diagnosis_section(ckpt)])
    assert "&lt;img src=x onerror=alert(1)&gt;" in section and "<img" not in section
    # without the validation set's size the 2-standard-error rule cannot be applied: a one-line note
    del ckpt.meta["diagnosis"], ckpt.meta["val_size"]
    section = _sections_html([report._diagnosis_section(ckpt)])
    assert "not diagnosed" in section and "Over-fitting" not in section


def test_every_block_escapes_what_it_shows():
    """Intros, texts, table cells, alt texts, list items: values read from files are text, never markup."""
    bad = '<script>x</script> & "more"'
    section = {"id": "curves", "title": bad, "intro": bad, "blocks": [
        report._text(bad), report._text(bad, "strong"), report._text(bad, "h3"), report._text(bad, "pre"),
        report._table([bad], [[bad, bad]]), {"kind": "list", "items": [bad]},
        {"kind": "figure", "src": "data:image/png;base64,AAAA", "alt": bad},
        {"kind": "parts", "parts": [(bad, True), (bad, False)]}, {"kind": "cards", "items": [(bad, bad)]}]}
    out = _sections_html([section])
    assert "<script" not in out and '"more"' not in out
    assert out.count("&lt;script&gt;x&lt;/script&gt; &amp; &#34;more&#34;") == 15  # every string of the section


def test_malformed_explanation_numbers_are_a_note_not_a_traceback(tmp_path):
    """summary.json is a file anyone can edit: numbers of the wrong shape end in a note in the page."""
    for explained in ({"enabled": True}, {"enabled": True, "settings": {"methods": ["saliency"]},
                                          "faithfulness": {"methods": {"saliency": {"deletion_auc": "x"}}}}):
        out = report.VisualOutputs(tmp_path, {}, {}, "default", 0.0, explained)
        sections = report._explanation_sections(out)
        assert [s["id"] for s in sections] == ["explanations", "examples"]
        assert "are malformed" in sections[0]["blocks"][0]["text"] and "re-run cifarlab visualize" in _sections_html(
            sections)


# ---------------------------------------------------------------------------------------------------
# In a real browser


def _chrome(profile: Path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(f"the report test needs headless Chromium: apt-get install chromium chromium-driver "
                    f"({CHROMIUM}, {CHROMEDRIVER})")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = _chrome(tmp_path_factory.mktemp("profile"))
    yield driver
    driver.quit()


def _open(driver, path: Path) -> None:
    driver.get(path.resolve().as_uri())
    deadline = time.time() + 20
    while driver.execute_script("return document.readyState") != "complete" and time.time() < deadline:
        time.sleep(0.1)


def _requests(driver, page: Path | None = None) -> list[str]:
    """The URLs of the requests ``page`` made since the last call (DevTools network events; the browser's
    own chrome:// pages are not the report's)."""
    events = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    return [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"
            and page is not None and e["params"].get("documentURL") == page.resolve().as_uri()]


def _click(driver, element) -> None:
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def _cell(driver, t: int, p: int) -> tuple[str, list[int]]:
    _click(driver, driver.find_element("css selector", f'#confusion-table button[data-cell="{t},{p}"]'))
    heading = driver.find_element("id", "cell-heading").text
    shown = driver.execute_script(
        "return Array.from(document.querySelectorAll('#cell-thumbs .thumb')).map(s => Number(s.dataset.index))")
    return heading, shown


def _hover(driver, k: int) -> tuple[int, str]:
    from selenium.webdriver.common.action_chains import ActionChains

    dot = driver.find_element("css selector", f'#feature-map circle[data-k="{k}"]')
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", dot)
    ActionChains(driver).move_to_element(dot).perform()
    tip = driver.find_element("id", "map-tip")
    assert tip.is_displayed()
    return int(tip.get_attribute("data-index")), tip.text


@pytest.mark.browser
def test_report_renders_in_a_browser(cli_run, browser, tmp_path):
    driver = browser
    _requests(driver)
    _open(driver, path := cli_run / "report.html")
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(images) >= 12
    broken = [alt for alt, complete, w, h in images if not complete or w == 0 or h == 0]
    assert not broken, f"images that did not decode: {broken}"
    present = driver.execute_script("return Array.from(document.querySelectorAll('section')).map(s => s.id)")
    assert present == SECTION_IDS
    nav = driver.execute_script("return Array.from(document.querySelectorAll('nav a')).map(a => a.hash)")
    assert all(f"#{sid}" in nav for sid in NEW_SECTIONS)
    decoded = {alt for alt, complete, w, h in images if complete and w > 0 and h > 0}
    for alt in NEW_IMAGES:
        assert alt in decoded, alt
    assert any(alt.startswith("examples ") and alt != "examples classes" for alt in decoded)  # a conv layer
    calibration = driver.find_element("id", "calibration").text
    assert "after (T = " in calibration and "200 held-out training images" in calibration
    attributions = driver.find_element("id", "explanations").text
    for method in ("saliency", "smoothgrad", "integrated gradients", "occlusion", "grad cam", "grad cam pp"):
        assert method in attributions
    for sid in SECTION_IDS:  # every section shows something
        height = driver.execute_script(f"return document.getElementById('{sid}').offsetHeight")
        assert height > 40, sid
    # a full-page screenshot: size the window to the document first
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(height + 100, 16000))
    shot = tmp_path / "report.png"
    assert driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 50_000
    driver.set_window_size(1400, 1000)
    requested = _requests(driver, path)
    assert requested and all(url.startswith(("file:", "data:")) for url in requested), requested


@pytest.mark.browser
def test_a_click_on_a_confusion_cell_shows_exactly_its_images(cli_run, truth, browser):
    labels, predicted = truth
    counts = json.loads((cli_run / "eval" / "results.json").read_text())["confusion_matrix"]
    assert counts == confusion_matrix(labels, predicted, 10).tolist()
    _open(driver := browser, cli_run / "report.html")
    off_diagonal = max(((t, p) for t in range(10) for p in range(10) if t != p), key=lambda tp: counts[tp[0]][tp[1]])
    diagonal = max(((t, t) for t in range(10)), key=lambda tp: counts[tp[0]][tp[1]])
    for t, p in (off_diagonal, diagonal):
        heading, shown = _cell(driver, t, p)
        members = np.flatnonzero((labels == t) & (predicted == p))
        assert len(members) == counts[t][p] > 0
        assert shown == members[:report.CELL_IMAGES].tolist()  # exactly these images, in test-set order
        assert f"showing {len(shown)} of {counts[t][p]} test images" in heading
        assert f"True class {CIFAR10_NAMES[t]}, predicted {CIFAR10_NAMES[p]}" in heading
        sizes = driver.execute_script(
            "return Array.from(document.querySelectorAll('#cell-thumbs .thumb')).map(s => s.offsetWidth)")
        assert sizes == [64] * len(shown)
    button = driver.find_element("css selector", f'#confusion-table button[data-cell="{t},{p}"]')
    assert button.get_attribute("aria-pressed") == "true" and button.text == str(counts[t][p])


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.browser
def test_cells_past_the_cap_say_how_many_they_leave_out_and_the_map_hovers(cli_run, small, truth, browser, tmp_path):
    labels, predicted = truth
    inputs = _inputs(cli_run, small, cap=20, points=300)
    path = tmp_path / "capped.html"
    path.write_text(report.page(inputs))
    _open(driver := browser, path)
    counts = confusion_matrix(labels, predicted, 10)
    t, p = np.unravel_index(np.argmax(counts), counts.shape)
    assert counts[t, p] > 20
    heading, shown = _cell(driver, t, p)
    assert shown == np.flatnonzero((labels == t) & (predicted == p))[:20].tolist()
    assert f"showing 20 of {counts[t, p]} test images (the first 20 in test-set order)" in heading
    # the feature map: 300 points, each hover shows that test image with its true and predicted class
    assert len(driver.find_elements("css selector", "#feature-map circle")) == 300
    assert "300 of 1,000 test images (a random subsample, seed 0)" in driver.find_element("id", "map").text
    for k in (0, 150, 299):
        index, text = _hover(driver, k)
        assert text.startswith(f"#{index} · true: {CIFAR10_NAMES[labels[index]]} · predicted: "
                               f"{CIFAR10_NAMES[predicted[index]]} (p = ")
        thumb = driver.find_element("css selector", "#map-tip-thumb .thumb")
        assert thumb.get_attribute("data-index") == str(index) and thumb.size["width"] == 96


@pytest.mark.browser
def test_each_stimulus_has_its_channel_page(cli_run, browser):
    _open(driver := browser, cli_run / "report.html")
    layers = json.loads((cli_run / "visualize" / "summary.json").read_text())["explanations"]["examples"]["layers"]
    layer = "leaky_re_lu_2"
    link = driver.find_element("css selector", f'a.channel-link[title="{layer}: channel #5"]')
    index = int(link.get_attribute("href").split("#ch-")[1].split("-")[0])
    _click(driver, link)
    page = driver.find_element("id", f"ch-{index}-5")
    assert page.is_displayed() and driver.execute_script("return location.hash") == f"#ch-{index}-5"
    assert f"{layer}: channel #5" in page.find_element("tag name", "h2").text
    stimulus = page.find_element("css selector", ".stimulus")
    assert stimulus.size == {"width": 192, "height": 192}
    shown = [int(e.get_attribute("data-index")) for e in page.find_elements("css selector", "figcaption")]
    assert shown == layers[layer]["top_indices"][5] and len(shown) == 9
    ratio = layers[layer]["stimulus_ratio"][5]
    assert f"×{ratio:.2f}" in page.text
    # other pages stay hidden; arrow keys walk the channels, Escape goes back
    assert not driver.find_element("id", f"ch-{index}-6").is_displayed()
    from selenium.webdriver.common.keys import Keys

    driver.find_element("tag name", "body").send_keys(Keys.ARROW_RIGHT)
    assert driver.execute_script("return location.hash") == f"#ch-{index}-6"
    assert driver.find_element("id", f"ch-{index}-6").is_displayed() and not page.is_displayed()
    driver.find_element("tag name", "body").send_keys(Keys.ESCAPE)
    assert driver.execute_script("return location.hash") == "#stimuli"
    # the class targets have pages named by class
    assert driver.find_element("css selector", 'article[aria-label="classes: frog"]').get_attribute("id").endswith("-6")


def _rename(value, names: dict):
    """``value`` with every class name replaced, in strings and in keys."""
    if isinstance(value, dict):
        return {names.get(k, k): _rename(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_rename(v, names) for v in value]
    return names.get(value, value) if isinstance(value, str) else value


@pytest.mark.browser
def test_hostile_names_are_text_in_the_page(cli_run, small, truth, browser, tmp_path):
    """Class names, the run folder's name, a recipe value and a stored diagnosis that try to be markup."""
    labels, predicted = truth
    hostile = HOSTILE + CIFAR10_NAMES[len(HOSTILE):]
    run = tmp_path / HOSTILE[1].replace("/", "")  # a folder name cannot hold "/"
    shutil.copytree(cli_run, run, ignore=shutil.ignore_patterns("report.html"))
    recipe = dict(checkpoints.load_checkpoint(run).meta["recipe"], name=HOSTILE[0])
    inputs = _inputs(run, small, 20, 200, names=dict(zip(CIFAR10_NAMES, hostile)), recipe=recipe,
                     diagnosis=[{"kind": "x", "text": HOSTILE[1], "numbers": {}}])
    page = report.page(inputs)
    for name in HOSTILE:
        assert name not in page  # not even inside the JSON data: "<" is written \u003c there
    assert str(escape(HOSTILE[0])) in page and str(escape(HOSTILE[2])) in page
    path = tmp_path / "hostile.html"
    path.write_text(page)
    _requests(driver := browser)
    _open(driver, path)
    assert driver.execute_script("return window.__pwned") is None
    assert driver.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    assert driver.execute_script("return document.scripts.length") == 3  # the page's own
    assert HOSTILE[1].replace("/", "") in driver.find_element("tag name", "h1").text
    headers = driver.execute_script(
        "return Array.from(document.querySelectorAll('#confusion-table thead th')).map(h => h.title)")
    assert headers[1:4] == hostile[:3]  # each whole name, as text
    assert driver.execute_script("return document.documentElement.scrollWidth") < 3000  # wrapped or clipped
    counts = confusion_matrix(labels, predicted, 10)
    t, p = max(((t, p) for t in range(3) for p in range(3) if t != p), key=lambda tp: counts[tp])
    heading, shown = _cell(driver, t, p)
    assert heading.startswith(f"True class {hostile[t]}, predicted {hostile[p]}: showing")
    assert shown == np.flatnonzero((labels == t) & (predicted == p))[:20].tolist()
    for k in range(0, 200, 40):
        index, text = _hover(driver, k)
        assert f"true: {hostile[labels[index]]}" in text
    assert HOSTILE[0] in driver.find_element("id", "recipe").text
    assert HOSTILE[1] in driver.find_element("id", "diagnosis").text
    assert driver.execute_script("return window.__pwned") is None
    requested = _requests(driver, path)
    assert requested and all(url.startswith(("file:", "data:")) for url in requested), requested
