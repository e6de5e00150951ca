"""The explorer page in a real browser (Debian's headless Chromium driven by selenium) against a live service
with API keys, filled with a multi-epoch trace in which some prompts collapse onto one error: the numbers
on the page equal the API's, and a click leads from the run to a prompt to a cluster. Screenshots are kept
under test-artifacts/explorer/ (MEDS_TEST_ARTIFACTS overrides the folder)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from harness.collapse_trace import CollapseTraceSpec, collapse_trace

KEY = "explorer-test-key"
SPEC = CollapseTraceSpec(prompts=40, collapsing=8, epochs=6, prompts_per_step=10)  # two pages of prompts
ARTIFACTS = Path(os.environ.get("MEDS_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


def fmt(x: float | int | None) -> str:
    """What the page prints for a number (explorer.js `fmt`)."""
    if x is None:
        return "–"
    return str(int(x)) if float(x).is_integer() else f"{x:.3f}"


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "headless Chromium is missing: `make browser` installs Debian's chromium"
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-background-networking", "--disable-gpu",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    yield chrome
    chrome.quit()


@pytest.fixture
def service(start_server: Callable[..., str]) -> tuple[str, dict[str, str]]:
    url = start_server(api_keys=[KEY], refit_processes=False)
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        http.put("/v1/runs/grpo-demo", json={"text_max_chars": 200}).raise_for_status()
        http.put("/v1/runs/observe-only", json={"penalty_target": "none"}).raise_for_status()
        for step, rollouts in collapse_trace(SPEC):
            for run in ("grpo-demo", "observe-only"):
                http.post(f"/v1/runs/{run}/score", json={"step": step, "rollouts": rollouts}).raise_for_status()
        for run in ("grpo-demo", "observe-only"):
            http.post(f"/v1/runs/{run}/recluster", json={"all": True}).raise_for_status()
    return url, headers


def wait(browser: WebDriver, css: str, count: int = 1) -> list[Any]:
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, css)) >= count)
    return browser.find_elements(By.CSS_SELECTOR, css)


def cells(row: Any) -> dict[str, str]:
    return {td.get_attribute("data-field"): td.text for td in row.find_elements(By.CSS_SELECTOR, "td")}


def shot(browser: WebDriver, name: str) -> None:
    folder = ARTIFACTS / "explorer"
    folder.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(folder / f"{name}.png"))


def test_run_to_prompt_to_cluster(browser: WebDriver, service: tuple[str, dict[str, str]]) -> None:
    url, headers = service
    api = httpx.Client(base_url=url, headers=headers, timeout=60)

    browser.get(f"{url}/ui")
    error = wait(browser, "#error:not([hidden])")[0]
    assert error.text.startswith("401")  # no key yet: the data routes refuse
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    runs = wait(browser, "#runs tbody tr", 2)
    by_name = {run["run"]: run for run in api.get("/v1/runs").json()["runs"]}
    for row in runs:
        shown = cells(row)
        assert shown["rollouts"] == fmt(by_name[shown["run"]]["stats"]["rollouts"])
        assert shown["penalty_target"] == by_name[shown["run"]]["config"]["penalty_target"]
    shot(browser, "1-runs")

    next(row for row in runs if row.get_attribute("data-run") == "grpo-demo").click()
    rows = wait(browser, "#prompts tbody tr", 25)
    page = api.get("/v1/runs/grpo-demo/prompts", params={"sort": "collapse", "limit": 25}).json()
    assert browser.find_element(By.ID, "page-info").text == f"1–25 of {page['total']}"
    for row, want in zip(rows, page["prompts"], strict=True):
        shown = cells(row)
        assert shown["prompt_id"] == want["prompt_id"]
        for field in ("fitted", "clusters", "largest_cluster_share", "cluster_entropy", "noise_share"):
            assert shown[field] == fmt(want[field]), field
    # the planted collapse is what the ranking puts first
    assert {p["prompt_id"] for p in page["prompts"][:8]} == {f"prompt-{p:03d}" for p in range(8)}
    summary = api.get("/v1/runs/grpo-demo/summary").json()["series"]
    for name in ("repeat_rate", "largest_cluster_share", "cluster_entropy", "noise_share"):
        line = browser.find_element(By.CSS_SELECTOR, f"#plot-{name} polyline")
        assert len(line.get_attribute("points").split()) == len(summary["step"])
    shot(browser, "2-run")

    browser.find_element(By.ID, "next").click()  # server-side paging
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "page-info").text.startswith("26–"))
    browser.find_element(By.ID, "prev").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "page-info").text.startswith("1–"))

    top = page["prompts"][0]["prompt_id"]
    wait(browser, f'#prompts tbody tr[data-prompt="{top}"]')[0].click()
    clusters = wait(browser, "#clusters tbody tr")
    view = api.get(f"/v1/runs/grpo-demo/collapse/{top}").json()["groups"]["wrong"]
    assert browser.find_element(By.ID, "prompt-noise").text == fmt(view["noise_share"])
    assert browser.find_element(By.ID, "prompt-fitted").text == str(view["fitted"])
    assert len(clusters) == len(view["clusters"])
    for row in clusters:
        shown, want = cells(row), view["clusters"][row.get_attribute("data-label")]
        assert shown["size"] == str(want["size"]) and shown["sizes"] == " ".join(map(str, want["sizes"]))
        assert (shown["first_step"], shown["last_step"]) == (fmt(want["first_step"]), fmt(want["last_step"]))
    bars = browser.find_elements(By.CSS_SELECTOR, "#penalty-histogram rect")
    all_groups = api.get(f"/v1/runs/grpo-demo/collapse/{top}").json()["groups"].values()
    assert sum(int(b.get_attribute("data-count")) for b in bars) == sum(g["rollouts"] for g in all_groups)
    shot(browser, "3-prompt")

    biggest = clusters[0]
    label = biggest.get_attribute("data-label")
    biggest.click()
    detail = wait(browser, "#cluster-detail:not([hidden])")[0]
    want = view["clusters"][label]
    assert f"{want['size']} wrong rollouts" in detail.text
    assert f"from step {want['first_step']} to step {want['last_step']}" in detail.text
    per_step = [int(b.get_attribute("data-count")) for b in detail.find_elements(By.CSS_SELECTOR, "rect")]
    assert per_step == want["sizes"]
    examples = [li.text for li in detail.find_elements(By.CSS_SELECTOR, "#cluster-examples li")]
    assert examples == want["examples"] and examples  # the run keeps texts: its newest ones, as sent
    shot(browser, "4-cluster")
    api.close()
