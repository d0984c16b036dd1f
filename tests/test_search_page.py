"""The search page (GET /) in headless Chromium against the real app and the real stack.

A `tailbridge worker` subprocess indexes a small catalog and folds a scripted shopper's clicks
into Feast; the app runs under uvicorn on a free port in a thread; Chromium (Debian's
``chromium`` and ``chromium-driver``, installed by ``make install``) types a query, picks
the shopper, submits, and the test reads what the page rendered.
"""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tailbridge.infra.stack import free_port
from tailbridge.streams import item_index
from tailbridge.streams.events import CatalogUpsert, InteractionEvent, QueryEvent, ServedItem
from tailbridge.synthetic.replay import publish
from tailbridge.streams.topics import TOPICS
from tests.conftest import stream_namespace, wait_until

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
USER = "u_page_shopper"

# Six kinds of product, six of each; only the tampers say "espresso" or "tamper".
KINDS = [
    ("tamper", "Espresso Tamper 58mm, Stainless Steel", ["Kitchen", "Coffee Tools"]),
    ("sofa", "Velvet Three-Seat Sofa", ["Furniture", "Sofas"]),
    ("shoe", "Trail Running Shoes", ["Shoes", "Running Shoes"]),
    ("post", "Cat Scratching Post with Sisal Rope", ["Pets", "Cat Furniture"]),
    ("lamp", "LED Desk Lamp, Dimmable", ["Home", "Desk Lamps"]),
    ("bottle", "Insulated Water Bottle 750ml", ["Sports", "Water Bottles"]),
]
BRANDS = ["Quokka", "Harlow", "Nordby", "Lumen", "Driftwood", "Kiln"]
CATALOG = [CatalogUpsert(item_id=f"{key}-{n}", title=f"{brand} {title}", category_path=path, brand=brand,
                         price=round(20.0 + 37.5 * n + 11 * k, 2))
           for k, (key, title, path) in enumerate(KINDS) for n, brand in enumerate(BRANDS)]
TAMPERS = {item.title for item in CATALOG if item.item_id.startswith("tamper-")}


def missing_browser() -> list[str]:
    return [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]


def require_browser() -> None:
    """Chromium and its driver must be there: a missing browser fails the test, never skips it."""
    missing = missing_browser()
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: run `make install` (it installs Debian's chromium and "
                    "chromium-driver), or `apt-get install chromium chromium-driver`", pytrace=False)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium is not installed in this environment: run `make install`", pytrace=False)


def start_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


class AppServer:
    """The app under uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, settings):
        import uvicorn

        from tailbridge.serving.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self, timeout: float = 90) -> None:
        self.thread.start()

        def healthy() -> bool:
            if not self.thread.is_alive():
                raise AssertionError("the app exited during start-up (see the log above)")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout, "the app to answer /healthz", interval=0.1)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def shopper_events() -> list:
    """USER searched for a sofa and clicked two: a Feast user_context with Sofas affinity."""
    query = QueryEvent(user_id=USER, session_id=f"{USER}-s", query_id=f"{USER}-q", query="sofa",
                       served=[ServedItem(item_id=f"sofa-{n}", position=n + 1) for n in range(3)])
    clicks = [InteractionEvent(action="click", user_id=USER, session_id=f"{USER}-s", query_id=f"{USER}-q",
                               item_id=f"sofa-{n}", position=n + 1) for n in range(2)]
    return [query, *clicks]


@pytest.fixture(scope="module")
def page(stack_settings, tmp_path_factory):
    # A loaded CI machine can take longer than the production 50 ms to read a context; the
    # page's rendering of a personalised answer is under test here, not the deadline.
    with stream_namespace(stack_settings, tmp_path_factory.mktemp("page"), "tbp", worker_batch_seconds=0.1,
                          worker_index_seal_seconds=1.0, ranker_version="none", serve_context_timeout_ms=3000) as ns:
        settings, store, worker, milvus = ns.settings, ns.store, ns.worker, ns.milvus
        pool = ThreadPoolExecutor(1)
        server = driver = browser = None
        try:
            worker.start()
            if not missing_browser():  # the page test says what is missing; the others run without
                browser = pool.submit(start_browser)  # Chromium starts while the worker indexes
            publish(settings, CATALOG)
            server = AppServer(settings)
            server.start()  # the app starts while the worker indexes (it answers 503 until then)
            wait_until(lambda: item_index.serving_collection(milvus, settings)
                       and item_index.count(milvus, item_index.alias_name(settings)) == len(CATALOG),
                       90, "the catalog to be indexed\n" + worker.log_tail())
            publish(settings, shopper_events())  # after indexing: the worker knows the clicked items' category
            warm = httpx.post(f"{server.url}/search", json={"query": "warm up"}, timeout=60)  # loads the encoder
            assert warm.status_code == 200, warm.text
            wait_until(lambda: (store.get_online_features(features=["user_context:recent_item_ids"],
                                                          entity_rows=[{"user_id": USER}]).to_dict()
                                ["recent_item_ids"][0]), 60, f"{USER}'s context in Feast\n" + worker.log_tail())
            driver = browser.result(timeout=60) if browser is not None else None
            yield settings, server, driver
        finally:
            if driver is None and browser is not None and browser.exception(timeout=60) is None:
                driver = browser.result()
            if driver is not None:
                driver.quit()
            pool.shutdown(wait=False)
            if server is not None:
                server.stop()


def test_users_endpoint_lists_the_shopper_with_a_context(page):
    _, server, _ = page
    body = httpx.get(f"{server.url}/users", params={"limit": 20}, timeout=30).json()
    assert body["user_ids"] == [USER], body  # the only user with state in this namespace
    assert httpx.get(f"{server.url}/users", params={"limit": 0}, timeout=10).status_code == 422


def test_the_page_renders_results_timings_and_the_explanation(request):
    require_browser()  # before the stack fixtures: a missing browser is a failure saying what to run
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    settings, server, driver = request.getfixturevalue("page")
    driver.get(server.url + "/")
    wait = WebDriverWait(driver, 30, poll_frequency=0.1)
    # The selector is filled from GET /users.
    wait.until(lambda d: USER in [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#user option")])
    assert Select(driver.find_element(By.ID, "user")).first_selected_option.text == "anonymous"

    driver.find_element(By.ID, "query").send_keys("espresso tamper")
    k = driver.find_element(By.ID, "k")
    k.clear()
    k.send_keys("6")
    Select(driver.find_element(By.ID, "user")).select_by_value(USER)
    assert driver.find_element(By.ID, "explain").is_selected()  # on by default
    driver.find_element(By.ID, "submit").click()

    rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results tbody tr[data-item]"))
    titles = [row.find_element(By.CSS_SELECTOR, "a.title").text for row in rows]
    assert set(titles) == TAMPERS, titles
    first = rows[0].find_elements(By.TAG_NAME, "td")
    assert first[0].text == "1" and first[3].text == "Coffee Tools" and first[6].text in {"dense", "bm25"}
    assert "(" in first[7].text and "(" in first[8].text  # dense and BM25 score (rank): the explanation

    stages = {row.get_attribute("data-stage"): row.find_elements(By.TAG_NAME, "td")[1].text
              for row in driver.find_elements(By.CSS_SELECTOR, "#timings tbody tr")}
    assert {"user_context", "rewrites", "embed", "retrieve", "fuse", "publish", "total"} <= set(stages), stages
    assert float(stages["total"]) > 0
    assert driver.find_element(By.ID, "summary-personalized").text.startswith("yes")
    assert driver.find_element(By.ID, "summary-shopper").text == USER
    assert "minilm-l6-v2" in driver.find_element(By.ID, "summary-models").text
    assert not driver.find_element(By.ID, "degraded").is_displayed()
    assert not driver.find_element(By.ID, "error").is_displayed()

    # The loop: a click on a result goes back to the handler as an interaction event.
    rows[0].find_element(By.CSS_SELECTOR, "a.title").click()
    note = wait.until(lambda d: d.find_element(By.ID, "event-note").text)
    assert TOPICS["interactions"].topic(settings) in note, note

    # A field error from the server (422) is shown readably, naming the field.
    driver.find_element(By.ID, "price_min").send_keys("50")
    driver.find_element(By.ID, "price_max").send_keys("10")
    driver.find_element(By.ID, "submit").click()
    error = wait.until(lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error").text)
    assert "422" in error and "price_min (50.0) is above price_max (10.0)" in error, error

    # Nothing came from anywhere but the app, and the page logged no error.
    origins = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(url.startswith(server.url) for url in origins), origins
    problems = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"
                and "422" not in entry["message"]]  # the refused search above is logged by Chromium
    assert problems == [], problems
