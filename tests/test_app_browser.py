"""The layout app in a real browser: `python -m cones_jax.app` on the demo model, driven by headless
Chromium through Selenium. Two boxes drawn with mouse drags, the prompt and words typed, Generate at
2 steps; the images appear, and the layout JSON the page writes holds exactly the drawn boxes and is
read by `sample.py`'s layout parser. A word that is not in the prompt shows the inline error.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them where it can) and the `[app]`
extra; skipped with the reason where they are missing. CONES_APP_SCREENSHOT=path saves a
screenshot of the page after Generate, with the demo subjects' residuals, 4 seeds and 50 steps
(docs/app.png is one).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PROMPT = "a star and a heart on a grey background"
PAGE_PARTS = ("#cones-canvas canvas", "#cones-generate", "#cones-message", "#cones-word-check",
              "#cones-prompt textarea", "#cones-steps input", "#cones-seeds textarea",
              "#cones-attention input[type=checkbox]", "#cones-save", "#cones-upload input[type=file]")

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f"no browser: {CHROMIUM} and {CHROMEDRIVER} are needed (Debian: apt-get install -y chromium "
                "chromium-driver; .ci/run installs them where apt and root are available)", allow_module_level=True)
pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e '.[app]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("app_out"))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop (the test session fakes 8)
    env.pop("CONES_JAX_MODEL", None)
    log = open(os.path.join(out, "..", "app.log"), "w")
    cwd = str(tmp_path_factory.mktemp("cwd"))
    proc = subprocess.Popen([sys.executable, "-m", "cones_jax.app", "--port", str(port), "--out-dir", out],
                            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log.close()
                with open(log.name) as f:
                    pytest.fail(f"the app did not start:\n{f.read()[-3000:]}")
            time.sleep(0.5)
    yield url, out, cwd
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,2000"):
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="cones_chromium_")
    opts.add_argument(f"--user-data-dir={profile}")
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait(driver, what, timeout=30, told=None):
    """`what(driver)` once it is true; on a timeout, the test fails with `told(driver)` (the page's state)."""
    from selenium.common.exceptions import TimeoutException

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: what(d))
    except TimeoutException:
        pytest.fail(f"timed out after {timeout} s; {told(driver) if told else ''}")


def missing_parts(driver):
    return [css for css in PAGE_PARTS if not driver.find_elements(By.CSS_SELECTOR, css)]


def page_text(driver):
    return " | ".join(driver.find_element(By.ID, i).text for i in ("cones-word-check", "cones-message"))


def drag(driver, canvas, start, end):
    """A real mouse drag between two points given as fractions of the canvas."""
    w, h = canvas.size["width"], canvas.size["height"]
    x0, y0 = int((start[0] - 0.5) * w), int((start[1] - 0.5) * h)  # offsets from the centre (Selenium 4)
    ActionChains(driver).move_to_element_with_offset(canvas, x0, y0).click_and_hold() \
        .move_by_offset(int((end[0] - start[0]) * w / 2), int((end[1] - start[1]) * h / 2)) \
        .move_by_offset(int((end[0] - start[0]) * w / 2), int((end[1] - start[1]) * h / 2)).release().perform()


def typed(driver, css, text):
    field = driver.find_element(By.CSS_SELECTOR, css)
    field.click()
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text)
    return field


def drawn_boxes(driver):
    return json.loads(driver.find_element(By.CSS_SELECTOR, "#cones-canvas canvas").get_attribute("data-boxes") or "[]")


def test_draw_generate_and_download_the_layout(app, browser):
    url, out, cwd = app
    browser.get(url)
    # Gradio mounts its components one by one after the page loads: wait for every one the test
    # touches, not only the first, or a slow machine finds the canvas before the buttons exist.
    wait(browser, lambda d: not missing_parts(d), 60, told=lambda d: f"missing: {', '.join(missing_parts(d))}")
    canvas = browser.find_element(By.CSS_SELECTOR, "#cones-canvas canvas")
    browser.find_element(By.ID, "cones-generate").click()  # nothing drawn yet: told in the page
    wait(browser, lambda d: "no box" in d.find_element(By.ID, "cones-message").text, told=page_text)
    drag(browser, canvas, (0.05, 0.2), (0.45, 0.8))
    drag(browser, canvas, (0.55, 0.25), (0.95, 0.75))
    boxes = wait(browser, lambda d: len(drawn_boxes(d)) == 2 and drawn_boxes(d), told=drawn_boxes)
    assert boxes[0][0] < 0.1 and boxes[0][2] > 0.4 and boxes[1][0] > 0.5 and boxes[1][2] > 0.9, boxes
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#cones-word-1 textarea").is_displayed())

    typed(browser, "#cones-prompt textarea", PROMPT)
    typed(browser, "#cones-word-0 textarea", "star")
    typed(browser, "#cones-word-1 textarea", "heart")
    screenshot = os.environ.get("CONES_APP_SCREENSHOT")
    seeds = ["0", "1", "2", "3"] if screenshot else ["0"]
    typed(browser, "#cones-steps input", "50" if screenshot else "2")
    if screenshot:  # the demo subjects, as in examples/layouts/two_subjects.json
        typed(browser, "#cones-seeds textarea", " ".join(seeds))
        for k, name in enumerate(("demo:sunny", "demo:dotty")):
            typed(browser, f"#cones-residual-{k} input", name).send_keys(Keys.ENTER)
    browser.find_element(By.CSS_SELECTOR, "#cones-attention input[type=checkbox]").click()
    wait(browser, lambda d: "every subject word is in the prompt" in d.find_element(By.ID, "cones-word-check").text,
         told=page_text)

    browser.find_element(By.ID, "cones-generate").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cones-images img")) == len(seeds), 240,
         told=page_text)  # the first Generate compiles the sampler: minutes on a loaded 2-core machine
    message = browser.find_element(By.ID, "cones-message").text
    assert f"{len(seeds)} image(s)" in message, message
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cones-heatmaps img")) == 2 * len(seeds),
         told=page_text)
    assert any(f.endswith("_layout.png") for _, _, fs in os.walk(out) for f in fs)
    if screenshot:
        time.sleep(1)  # the gallery's images finish loading
        browser.save_screenshot(screenshot)
        from PIL import Image

        height = browser.execute_script("return document.querySelector('#cones-images').getBoundingClientRect()"
                                        ".bottom + 16")
        with Image.open(screenshot) as img:
            img.crop((0, 0, img.width, min(img.height, int(height)))).save(screenshot, optimize=True)

    browser.find_element(By.ID, "cones-save").click()
    link = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#cones-layout-file a[href]"), told=page_text)[0]
    with urllib.request.urlopen(link.get_attribute("href"), timeout=10) as r:
        layout = json.loads(r.read())
    assert [s["box"] for s in layout["subjects"]] == drawn_boxes(browser) == boxes
    assert [s["word"] for s in layout["subjects"]] == ["star", "heart"]
    assert layout["prompt"] == PROMPT and layout["_app"]["seeds"] == [int(s) for s in seeds]
    from cones_jax.layout import load_layout

    path = os.path.join(out, "downloaded.json")
    with open(path, "w") as f:
        json.dump(layout, f)
    assert [s.box for s in load_layout(path).subjects] == [tuple(b) for b in boxes]

    # the file uploaded again after clearing the canvas: the same boxes, words and settings
    browser.find_element(By.CSS_SELECTOR, "#cones-canvas .cones-clear").click()
    wait(browser, lambda d: drawn_boxes(d) == [], told=drawn_boxes)
    typed(browser, "#cones-seeds textarea", "9")
    browser.find_element(By.CSS_SELECTOR, "#cones-upload input[type=file]").send_keys(path)
    wait(browser, lambda d: drawn_boxes(d) == boxes, told=drawn_boxes)
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#cones-word-1 textarea").get_attribute("value") == "heart"
         and d.find_element(By.CSS_SELECTOR, "#cones-seeds textarea").get_attribute("value") == " ".join(seeds),
         told=page_text)

    typed(browser, "#cones-word-1 textarea", "hart")
    wait(browser, lambda d: "does not occur in the prompt" in d.find_element(By.ID, "cones-word-check").text,
         told=page_text)
    assert os.listdir(cwd) == []  # the app writes under --out-dir only (Gradio's uploads and images too)
    assert os.path.isdir(os.path.join(out, ".gradio"))
