"""The web page in a real headless browser (Debian's chromium, driven by Selenium).

Types a prompt, generates with a tiny model, sees the image and its parameters, and cancels a
queued job from the queue list. Needs /usr/bin/chromium and /usr/bin/chromedriver (bin/test
installs them); set EMAKI_SKIP_BROWSER=1 to skip on a machine that cannot have them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from emaki.models.tiny import make_tiny_bundle
from emaki.pipelines.txt2img import Pipeline
from emaki.server.app import create_app
from emaki.server.config import ServerConfig

if os.environ.get("EMAKI_SKIP_BROWSER") == "1":
    pytest.skip("EMAKI_SKIP_BROWSER=1", allow_module_level=True)

SHOTS = Path(os.environ.get("EMAKI_SCREENSHOTS", "/tmp/emaki-screenshots"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    port = _free_port()
    home = tmp_path_factory.mktemp("server")
    app = create_app(ServerConfig(home=home), Pipeline(make_tiny_bundle("sd1", seed=0)))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "install Debian's chromium and chromium-driver (bin/test does)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1200,900"):  # fmt: skip
        options.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=options)
    b.set_page_load_timeout(30)
    yield b
    b.quit()


def _post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _get(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return json.loads(r.read())


def test_type_a_prompt_generate_and_see_image_and_parameters(server, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.ID, "sampler").find_elements(By.TAG_NAME, "option"))
    browser.find_element(By.ID, "prompt").send_keys("a small red boat")
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("3")
    seed = browser.find_element(By.ID, "seed")
    seed.clear()
    seed.send_keys("21")
    browser.find_element(By.ID, "generate").click()
    card = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#gallery .card img")))
    wait.until(lambda b: b.execute_script("return arguments[0].naturalWidth", card) > 0)
    info = browser.find_element(By.CSS_SELECTOR, "#gallery .card .infotext").text
    assert info.startswith("a small red boat") and "Steps: 3" in info and "Seed: 21" in info
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / "generated.png"))
    # "use these settings again" puts the image's settings back into the form
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.CSS_SELECTOR, "#gallery .card button").click()
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "a small red boat"
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "21"
    assert browser.find_element(By.ID, "error").text == ""


def test_cancel_a_queued_job_from_the_queue(server, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    slow = _post(server, "/api/jobs", {"prompt": "slow", "steps": 150, "seed": 1})
    queued = _post(server, "/api/jobs", {"prompt": "queued", "steps": 2, "seed": 2})
    selector = f'#queue li[data-job="{queued["id"]}"] button.cancel'
    button = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, selector))
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / "queue.png"))
    button.click()
    wait.until(lambda b: _get(server, f"/api/jobs/{queued['id']}")["state"] == "cancelled")
    assert _get(server, f"/api/jobs/{slow['id']}")["state"] in ("queued", "running", "done")
    # and the running one, too
    running = f'#queue li[data-job="{slow["id"]}"] button.cancel'
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, running)).click()
    wait.until(lambda b: _get(server, f"/api/jobs/{slow['id']}")["state"] == "cancelled")


def test_inpaint_with_a_mask_painted_in_the_browser(server, browser, tmp_path) -> None:
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (20, 90, 200)).save(init)
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.ID, "sampler").find_elements(By.TAG_NAME, "option"))
    browser.find_element(By.ID, "tab-img2img").click()
    browser.find_element(By.ID, "init_file").send_keys(str(init))
    wait.until(lambda b: b.execute_script("return initImage && initImage.naturalWidth") == 64)
    canvas = browser.find_element(By.ID, "mask_canvas")
    # paint a stroke across the middle of the 256 px canvas (the middle of the 64 px image)
    ActionChains(browser).move_to_element_with_offset(
        canvas, -40, 0
    ).click_and_hold().move_by_offset(80, 0).release().perform()
    browser.find_element(By.ID, "prompt").send_keys("a yellow stripe")
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("3")
    before = len(browser.find_elements(By.CSS_SELECTOR, "#gallery .card"))
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery .card")) > before)
    info = browser.find_element(By.CSS_SELECTOR, "#gallery .card .infotext").text
    assert info.startswith("a yellow stripe") and "Mask blur: 4" in info
    assert browser.find_element(By.ID, "error").text == ""
    jobs = _get(server, "/api/jobs?state=done")
    result = jobs[-1]["result"]
    png = urllib.request.urlopen(server + "/api/outputs/" + result["images"][0]).read()
    from io import BytesIO

    out = Image.open(BytesIO(png)).convert("RGB")
    assert out.getpixel((2, 2)) == (20, 90, 200)  # far from the stroke: untouched
    assert out.getpixel((32, 32)) != (20, 90, 200)  # under the stroke: repainted
    browser.save_screenshot(str(SHOTS / "inpaint.png"))


def test_drop_a_png_to_read_its_parameters(server, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    done = _get(server, "/api/jobs?state=done")[0]
    png = urllib.request.urlopen(server + "/api/outputs/" + done["result"]["images"][0]).read()
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.ID, "sampler").find_elements(By.TAG_NAME, "option"))
    # a synthetic drop event carrying the PNG as a File, as a drag from the desktop would
    import base64

    browser.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const file = new File([bytes], "dropped.png", {type: "image/png"});
        const dt = new DataTransfer(); dt.items.add(file);
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
        """,
        base64.b64encode(png).decode(),
    )
    wait.until(lambda b: b.find_element(By.ID, "dropped").text.strip() != "")
    assert "Seed:" in browser.find_element(By.ID, "dropped").text
    seed = str(done["result"]["seeds"][0])
    assert browser.find_element(By.ID, "seed").get_attribute("value") == seed
