"""report.html: built at the end of ``cifarlab run``, self-contained, and rendered by a real browser."""
from __future__ import annotations

import html
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from cifarlab import checkpoints, cli, explain, report, visualize
from cifarlab.cli import train as cli_train
from cifarlab.data import CIFAR10
from cifarlab.doctor import diagnose
from cifarlab.models import build_model
from cifarlab.transforms import Normalization

SECTION_IDS = [sid for sid, _ in report.SECTIONS]
NEW_SECTIONS = ["quality", "calibration", "shift", "explanations", "examples"]  # issue 12
NEW_IMAGES = ["reliability diagram", "attribution maps of every method", "deletion and insertion curves",
              "cascading randomization", "examples classes"]
# few images and steps: the tests check the plumbing; the README gives the defaults' cost
QUICK_EXPLAIN = ["--faithfulness-images", "12", "--faithfulness-steps", "4", "--sanity-images", "4",
                 "--example-images", "300"]
QUICK_SETTINGS = explain.ExplainSettings(faithfulness_images=12, faithfulness_steps=4, sanity_images=4,
                                         example_images=300)
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


_FOR_METHOD = visualize.StimulusSettings.for_method


def _quick(method="default", **overrides):
    """Few ascent steps: the tests check the plumbing, bench/ measures the real settings."""
    return _FOR_METHOD(method, **dict(overrides, steps=overrides.get("steps") or 4))


@pytest.fixture(scope="module")
def cli_run(cifar, tmp_path_factory):
    """``cifarlab run`` end to end (train -> evaluate -> report) on 2,000 training images."""
    small = CIFAR10(train=cifar.train.subset(slice(0, 2000)), test=cifar.test.subset(slice(0, 1000)),
                    classes=cifar.classes, root=cifar.root)
    runs = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_train, "load_data", lambda args, **kwargs: small)
        mp.setattr(visualize.StimulusSettings, "for_method", staticmethod(_quick))
        rc = cli.main(["run", "--epochs", "1", "--batch-size", "64", "--runs-dir", str(runs), "--name", "r",
                       "--no-progress", "--threads", "2", "--val-split", "200", *QUICK_EXPLAIN])
    assert rc == 0
    return runs / "r"


def test_run_writes_a_self_contained_report(cli_run):
    page = (cli_run / "report.html").read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in page
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) >= 12 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from the network
    assert "<script" not in page and "Not available" not in page
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


def test_build_report_fills_in_what_is_missing(trained_run, cifar, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # trained by train() alone: no eval/, no training_curves.png
    small = CIFAR10(train=cifar.train.subset(slice(0, 10)), test=cifar.test.subset(slice(0, 500)),
                    classes=cifar.classes, root=cifar.root)
    logged = []
    path = report.build_report(run, data=small, log=logged.append, settings=_quick("exercise"), images=[5],
                               explanations=QUICK_SETTINGS)
    assert path == run / "report.html" and path.exists()
    assert (run / "eval" / "results.json").exists() and (run / "training_curves.png").exists()
    assert any("evaluating" in line for line in logged)
    logged.clear()
    report.build_report(run, data=small, log=logged.append, settings=_quick("exercise"), images=[5],
                        explanations=QUICK_SETTINGS)
    assert json.loads((run / "eval" / "results.json").read_text())["num_images"] == 500
    assert not any("evaluating" in line for line in logged)  # results.json reused


def test_report_errors(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing"), "--no-download"]) == cli.EXIT_ERROR
    assert "not a run folder" in capsys.readouterr().err
    with pytest.raises(report.ReportError):
        report.build_report(tmp_path / "missing")


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
    page = "".join(report._numbers_sections(tmp_path, ckpt, results, None))
    assert page.index('<section id="curves">') < page.index('<section id="diagnosis">') < page.index(
        '<section id="confusion">')
    section = re.search(r'<section id="diagnosis">.*?</section>', page).group(0)
    findings = diagnose(OVERFIT_HISTORY, 10_000, "test set")
    assert [f.kind for f in findings] == ["overfitting"]
    assert html.escape(findings[0].text) in section and "97.10%" in section and "Over-fitting" in section
    # the trainer's stored diagnosis wins, and its text is escaped like every other
    ckpt.meta["diagnosis"] = [{"kind": "overfitting", "text": "<img src=x onerror=alert(1)>", "numbers": {}}]
    section = report._diagnosis_section(ckpt)
    assert "&lt;img src=x onerror=alert(1)&gt;" in section and "<img" not in section
    # without the validation set's size the 2-standard-error rule cannot be applied: a one-line note
    del ckpt.meta["diagnosis"], ckpt.meta["val_size"]
    section = report._diagnosis_section(ckpt)
    assert "not diagnosed" in section and "Over-fitting" not in section


def test_section_intros_are_escaped():
    """Intros carry values read from files (the validation source, results.json, summary.json)."""
    section = report._section("curves", "<p>body</p>", 'validation on the <script>x</script> & "more"')
    assert "<script" not in section and "&lt;script&gt;x&lt;/script&gt; &amp; &quot;more&quot;" in section
    assert "<p>body</p>" in section  # the body is HTML built by the report itself


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
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.browser
def test_report_renders_in_a_browser(cli_run, tmp_path):
    driver = _chrome(tmp_path / "profile")
    try:
        driver.get((cli_run / "report.html").resolve().as_uri())
        deadline = time.time() + 20
        while driver.execute_script("return document.readyState") != "complete" and time.time() < deadline:
            time.sleep(0.1)
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        assert len(images) >= 12
        broken = [alt for alt, complete, w, h in images if not complete or w == 0 or h == 0]
        assert not broken, f"images that did not decode: {broken}"
        present = driver.execute_script("return Array.from(document.querySelectorAll('section')).map(s => s.id)")
        assert present == SECTION_IDS
        assert all(sid in present for sid in NEW_SECTIONS)
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
        shutil.copyfile(shot, "/tmp/report_screenshot.png")
        assert shot.stat().st_size > 50_000
    finally:
        driver.quit()
