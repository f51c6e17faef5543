"""The ops dashboard in a real browser (headless Chromium driven by Playwright) against the running test fleet.

Chromium is Debian's (`/usr/bin/chromium`, installed by tests/run.sh): Playwright's own browser download
cannot run here. The page gets the fleet's admin key the way a returning operator's browser has it (session
storage); every test also checks that the page logged no console error.
"""

from __future__ import annotations

import json
import os
import re
import threading

import httpx
import pytest
import ray

from conftest import ADMIN_KEY, API_KEY
from test_live_migration import (  # noqa: F401 (mig_pool is a fixture)
    mig_pool,
    mig_replicas,
    two_ready_mig_replicas,
    where,
)

pytestmark = pytest.mark.engines
CHROMIUM = "/usr/bin/chromium"
# As long as the "mig" pool's engines allow (max_model_len 1024, 40 blocks of 32): the page's click-select-confirm
# must land while the request still runs; at 600 tokens it once finished first (2026-12-02, "no request on ...").
LONG = {"temperature": 0, "max_tokens": 960, "extra_body": {"ignore_eos": True}}
PROMPT = [{"role": "user", "content": "Describe live migration of a running request."}]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Root cannot use Chromium's sandbox; the page is our own.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def mig_restored(fleet):
    """Scaling and draining change the "mig" pool; later tests expect its two ready replicas back. (Scaling runs
    before migrating and draining, so that the replica it starts is ready by the time this waits for it.)"""
    yield
    ray.get(fleet.controller.scale.remote("mig", 2))
    fleet.wait_for(lambda: len(mig_replicas(fleet)) == 2 and len(fleet.replicas("mig", "draining")) == 0,
                   what="the mig pool back at two ready replicas")


class Dashboard:
    """The page, open and live, with the console errors it logged."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1500, "height": 1000})
        self.context.add_init_script(f"sessionStorage.setItem('rayfleet-key', {json.dumps(ADMIN_KEY)})")
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(url)
        self.expect(self.page.get_by_test_id("live")).to_have_text("live", timeout=15_000)

    @staticmethod
    def expect(locator):
        from playwright.sync_api import expect

        return expect(locator)

    def confirm(self) -> None:
        self.page.get_by_test_id("confirm-ok").click()

    def row(self, replica_id: str):
        return self.page.locator(f'[data-testid=replica-row][data-replica="{replica_id}"]')


@pytest.fixture
def dashboard(browser, fleet, mig_restored):
    page = Dashboard(browser, fleet.base_url.removesuffix("/v1") + "/dashboard")
    yield page
    page.context.close()
    assert page.errors == [], f"the page logged console errors: {page.errors}"


class LongStream(threading.Thread):
    """A greedy 960-token stream to the "mig" pool, read in the background; its request id once it runs."""

    def __init__(self, client):
        super().__init__(daemon=True)
        self.client = client
        self.request_id: str | None = None
        self.started = threading.Event()
        self.tokens = 0
        self.finish_reason = None

    def run(self) -> None:
        for chunk in self.client.chat.completions.create(model="mig", messages=PROMPT, stream=True,
                                                         stream_options={"include_usage": True}, **LONG):
            self.request_id = self.request_id or chunk.id
            self.started.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                self.finish_reason = chunk.choices[0].finish_reason
            if chunk.usage:
                self.tokens = chunk.usage.completion_tokens

    def where(self, fleet) -> str:
        assert self.started.wait(60), "the stream never started"
        return where(fleet, self.request_id)

    def finished_whole(self) -> bool:
        self.join(120)
        return not self.is_alive() and self.tokens == LONG["max_tokens"] and self.finish_reason == "length"


def test_dashboard_api_needs_an_admin_key_and_the_page_does_not(fleet):
    root = fleet.base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/dashboard/api/state").status_code == 401
    user = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{root}/dashboard/api/state", headers=user).status_code == 403
    scale = {"pool": "cold", "replicas": 1}
    assert httpx.post(f"{root}/dashboard/api/scale", headers=user, json=scale).status_code == 403
    state = httpx.get(f"{root}/dashboard/api/state", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert set(state["pools"]) == {"tiny-a", "tiny-b", "mig", "cold"}
    assert {"replicas", "migrations", "routing", "audit", "kv_store"} <= set(state)
    page = httpx.get(f"{root}/dashboard")
    assert page.status_code == 200 and "rayfleet" in page.text
    assert httpx.get(f"{root}/dashboard/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{root}/dashboard/secrets.txt").status_code == 404


def test_page_goes_live_with_the_fleets_replica_count_and_no_console_errors(dashboard, fleet):
    status = fleet.status()
    ready = sum(r["state"] == "ready" for r in status["replicas"])
    desired = sum(p["desired"] for p in status["pools"].values())
    dashboard.expect(dashboard.page.get_by_test_id("replica-count")).to_have_text(f"{ready} / {desired}")
    dashboard.expect(dashboard.page.get_by_test_id("replica-row")).to_have_count(len(status["replicas"]))
    for replica in status["replicas"]:
        dashboard.expect(dashboard.row(replica["replica_id"])).to_have_attribute("data-state", replica["state"])
    dashboard.expect(dashboard.page.get_by_test_id("fleet-name")).to_have_text(status["fleet"])
    # The session fleet's llumnix plans for the "mig" pool only: the header says what it prices a move at there.
    dashboard.expect(dashboard.page.get_by_test_id("policies")).to_contain_text(
        re.compile(r"migration llumnix \(moves priced at a pause of mig \d+ ms\)"))


def test_scaling_a_pool_from_the_page_shows_the_new_replica_live(dashboard, fleet):
    pool = fleet.status()["pools"]["mig"]
    target = pool["desired"] + 1 if pool["desired"] < pool["max"] else pool["desired"] - 1
    dashboard.page.get_by_test_id("scale-input-mig").fill(str(target))
    dashboard.page.get_by_test_id("scale-mig").click()
    dashboard.expect(dashboard.page.get_by_test_id("confirm")).to_contain_text(f"to {target} replicas")
    dashboard.confirm()
    dashboard.expect(dashboard.page.get_by_test_id("toast")).to_have_text(f"pool mig: {target} replicas desired",
                                                                      timeout=30_000)
    dashboard.expect(dashboard.page.get_by_test_id("pool-title-mig")).to_contain_text(f"/ {target} ready")
    rows = dashboard.page.get_by_test_id("replicas-mig").get_by_test_id("replica-row")
    if target > pool["desired"]:
        dashboard.expect(rows.and_(dashboard.page.locator("[data-state=starting]"))).to_have_count(1, timeout=10_000)
    assert fleet.status()["pools"]["mig"]["desired"] == target
    audit = dashboard.page.get_by_test_id("audit").locator("tr").nth(1)
    dashboard.expect(audit).to_contain_text(re.compile(r"dashboard\s*scale\s*pool=mig replicas=" + str(target)))


def test_migrating_a_request_from_the_page_moves_it(dashboard, fleet, client, mig_pool):  # noqa: F811
    """A request chosen on the page moves where the page says. The engine can outrun the page: the 960-token
    stream has ended before the click, select and confirm landed (on a loaded machine, 1 full run in 3 or 4),
    or before the click found its chip (which leaves the page with the request). Only then, when the migration
    found no request or the click no chip, and the stream had ended whole, the test tries again with a new
    stream (up to three times). Any other outcome fails it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    outcome = "no attempt's click found its request on the page"
    for attempt in range(3):
        stream = LongStream(client)
        stream.start()
        src = stream.where(fleet)
        chip = dashboard.row(src).get_by_test_id("request").filter(has_text=stream.request_id[-10:])
        # force: the row's numbers change at every refresh while the stream runs, and under load Playwright's wait
        # for a stable element (two equal animation frames) once outlasted the stream; what is asserted is the
        # migration the click starts (the toast and the audit row below).
        try:
            chip.click(timeout=30_000, force=True)
        except PlaywrightTimeout:
            if not stream.finished_whole():
                raise
            print(f"attempt {attempt + 1}: the stream ended before the click found its request; again")
            continue
        dst = next(r for r in mig_pool if r != src)
        dashboard.page.get_by_test_id("migrate-dst").select_option(dst)
        dashboard.confirm()
        toast = dashboard.page.get_by_test_id("toast")
        # The toast comes when the migration has ended, with its outcome.
        dashboard.expect(toast).to_contain_text(re.compile(re.escape(stream.request_id) + ": (migrated|failed)"),
                                                timeout=60_000)
        outcome = toast.text_content()
        if f"failed (no request {stream.request_id} on {src})" not in outcome or not stream.finished_whole():
            break
        print(f"attempt {attempt + 1}: the stream ended before the page's migration reached it; again")
    assert f"{stream.request_id}: migrated" in outcome, outcome
    assert stream.finished_whole(), (stream.tokens, stream.finish_reason)
    audit = dashboard.page.get_by_test_id("audit").locator("tr").nth(1)
    dashboard.expect(audit).to_contain_text(re.compile(r"dashboard\s*migrate.*request_id=" + stream.request_id))


def drain_the_replica_of_a_long_stream(dashboard, fleet, client) -> tuple[LongStream, str, list[dict]]:
    """Start a long stream, drain its replica from the page; the stream, its replica and the migrations that
    moved it off that replica."""
    # Both drain buttons on the page before the stream starts: the stream lasts seconds, and a click that first
    # waits for its row to render once came after the stream had finished (nothing left to move).
    for replica_id in mig_replicas(fleet):
        dashboard.expect(dashboard.page.get_by_test_id(f"drain-{replica_id}")).to_be_enabled(timeout=30_000)
    stream = LongStream(client)
    stream.start()
    src = stream.where(fleet)
    dashboard.page.get_by_test_id(f"drain-{src}").click(force=True)  # as the chip's click, for the same reason
    dashboard.expect(dashboard.page.get_by_test_id("confirm")).to_contain_text("move to other replicas")
    dashboard.confirm()
    dashboard.expect(dashboard.page.get_by_test_id("toast")).to_have_text(f"{src} is draining", timeout=30_000)
    stream.join(120)
    moved = [m for m in ray.get(fleet.controller.status.remote(migrations=100))["migrations"]
             if m["request_id"] == stream.request_id and m["src"] == src]
    return stream, src, moved


def test_draining_a_replica_from_the_page_moves_its_requests(dashboard, fleet, client, mig_pool):  # noqa: F811
    """Draining a replica from the page moves its running request to the other one. As with the page's migrate
    (above), the 960-token stream can end before the click, confirm and the controller's next tick reach it
    (1 full run in 4 on 2026-12-04, on a fast machine day): only when the drain moved nothing and the stream ended
    whole does the test try again, with the pool back at two replicas and a new stream (up to three times)."""
    for attempt in range(3):
        stream, src, moved = drain_the_replica_of_a_long_stream(dashboard, fleet, client)
        assert stream.finished_whole(), (stream.tokens, stream.finish_reason)
        if moved:
            break
        print(f"attempt {attempt + 1}: the stream ended before the drain reached it; again")
        dashboard.expect(dashboard.row(src)).to_have_count(0, timeout=30_000)  # this drain's end, then a new pair
        two_ready_mig_replicas(fleet)
    assert [m["outcome"] for m in moved] == ["migrated"], moved
    dashboard.expect(dashboard.page.get_by_test_id("migrations")).to_contain_text(stream.request_id[-10:])
    dashboard.expect(dashboard.row(src)).to_have_count(0, timeout=30_000)  # drained, then stopped
    if os.environ.get("RAYFLEET_DASHBOARD_SCREENSHOT"):
        dashboard.page.screenshot(path=os.environ["RAYFLEET_DASHBOARD_SCREENSHOT"], full_page=True)
