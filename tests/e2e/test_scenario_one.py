"""Scenario 1 in a real browser: launch a long-context run that runs out of memory, read its post-mortem,
apply the top fix, watch the re-run complete, and compare the two.

The run is tiny-llama on the CPU with eager attention at 4,096 tokens under a 0.25 GiB budget (the
Launch page's "Scenario 1" setup, examples/cpu-oom.yaml): it fails in its first forward, in
attention, as a 7B LoRA does at 4k tokens on an A100; sdpa is the fix that fits.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from db import open_engine
from db.queries import get_run
from tests.e2e.conftest import CHROMIUM

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no Chromium at {CHROMIUM}: install Debian's (apt-get install chromium chromium-driver; "
    "scripts/test.sh does it when run as root); a browser downloaded by `playwright install` is never used",
)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is missing: .venv/bin/pip install -r requirements-dev.txt"
)
expect = sync_api.expect

# A trainer imports torch and transformers before its first step: ~10 s alone on two cores, more under load.
RUN_TIMEOUT_MS = 150_000
PAGE_TIMEOUT_MS = 60_000


# Screenshots of every page along the way, kept as the test's artifacts (CI can upload the folder).
ARTIFACTS = Path(os.environ.get("OOMLENS_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
ARTIFACTS = ARTIFACTS / "e2e"


def run_id_in(url: str) -> int:
    return int(re.search(r"[?&]run=(\d+)", url).group(1))


class Screenshots:
    def __init__(self, page) -> None:
        self.page, self.taken = page, 0
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str) -> Path:
        # A page still running shows grey placeholders and a Stop button: wait for its script to end
        # (give it a moment to start: the running indicator appears only once the rerun is under way).
        self.page.wait_for_timeout(1500)
        self.page.wait_for_function(
            '!document.querySelector(\'[data-testid="stSkeleton"], [data-testid="stStatusWidget"]\')',
            timeout=PAGE_TIMEOUT_MS,
        )
        self.taken += 1
        path = ARTIFACTS / f"{self.taken:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def test_scenario_one_launch_oom_post_mortem_apply_fix_relaunch_compare(server, page):
    main = page.get_by_test_id("stMain")
    shot = Screenshots(page)

    # Launch: the scenario-1 setup, started from the form.
    page.goto(f"{server.url}/launch")
    expect(main.get_by_role("heading", name="Launch", exact=True)).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    page.get_by_role("combobox", name="Start from a common setup").click()
    page.get_by_role("option", name=re.compile(r"^Scenario 1")).click()
    expect(main.get_by_text("Eager attention at 4,096 tokens under a 0.25 GiB budget")).to_be_visible()
    shot("launch")
    page.locator(".st-key-launch-go button").click()  # Streamlit's class for the widget keyed "launch.go"

    # Run page: it lands there, and the run ends as oom.
    page.wait_for_url(re.compile(r"/run\?run=\d+$"), timeout=PAGE_TIMEOUT_MS)
    oom_id = run_id_in(page.url)
    expect(main.get_by_text(re.compile(r"Out of memory at step 1, micro-batch 0 in forward"))).to_be_visible(
        timeout=RUN_TIMEOUT_MS
    )
    expect(main).to_contain_text("What it asked for: The failed 512.0 MiB request is 2 × 4 × 4,096 × 4,096 × 4 B")
    shot("run-oom")

    # Post-mortem: the step, the layer, and the fixes ranked, efficient attention first.
    main.get_by_role("link", name=re.compile(r"^Post-mortem: what held the memory")).click()
    page.wait_for_url(re.compile(rf"/postmortems\?run={oom_id}$"), timeout=PAGE_TIMEOUT_MS)
    expect(main.get_by_role("heading", name="Fixes, best first")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    expect(main.get_by_test_id("stMetric").filter(has_text="Step")).to_contain_text("1")
    expect(main.get_by_test_id("stMetric").filter(has_text="Phase")).to_contain_text("forward")
    expect(main).to_contain_text("model.layers.0.self_attn")  # the layer it died in
    # What the failed request was: eager attention's scores, with the arithmetic.
    expect(main).to_contain_text("The failed 512.0 MiB request is 2 × 4 × 4,096 × 4,096 × 4 B")
    expect(main.get_by_text(re.compile(r"^1\. efficient attention"))).to_be_visible()
    expect(main.get_by_text(re.compile(r"^2\. "))).to_be_visible()  # ranked: more than one fix
    expect(main.get_by_text("model.attn_implementation=sdpa", exact=True).first).to_be_visible()
    expect(main.get_by_text("fits alone").first).to_be_visible()
    shot("postmortem")

    # Apply & relaunch the top fix: a child run that completes.
    main.get_by_role("button", name=re.compile(r"Apply & relaunch")).first.click()
    page.wait_for_url(re.compile(r"/run\?run=\d+$"), timeout=PAGE_TIMEOUT_MS)
    child_id = run_id_in(page.url)
    assert child_id != oom_id
    expect(
        main.get_by_role("heading", name=re.compile(rf"^Run {child_id} · fix: model.attn_implementation=sdpa"))
    ).to_be_visible()
    expect(main.get_by_role("paragraph").filter(has_text=re.compile(r"completed$"))).to_be_visible(
        timeout=RUN_TIMEOUT_MS
    )
    shot("run-relaunched")
    engine = open_engine(server.db_url)
    child, parent = get_run(engine, child_id), get_run(engine, oom_id)
    engine.dispose()
    assert (parent.status, child.status, child.parent_run_id) == ("oom", "completed", oom_id)
    assert child.config["model"]["attn_implementation"] == "sdpa"

    # Compare: both runs, and what changed in the config.
    main.get_by_role("link", name=f"Compare with run {oom_id}").click()
    page.wait_for_url(re.compile(r"/compare\?"), timeout=PAGE_TIMEOUT_MS)
    expect(main.get_by_role("heading", name="What changed in the config")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    expect(main.get_by_text("model.attn_implementation: eager → sdpa")).to_be_visible()
    expect(main).to_contain_text(f"run {oom_id} · oom")
    expect(main).to_contain_text(f"run {child_id} · fix: model.attn_implementation=sdpa · completed")
    shot("compare")

    # The other pages, as a user would find them after this walk.
    for path, heading in (("", "Runs"), ("diagnose", "Diagnose"), ("plan", "Plan")):
        page.goto(f"{server.url}/{path}")
        expect(main.get_by_role("heading", name=heading, exact=True)).to_be_visible(timeout=PAGE_TIMEOUT_MS)
        shot(heading.lower())
    assert len(list(ARTIFACTS.glob("*.png"))) >= shot.taken == 8
