"""`cifarlab explore`: a real uvicorn server on loopback, driven over HTTP (urllib) and by headless Chromium,
on a small run trained on real CIFAR-10; every answer is checked against the library computed independently
(predict, explain_photos, the OOD detector, activation maps, stimuli, top-activating images)."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab import ood
from cifarlab.cli import main
from cifarlab.explain.examples import activations
from cifarlab.explain.photo import explain_photos
from cifarlab.explore import ExploreError, Explorer, create_app
from cifarlab.explore.app import render_page
from cifarlab.explore.server import check_host, is_loopback, running
from cifarlab.images import load_image
from cifarlab.net_layers import stimulus_targets
from cifarlab.predict import predict_images
from cifarlab.transforms import Normalization
from cifarlab.visualize import StimulusSettings, activation_maps, maximum_stimuli

N_TRAIN, VAL_SPLIT = 1500, 300
UPLOAD_LIMIT = 300_000  # bytes: small, so the 413 tests send little
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "photos" / "hymenoptera_data"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
EXPLORE_JS = Path(__file__).resolve().parents[1] / "src" / "cifarlab" / "explore" / "static"


def _quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def run(cifar, tmp_path_factory):
    """The exercise net, 1 epoch on the first 1,500 training images, 300 held out (a temperature is fitted)."""
    from cifarlab.train import recipe_from, train

    torch.manual_seed(0)
    data = cifar.with_train(cifar.train.subset(slice(0, N_TRAIN)), f"first {N_TRAIN}")
    run_dir = tmp_path_factory.mktemp("explore") / "run"
    train(recipe_from("exercise", epochs=1, val_split=VAL_SPLIT, seed=0), data, run_dir, progress=False, log=_quiet)
    return run_dir


@pytest.fixture(scope="module")
def explorer(run, data_dir):
    """Loaded the way the CLI loads it: the data the run recorded (load_stored), its feature bank built once."""
    return Explorer.open(run, data_dir=data_dir, log=_quiet)


@pytest.fixture(scope="module")
def url(explorer):
    with running(create_app(explorer=explorer, max_upload_bytes=UPLOAD_LIMIT)) as address:
        yield address


@pytest.fixture(scope="module")
def photos(cifar, tmp_path_factory):
    """A real ant photo (JPEG), a JPEG cut in half, a PNG with a hostile name, a decompression bomb's header."""
    folder = tmp_path_factory.mktemp("uploads")
    ant = sorted((PHOTOS / "val" / "ants").glob("*.jpg"))[0]
    broken = folder / "broken.jpg"
    broken.write_bytes(ant.read_bytes()[: ant.stat().st_size // 2])
    hostile = folder / '"><img src=x onerror=alert(1)>.png'
    Image.fromarray(cifar.test.images[5].permute(1, 2, 0).numpy()).save(hostile)
    bomb = folder / "bomb.png"
    bomb.write_bytes(_png_header(60_000, 60_000))
    return {"ant": ant, "broken": broken, "hostile": hostile, "bomb": bomb}


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with no pixel data at all."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------------
# HTTP helpers (urllib; real requests to the real server)


def _multipart(filename: str, body: bytes, field: str = "photo") -> tuple[bytes, str]:
    boundary = "cifarlab-test-boundary-7f3a"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + body + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _request(url: str, data=None, headers=None, method=None) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def _upload(url: str, filename: str, body: bytes) -> tuple[int, dict]:
    data, content_type = _multipart(filename, body)
    status, answer, _ = _request(url + "api/photo", data, {"Content-Type": content_type})
    return status, answer


def _pixels(uri: str) -> torch.Tensor:
    assert uri.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def _expected_layers(explorer, image) -> dict[str, torch.Tensor]:
    """Each layer's maps scaled as the page gets them: the non-negative part over the layer's maximum, 0..255."""
    maps = activation_maps(explorer.model, image, explorer.normalization)
    return {k: (v.clamp_min(0) / float(v.clamp_min(0).max()) * 255).round().to(torch.uint8) for k, v in maps.items()}


# ---------------------------------------------------------------------------------------------------
# Over HTTP


def test_an_uploaded_photo_gets_what_predict_and_explain_compute(explorer, url, photos):
    status, answer = _upload(url, photos["ant"].name, photos["ant"].read_bytes())
    assert status == 200, answer
    image = load_image(photos["ant"], 32)
    ckpt, detector = explorer.ckpt, explorer.detector
    # calibrated top classes: exactly predict's (the run has a temperature)
    expected = predict_images(ckpt, image[None], 5)[0]
    assert explorer.temperature and answer["temperature"] == explorer.temperature
    assert [p["class"] for p in answer["predictions"]] == [p["class"] for p in expected]
    assert [p["probability"] for p in answer["predictions"]] == pytest.approx([p["probability"] for p in expected])
    # the picture as the net sees it: the safe reader's pixels, losslessly
    assert torch.equal(_pixels(answer["image"]), image)
    # the verdict: the detector's own KNN score and threshold
    score = float(detector.score(image[None])[ood.FLAG_SCORE][0])
    assert answer["ood"] == pytest.approx(detector.entry(score))
    assert answer["verdict"].startswith("UNLIKE ANY CLASS" if score < detector.threshold else "like the training")
    # attribution maps and neighbours: the same as explain_photos (predict --explain) gives
    reference = explain_photos(ckpt, image[None], ["ant"], [expected], detector)[0]
    maps, layer = explorer._attributions(image[None], ckpt.meta["classes"].index(expected[0]["class"]))
    assert list(maps) == list(reference.maps) == [m["method"] for m in answer["maps"]]
    for method, shown in zip(maps, answer["maps"]):
        assert torch.allclose(maps[method], reference.maps[method], atol=1e-5, rtol=1e-4), method
        assert _pixels(shown["image"]).shape == (3, 32, 32)
    assert layer == reference.layer == answer["gradcam_layer"] == "leaky_re_lu_4"
    assert [(n["index"], n["class"]) for n in answer["neighbours"]] == \
        [(n["index"], n["class"]) for n in reference.neighbours]
    for n in answer["neighbours"]:
        assert torch.equal(_pixels(n["image"]), explorer.train.images[n["index"]])
    assert answer["agree"] == reference.agree
    # every layer's activation maps, byte for byte
    expected_layers = _expected_layers(explorer, image)
    assert [x["name"] for x in answer["layers"]] == list(expected_layers) == \
        [t.name for t in stimulus_targets(explorer.model) if t.spatial]
    for x in answer["layers"]:
        got = torch.frombuffer(bytearray(base64.b64decode(x["data"])), dtype=torch.uint8)
        assert torch.equal(got.view(x["channels"], x["height"], x["width"]), expected_layers[x["name"]])


def test_a_test_image_by_index_and_bad_indices(explorer, url):
    n = len(explorer.data.test)
    for i in (0, n - 1):
        status, answer, _ = _request(url + f"api/test?index={i}")
        assert status == 200, answer
        assert answer["true_class"] == explorer.classes[int(explorer.data.test.labels[i])]
        assert torch.equal(_pixels(answer["image"]), explorer.data.test.images[i])
        assert answer["predictions"][0]["class"] == \
            predict_images(explorer.ckpt, explorer.data.test.images[i:i + 1], 1)[0][0]["class"]
    for bad in ("-1", str(n), "abc", "1e3", "", "99999999999999999999", "%D9%A3"):  # the last: Arabic-Indic 3
        status, answer, _ = _request(url + f"api/test?index={bad}")
        assert status == 400 and f"from 0 to {n - 1}" in answer["error"], (bad, answer)


def test_bad_uploads_get_one_line_messages_and_the_server_keeps_serving(url, photos):
    cases = {"broken.jpg": (photos["broken"].read_bytes(), "truncated or damaged"),
             "noise.jpg": (os.urandom(5000), "not an image file"),
             "empty.png": (b"", "empty"),
             "bomb.png": (photos["bomb"].read_bytes(), "decompression bomb")}
    for name, (body, reason) in cases.items():
        status, answer = _upload(url, name, body)
        assert status == 400, (name, answer)
        message = answer["error"]
        assert message.startswith(f"{name}: ") and reason in message and "\n" not in message, message
        assert "cifarlab-explore-" not in message  # the private temporary file is never named
    data, content_type = _multipart("x.png", b"abc", field="picture")
    status, answer, _ = _request(url + "api/photo", data, {"Content-Type": content_type})
    assert status == 400 and "field named 'photo'" in answer["error"]
    status, answer, _ = _request(url + "api/photo", b'{"photo": 1}', {"Content-Type": "application/json"})
    assert status == 400 and "field named 'photo'" in answer["error"]
    # too large: a declared length over the limit, and a chunked body (no length) counted while it is read
    data, content_type = _multipart("big.png", b"\0" * (UPLOAD_LIMIT + 70_000))
    status, answer, _ = _request(url + "api/photo", data, {"Content-Type": content_type})
    assert status == 413 and "up to 0.3 MB" in answer["error"]
    chunks = iter([data[i:i + 65536] for i in range(0, len(data), 65536)])
    status, answer, _ = _request(url + "api/photo", chunks, {"Content-Type": content_type})
    assert status == 413 and "up to 0.3 MB" in answer["error"]
    # and the next upload is answered as usual
    status, answer = _upload(url, photos["ant"].name, photos["ant"].read_bytes())
    assert status == 200 and answer["predictions"] and answer["name"] == photos["ant"].name


def test_a_channel_shows_its_stimulus_and_the_training_images_that_excite_it_most(explorer, url):
    layer, c = "leaky_re_lu_2", 5
    status, answer, _ = _request(url + f"api/channel?layer={layer}&channel={c}")
    assert status == 200, answer
    model, normalization = explorer.model, explorer.normalization
    target = explorer.targets[layer]
    # the stimulus is the one `visualize` makes for this channel in a full run of the layer (same seed)
    whole_layer = maximum_stimuli(model, target, normalization, StimulusSettings(), 0)
    assert torch.equal(_pixels(answer["stimulus"]), whole_layer.images[c])
    # the training images: brute force over the first N (all 1,500 here), highest mean activation first
    images = explorer.train.images[:answer["examples_from"]]
    assert answer["examples_from"] == N_TRAIN
    values = activations(model, images, normalization, layer)[:, c]
    best = torch.sort(values, descending=True, stable=True).indices[:9].tolist()
    assert [e["index"] for e in answer["examples"]] == best
    assert [e["activation"] for e in answer["examples"]] == pytest.approx(values[best].tolist(), rel=1e-4, abs=1e-5)
    assert [e["class"] for e in answer["examples"]] == [explorer.classes[int(explorer.train.labels[i])] for i in best]
    assert answer["ratio"] == pytest.approx(answer["stimulus_activation"] / float(values[best[0]]))
    # a class: its stimulus and the training images with the highest logit
    status, answer, _ = _request(url + "api/channel?layer=classes&channel=3")
    assert status == 200 and answer["class"] == explorer.classes[3]
    logits = activations(model, images, normalization, "classes")[:, 3]
    best = torch.sort(logits, descending=True, stable=True).indices[:9].tolist()
    assert [e["index"] for e in answer["examples"]] == best
    for query, words in ((f"layer=conv9&channel=0", "no layer 'conv9' to explore; the layers are leaky_re_lu_1"),
                         (f"layer={layer}&channel=32", "channel must be a whole number from 0 to 31"),
                         (f"layer={layer}&channel=x", "from 0 to 31"), ("layer=classes&channel=10", "from 0 to 9")):
        status, answer, _ = _request(url + f"api/channel?{query}")
        assert status == 400 and words in answer["error"], (query, answer)


def test_heavy_work_leaves_the_event_loop_free_and_one_lock_keeps_answers_apart(explorer, url, photos):
    """While the model's lock is held (as by a long request), the server still answers what needs no model,
    the upload waits its turn; three pictures explained at once get each its own activations."""
    answers = {}

    def upload(key, path):
        answers[key] = _upload(url, path.name, path.read_bytes())

    with explorer.lock:
        waiting = threading.Thread(target=upload, args=("held", photos["ant"]))
        waiting.start()
        status, info, _ = _request(url + "api/info")
        assert status == 200 and info["classes"] == explorer.classes
        time.sleep(0.3)
        assert waiting.is_alive() and "held" not in answers  # it waits for the model, not the event loop
    waiting.join(120)
    assert answers["held"][0] == 200
    workers = [threading.Thread(target=upload, args=(k, photos[k])) for k in ("ant", "hostile")]
    workers.append(threading.Thread(target=lambda: answers.__setitem__("test", _request(url + "api/test?index=7")[:2])))
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    pictures = {"ant": load_image(photos["ant"], 32), "hostile": load_image(photos["hostile"], 32),
                "test": explorer.data.test.images[7]}
    for key, image in pictures.items():
        status, answer = answers[key]
        assert status == 200, answer
        expected = _expected_layers(explorer, image)
        for x in answer["layers"]:
            got = torch.frombuffer(bytearray(base64.b64decode(x["data"])), dtype=torch.uint8)
            assert torch.equal(got.view(x["channels"], x["height"], x["width"]), expected[x["name"]]), key
    assert answers["hostile"][1]["name"] == photos["hostile"].name  # a name is data: the page sets it as text


def test_host_check_security_headers_and_nothing_from_elsewhere(explorer, url):
    page = urllib.request.urlopen(url, timeout=30)
    html, headers = page.read().decode(), page.headers
    assert "default-src 'self'" in headers["Content-Security-Policy"] and "script-src 'self'" in \
        headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert explorer.ckpt.meta["classes"][0] in html
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sources and all(s.startswith(("/static/", "data:")) for s in sources), sources
    for text in (html, (EXPLORE_JS / "explore.js").read_text(), (EXPLORE_JS / "explore.css").read_text()):
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), "a URL to another host"
        assert "@import" not in text and "url(" not in text
    status, answer, _ = _request(url + "api/info", headers={"Host": "attacker.example:80"})
    assert status == 421 and "answers to 127.0.0.1" in answer["error"]  # DNS rebinding gets nothing
    for host in ("localhost:1", "127.0.0.1", "[::1]:8765"):
        assert _request(url + "api/info", headers={"Host": host})[0] == 200
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("127.8.9.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.1")
    assert check_host("localhost", False) is False and check_host("0.0.0.0", True) is True


def test_a_hostile_name_in_the_run_is_text_in_the_page(explorer):
    """Class names and the run's path come from files: the template escapes them, the JSON block too."""
    import copy

    other = copy.copy(explorer)
    other.classes = ["</script><script>alert(1)</script>", *explorer.classes[1:]]
    other.notes = ["<img src=x onerror=alert(1)>"]
    html = render_page(other, UPLOAD_LIMIT)
    assert "<script>alert(1)" not in html and "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "\\u003c/script\\u003e" in html


def test_without_the_runs_data_it_still_explains_and_says_what_is_missing(run, photos, tmp_path, monkeypatch):
    monkeypatch.delenv("CIFARLAB_DATA", raising=False)
    lonely = Explorer.open(run, data_dir=tmp_path, log=_quiet)  # an empty folder: no CIFAR-10 there
    try:
        assert lonely.data is None and lonely.detector is None
        assert "the run's data is unavailable" in lonely.notes[0] and str(tmp_path) in lonely.notes[0]
        answer = lonely.explain_file(photos["ant"], photos["ant"].name)
        image = load_image(photos["ant"], 32)
        assert answer["predictions"][0]["class"] == predict_images(lonely.ckpt, image[None], 1)[0][0]["class"]
        assert answer["neighbours"] == [] and answer["ood"] is None and answer["verdict"].startswith("no out-of")
        assert [m["method"] for m in answer["maps"]] == ["integrated_gradients", "grad_cam"]
        assert lonely.channel("leaky_re_lu_1", 0)["examples"] == []
        with pytest.raises(ExploreError, match="no test images"):
            lonely.explain_test(0)
        html = render_page(lonely, UPLOAD_LIMIT)
        assert 'id="test-form"' not in html and "the run&#39;s data is unavailable" in html
    finally:
        lonely.close()


# ---------------------------------------------------------------------------------------------------
# The command


def test_the_command_refuses_a_remote_host_and_a_taken_port(run, capsys):
    assert main(["explore", str(run), "--host", "0.0.0.0", "--no-browser"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        assert main(["explore", str(run), "--port", str(taken.getsockname()[1]), "--no-browser"]) == 2
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1 port {taken.getsockname()[1]}" in err and "--port 0" in err
    finally:
        taken.close()
    assert main(["explore", str(run.parent / "nothing-here"), "--port", "0", "--no-browser"]) == 2
    assert "no checkpoint there" in capsys.readouterr().err


def test_the_command_serves_until_ctrl_c(run, explorer, data_dir, photos):
    env = dict(os.environ, CIFARLAB_DATA=str(data_dir), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "cifarlab", "explore", str(run), "--port", "0", "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        found = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        assert found, (line, proc.stderr.read() if proc.poll() is not None else "")
        status, answer = _upload(found.group(1), photos["ant"].name, photos["ant"].read_bytes())
        assert status == 200 and answer["predictions"][0]["class"] == \
            predict_images(explorer.ckpt, load_image(photos["ant"], 32)[None], 1)[0][0]["class"]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "stopped" in err and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------------
# In a real browser


def _chrome(profile: Path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(f"the explorer's browser test needs headless Chromium: apt-get install chromium chromium-driver "
                    f"({CHROMIUM}, {CHROMEDRIVER})")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _wait_done(driver, n: int, timeout: float = 120) -> None:
    """Until the page has finished its n-th request (the page counts them in body[data-done])."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if int(driver.execute_script("return document.body.dataset.done") or 0) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"the page did not finish request {n} in {timeout} s")


def _decoded(driver, selector: str) -> list[tuple[bool, int]]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(i => [i.complete, i.naturalWidth])", selector)


@pytest.mark.browser
def test_the_explorer_in_a_browser(explorer, url, photos, tmp_path):
    driver = _chrome(tmp_path / "profile")
    try:
        driver.get(url)
        deadline = time.time() + 20
        while driver.execute_script("return document.body.dataset.state") != "ready" and time.time() < deadline:
            time.sleep(0.1)
        assert driver.find_element("id", "run").text.startswith("run ")
        upload = driver.find_element("id", "file-input")
        # an uploaded JPEG (a real photo) gets a prediction, maps, activations and neighbours
        upload.send_keys(str(photos["ant"]))
        _wait_done(driver, 1)
        assert not driver.find_element("id", "error").is_displayed()
        expected = predict_images(explorer.ckpt, load_image(photos["ant"], 32)[None], 5)[0]
        rows = driver.find_elements("css selector", "#top-classes li")
        assert [r.find_element("css selector", "button").text for r in rows] == [p["class"] for p in expected]
        assert rows[0].find_element("css selector", ".percent").text == f"{100 * expected[0]['probability']:.1f}%"
        assert driver.find_element("id", "verdict").text.startswith(("like the training", "UNLIKE ANY CLASS"))
        for selector, count in (("#maps img", 2), ("#neighbours img", 5), ("#as-seen", 1), ("#original", 1)):
            shown = _decoded(driver, selector)
            assert len(shown) == count and all(ok and width > 0 for ok, width in shown), (selector, shown)
        channels = sum(t.channels for t in explorer.targets.values() if t.spatial)
        assert len(driver.find_elements("css selector", "#layers button.channel canvas")) == channels
        # a click on a channel: its stimulus and its top training images
        button = driver.find_element("css selector", 'button.channel[data-layer="leaky_re_lu_2"][data-channel="5"]')
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
        button.click()
        _wait_done(driver, 2)
        assert driver.find_element("id", "channel-heading").text == "leaky_re_lu_2, channel 5"
        assert all(ok and w > 0 for ok, w in _decoded(driver, "#stimulus, #examples img"))
        values = activations(explorer.model, explorer.train.images, explorer.normalization, "leaky_re_lu_2")[:, 5]
        best = torch.sort(values, descending=True, stable=True).indices[:9].tolist()
        captions = [f.text for f in driver.find_elements("css selector", "#examples figcaption")]
        assert [int(c.split()[0][1:]) for c in captions] == best
        # a broken upload: one clear message, and the next upload works
        upload.send_keys(str(photos["broken"]))
        _wait_done(driver, 3)
        error = driver.find_element("id", "error")
        assert error.is_displayed() and error.text.startswith("broken.jpg: ") and "truncated or damaged" in error.text
        assert not driver.find_element("id", "results").is_displayed()
        upload.send_keys(str(photos["hostile"]))
        _wait_done(driver, 4)
        assert not error.is_displayed()
        assert driver.find_elements("css selector", "#top-classes li")
        assert photos["hostile"].name in driver.find_element("id", "seen-caption").text  # the name, as text
        assert not driver.find_elements("css selector", 'img[src="x"]')
        # a test image by index
        box = driver.find_element("id", "test-index")
        box.clear()
        box.send_keys("7")
        driver.find_element("id", "test-button").click()
        _wait_done(driver, 5)
        assert driver.find_element("id", "true-class").text == \
            f"true class: {explorer.classes[int(explorer.data.test.labels[7])]}"
        shot = tmp_path / "explore.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 50_000
        # everything the page requested came from the explorer itself (or from memory: data:, blob:)
        events = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
        requested = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"
                     and e["params"].get("documentURL", "").startswith(url)]
        assert {url, url + "static/explore.js", url + "static/explore.css", url + "api/photo"} <= set(requested)
        assert all(u.startswith((url, "data:", "blob:")) for u in requested), requested
        problems = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "/api/photo" not in e["message"]]
        assert not problems, problems  # (the broken upload's 400 is logged by Chromium; nothing else)
    finally:
        driver.quit()
