"""The dashboard in a real headless browser (Debian's chromium driven through chromedriver by selenium),
served by `lvd dashboard` itself: the overview loads, a cluster page shows thumbnails, clicking goes on
to a query and to an image's trail, the map opens a cluster, NSFW removals stay grey. Screenshots of
the cluster page and of a query page (the demo's real features: one photo's views together, neighbours
of the query photo's own) are saved under $TEST_ARTIFACTS_DIR (default tests/artifacts/)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from photos import artifacts_dir
from prefect_server import free_port, http_ok, wait_until

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000"]
WAIT_S = 60


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        why = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (infra/setup.sh does)"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI must run the browser test, never skip it
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def dashboard(demo_run, tmp_path_factory):
    """`lvd dashboard` on the demo run, as a user starts it (default host: 127.0.0.1)."""
    cfg, _ = demo_run
    port = free_port()
    log = tmp_path_factory.mktemp("dashboard-log") / "dashboard.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "dashboard", "--config", str(cfg),
                                 "--port", str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/healthz"), 120, "lvd dashboard", alive=lambda: proc.poll() is None)
        yield url
    except BaseException:
        print(log.read_text())
        raise
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition, message=f"waiting for {what}")


def _images_loaded(driver, css: str) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll(arguments[0])];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);", css)


def test_click_through_overview_cluster_query_trail(browser, dashboard, demo_run) -> None:
    from selenium.webdriver.common.by import By

    d = browser
    d.get(dashboard + "/")
    assert d.find_element(By.ID, "overview-title").text.startswith("Run")
    stages = [tr.get_attribute("data-stage") for tr in d.find_elements(By.CSS_SELECTOR, "#funnel tbody tr")]
    assert stages[:9] == ["ingest", "hash_dedup", "nsfw", "face_blur", "embed", "copy_dedup", "cluster", "retrieve",
                          "dataset"]
    facts = d.find_element(By.CSS_SELECTOR, ".facts").text
    assert "timm:efficientnet_lite0:package" in facts and "random weights" not in facts

    # clusters, sorted by what retrieval took from them: open the first
    d.find_element(By.ID, "nav-clusters").click()
    _wait(d, lambda drv: drv.find_elements(By.ID, "cluster-table"), "the cluster list")
    d.find_element(By.CSS_SELECTOR, "#cluster-table a.sort[href*='sort=retrieved']").click()
    _wait(d, lambda drv: "sort=retrieved" in drv.current_url, "the list sorted by images retrieved")
    first = d.find_element(By.CSS_SELECTOR, "#cluster-table a.cluster-link")
    cluster_id = first.text
    first.click()
    _wait(d, lambda drv: drv.find_element(By.ID, "cluster-title").text == f"Cluster {cluster_id}", "the cluster page")
    _wait(d, lambda drv: _images_loaded(drv, "#members img"), "member thumbnails")
    assert len(d.find_elements(By.CSS_SELECTOR, "#members img")) >= 2
    shot = artifacts_dir() / "dashboard-cluster.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # a query that retrieved from it, its neighbours, then its provenance trail
    d.find_element(By.CSS_SELECTOR, "#cluster-queries a.query-link").click()
    _wait(d, lambda drv: drv.find_elements(By.ID, "query-title"), "the query page")
    assert d.find_elements(By.CSS_SELECTOR, "#neighbours a.neighbour-link")
    _wait(d, lambda drv: _images_loaded(drv, "#neighbours img"), "neighbour thumbnails")
    shot = artifacts_dir() / "dashboard-query.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    query_url = d.current_url
    d.find_element(By.ID, "query-provenance").click()
    _wait(d, lambda drv: drv.find_elements(By.ID, "trail"), "the trail page")
    trail = d.find_element(By.ID, "trail").text
    assert "ingest: cur (curated)" in trail and query_url.rsplit("/", 1)[1] in d.current_url

    # a neighbour's trail from the query page names its cluster and the query that retrieved it
    d.get(query_url)
    d.find_element(By.CSS_SELECTOR, "#neighbours a.neighbour-link").click()
    _wait(d, lambda drv: drv.find_elements(By.ID, "trail"), "a neighbour's trail")
    text = d.find_element(By.ID, "trail").text
    assert "retrieved by cur query" in text and "cluster:" in text and "dataset: in, as retrieved" in text
    assert d.find_element(By.ID, "trail-cluster").get_attribute("href").split("/clusters/")[1].isdigit()


def test_map_search_and_removed(browser, dashboard, demo_run) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(dashboard + "/map")
    point = d.find_element(By.CSS_SELECTOR, "#map a.point")
    cluster_id = point.get_attribute("data-cluster")
    d.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))",
                     point.find_element(By.TAG_NAME, "circle"))
    _wait(d, lambda drv: drv.find_elements(By.ID, "cluster-title"), "the cluster opened from the map")
    assert d.find_element(By.ID, "cluster-title").text == f"Cluster {cluster_id}"

    # provenance search by URL
    from pipeline.config import load_config
    from pipeline.engine import Engine

    cfg, _ = demo_run
    row = Engine(load_config(cfg), show_progress=False).read_table("ingest", "web", ["url", "image_id"]).to_pylist()[0]
    box = d.find_element(By.ID, "provenance-q")
    box.send_keys(row["url"], Keys.ENTER)
    _wait(d, lambda drv: drv.find_elements(By.ID, "trail"), "the searched image's trail")
    assert d.current_url.endswith("/images/" + row["image_id"])

    # NSFW removals: grey placeholders only
    d.get(dashboard + "/removed?stage=nsfw")
    _wait(d, lambda drv: _images_loaded(drv, "#removed img"), "the NSFW placeholders")
    imgs = d.find_elements(By.CSS_SELECTOR, "#removed img")
    assert imgs and all("placeholder" in (i.get_attribute("class") or "") for i in imgs)
    grey = d.execute_script(
        "const i = arguments[0], c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;"
        "const x = c.getContext('2d'); x.drawImage(i, 0, 0); const p = x.getImageData(0, 0, c.width, c.height).data;"
        "for (let k = 0; k < p.length; k += 4) if (p[k] !== 128 || p[k+1] !== 128 || p[k+2] !== 128) return false;"
        "return true;", imgs[0])
    assert grey
