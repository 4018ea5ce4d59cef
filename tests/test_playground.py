"""The playground (GET /) in a real browser: headless Chromium from Debian driven by selenium, against a real server
on a tiny random Qwen3 with an API key. The page asks for the key, builds its form from the OpenAPI document,
streams the answer from /v1/relat and draws one loss point per training step; compare mode runs the three methods
at once; a wrong key shows the server's error. Screenshots (desktop and phone width) go to $RELAT_SCREENSHOTS or
pytest's temporary folder, printed in the output.

Chromium and chromedriver come from `make test` (deploy/test-deps.sh); without them the browser tests skip, and fail
under CI=true. `python -m tests.test_playground --url URL --key KEY --out FILE` screenshots a running server's page
(docs/playground.png was taken so, on the embedded model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relat_core import AdapterCache, Engine

from .conftest import build_tiny
from .deploy_support import missing
from .server_support import KEY, one_torch_thread, ready_server

DESKTOP = (1280, 1000)
PHONE = (390, 844)  # CSS pixels of a common phone
WAIT = 120  # seconds: only turns a hang into a failure


@pytest.fixture(scope="module")
def engine(tokenizer):
    with one_torch_thread():
        yield Engine(build_tiny("qwen3", tokenizer, seed=1), adapter_cache=AdapterCache(8, max_bytes=1 << 24))


@pytest.fixture(scope="module")
def server(engine):
    with ready_server(engine) as served:
        yield served


@pytest.fixture(scope="module")
def shots(tmp_path_factory, pytestconfig) -> Path:
    folder = Path(os.environ["RELAT_SCREENSHOTS"]) if os.environ.get("RELAT_SCREENSHOTS") \
        else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nplayground screenshots: {folder}")
    return folder


def chrome(width: int, height: int):
    """Headless Chromium through chromedriver, both from PATH (no download); skips (fails under CI) without them."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed (pip install -e '.[test]')")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        missing("chromium or chromedriver is not installed (`make test` installs them, as root on Debian: "
                "deploy/test-deps.sh)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


@pytest.fixture(scope="module")
def browser() -> Iterator:
    driver = chrome(*DESKTOP)
    try:
        yield driver
    finally:
        driver.quit()


# -- driving the page -----------------------------------------------------------------------------------------------

def find(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def find_all(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def until(driver, condition, what: str, limit: float = WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, limit).until(lambda d: condition(d), message=f"no {what} after {limit} s")


def open_page(driver, url: str, key: str | None) -> None:
    """Load the page in a fresh tab state, enter the key and wait until the form is built from the OpenAPI document
    (or, with a wrong key, until the page says it cannot read it)."""
    driver.get(url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(url + "/")
    if key is not None:
        until(driver, lambda d: find(d, "#key-row").is_displayed(), "API key field")
        field = find(driver, "#api-key")
        field.clear()
        field.send_keys(key)
        find(driver, "#question").click()  # leaving the field saves the key and reads the server's options again
    until(driver, lambda d: find(d, "#knobs").get_attribute("data-source") == "openapi"
          or find(d, "#form-message").is_displayed(), "form")


def fill(driver, values: dict[str, str]) -> None:
    """Set knobs by field name: text and number inputs typed, selects chosen by value."""
    from selenium.webdriver.support.ui import Select

    if not find(driver, "#more").get_attribute("open"):
        find(driver, "#more summary").click()
    for name, value in values.items():
        control = find(driver, f"#knob-{name}")
        if control.tag_name == "select":
            Select(control).select_by_value(value)
        else:
            control.clear()
            control.send_keys(value)


def ask(driver, question: str, method: str = "relat", compare: bool = False, limit: float = WAIT) -> list:
    """Ask, and wait until every column is done or failed; the columns."""
    box = find(driver, "#question")
    box.clear()
    box.send_keys(question)
    if compare != find(driver, "#compare").is_selected():
        find(driver, "#compare").click()
    if not compare:
        find(driver, f"input[name=method][value={method}]").click()
    find(driver, "#ask").click()
    count = 3 if compare else 1
    until(driver, lambda d: len(columns := find_all(d, "#results .column")) == count
          and all(c.get_attribute("data-state") in ("done", "failed") for c in columns), "finished columns", limit)
    return find_all(driver, "#results .column")


def screenshot(driver, path: Path, width: int) -> None:
    """The whole page at this width (the window as tall as the page), then the window as it was."""
    size = driver.get_window_size()
    driver.set_window_size(width, 800)
    for _ in range(2):  # the window's own frame makes the page's viewport shorter than the window: correct for it
        height = driver.execute_script("return document.documentElement.scrollHeight")
        frame = driver.get_window_size()["height"] - driver.execute_script("return window.innerHeight")
        driver.set_window_size(width, min(max(height, 600), 4000) + frame)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    driver.set_window_size(size["width"], size["height"])


QUICK = {"steps": "3", "latent_steps": "2", "max_tokens": "8", "temperature": "0", "ignore_eos": "true"}


# -- the page over HTTP (no browser needed) -----------------------------------------------------------------------

def test_the_page_and_its_files_need_no_key_and_stay_out_of_the_api_document(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, kind in (("playground.js", "javascript"), ("playground.css", "text/css")):
        response = httpx.get(f"{server.url}/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"], name
        assert response.headers["content-security-policy"] == page.headers["content-security-policy"]
        assert f'src="static/{name}"' in page.text or f'href="static/{name}"' in page.text
    assert "cdn" not in page.text.lower() and "http" not in page.text.replace("http://www.w3.org", "")
    assert httpx.get(f"{server.url}/static/nothing.js").status_code == 404
    assert httpx.get(f"{server.url}/static/../openapi.json").status_code in (401, 404)
    paths = httpx.get(f"{server.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()["paths"]
    assert not [path for path in paths if path == "/" or path.startswith("/static")]


# -- in the browser -------------------------------------------------------------------------------------------------

def test_the_form_offers_every_option_of_the_native_endpoint(browser, server):
    open_page(browser, server.url, KEY)
    assert find(browser, "#knobs").get_attribute("data-source") == "openapi", find(browser, "#form-message").text
    schema = httpx.get(f"{server.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    fields = set(schema["components"]["schemas"]["RelatRequest"]["properties"]) - {"question", "stream", "model",
                                                                                    "method"}
    knobs = {knob.get_attribute("data-field") for knob in find_all(browser, ".knob")}
    assert knobs == fields
    methods = [radio.get_attribute("value") for radio in find_all(browser, "input[name=method]")]
    assert methods == ["direct", "latent", "relat"]
    assert find(browser, "#knob-steps").get_attribute("max") == "100"  # the server's limit, from the document
    assert {option.get_attribute("value") for option in find_all(browser, "#knob-mapping option")} >= {"norm", "soft"}


def test_an_answer_streams_with_one_loss_point_per_training_step(browser, server, shots):
    open_page(browser, server.url, KEY)
    fill(browser, QUICK)
    [column] = ask(browser, "What is the capital of France?")
    assert column.get_attribute("data-state") == "done", column.text
    assert int(column.get_attribute("data-tokens")) > 0  # the answer came as token events
    assert find(column, ".answer").text.strip()
    assert len(find_all(column, "svg.loss-chart circle.point")) == 3
    assert "over 3 steps" in find(column, "figcaption").text
    phases = find(column, ".legend").text
    for phase in ("train", "think", "first token", "decode", "server: total"):
        assert phase in phases
    assert find_all(column, ".bar .phase")
    find(column, ".trace summary").click()
    assert '"recon_loss_after"' in find(column, ".trace pre").text
    screenshot(browser, shots / "relat-desktop.png", DESKTOP[0])
    caption = find(column, "figcaption").text
    # The same question again: its adapter comes from the cache, and the page says so.
    [again] = ask(browser, "What is the capital of France?")
    assert "adapter cache hit" in find(again, "figcaption").text and "adapter cache miss" in caption
    assert len(find_all(again, "svg.loss-chart circle.point")) == 3  # the losses recorded when it was trained


def test_compare_mode_answers_with_all_three_methods(browser, server, shots):
    open_page(browser, server.url, KEY)
    fill(browser, QUICK)
    columns = ask(browser, "Name a large ocean.", compare=True)
    assert [c.get_attribute("data-method") for c in columns] == ["direct", "latent", "relat"]
    for column in columns:
        assert column.get_attribute("data-state") == "done", column.text
        assert find(column, ".answer").text.strip()
        assert find(column, ".elapsed").text.endswith(" s")
    assert [len(find_all(c, "circle.point")) for c in columns] == [0, 0, 3]
    screenshot(browser, shots / "compare-desktop.png", DESKTOP[0])
    browser.set_window_size(*PHONE)
    try:
        # One column under another, nothing wider than the screen.
        wide = browser.execute_script(
            "return [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > "
            "window.innerWidth + 0.5).map(e => `${e.tagName}.${e.className} ${e.getBoundingClientRect().right}`)")
        assert not wide, browser.execute_script("return window.innerWidth")
        tops = [c.location["y"] for c in find_all(browser, "#results .column")]
        assert tops == sorted(tops) and len(set(tops)) == 3
        screenshot(browser, shots / "compare-phone.png", PHONE[0])
    finally:
        browser.set_window_size(*DESKTOP)


def test_logprob_shift_colours_each_answer_token(browser, server, shots):
    open_page(browser, server.url, KEY)
    fill(browser, QUICK)
    find(browser, "#logprob-shift").click()
    [column] = ask(browser, "Which ocean is the largest?")
    assert column.get_attribute("data-state") == "done", column.text
    find(column, ".trace summary").click()
    result = json.loads(find(column, ".trace pre").get_attribute("textContent"))
    assert result["trace"]["options"]["logprob_shift"] is True  # the toggle sent it, with logprobs
    entries = result["logprobs"]["content"]
    tokens = find_all(column, ".answer .token")
    assert [token.get_attribute("textContent") for token in tokens] == [entry["token"] for entry in entries]
    coloured = 0
    for token, entry in zip(tokens, entries, strict=True):
        shift = entry["logprob"] - entry["relat_base_logprob"]
        assert float(token.get_attribute("data-shift")) == pytest.approx(shift, abs=1e-3)
        title = token.get_attribute("title")
        assert f"logprob {entry['logprob']:.3f}" in title and f"base {entry['relat_base_logprob']:.3f}" in title
        colour = token.value_of_css_property("background-color")
        if abs(shift) > 0.01:  # green where training raised the token's logprob, red where it lowered it
            assert colour.startswith("rgba(47, 158, 110" if shift > 0 else "rgba(180, 35, 24"), (shift, colour)
            coloured += 1
    assert coloured > 0  # three training steps moved something
    assert "mean shift" in find(column, ".shift-legend").text
    screenshot(browser, shots / "logprob-shift-desktop.png", DESKTOP[0])


def test_a_wrong_key_is_shown_as_the_servers_error(browser, server, shots):
    open_page(browser, server.url, "sk-wrong")
    assert "API key" in find(browser, "#form-message").text  # the options could not be read
    [column] = ask(browser, "What is 2 + 2?")
    assert column.get_attribute("data-state") == "failed"
    message = find(column, ".message")
    assert message.is_displayed() and message.text.startswith("401") and "API key" in message.text
    screenshot(browser, shots / "wrong-key-phone.png", PHONE[0])


# -- a screenshot of a running server's page --------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description="screenshot the playground of a running server, in compare mode")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key")
    parser.add_argument("--question", default="What is the chemical symbol for gold?")
    parser.add_argument("--knobs", default="steps=3,latent_steps=4,max_tokens=24,temperature=0")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--out", type=Path, default=Path("docs/playground.png"))
    parser.add_argument("--wait", type=float, default=600, help="seconds the answers may take")
    args = parser.parse_args()
    driver = chrome(args.width, 900)
    try:
        open_page(driver, args.url.rstrip("/"), args.key)
        fill(driver, dict(pair.split("=", 1) for pair in args.knobs.split(",") if pair))
        find(driver, "#more summary").click()  # fold the long list of options away again
        ask(driver, args.question, compare=True, limit=args.wait)
        screenshot(driver, args.out, args.width)
    finally:
        driver.quit()
    print(args.out)


if __name__ == "__main__":
    main()
