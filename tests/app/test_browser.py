"""The labeling app in a real browser: Debian's Chromium, driven by Playwright, against `rlhf label serve`.

One test walks the human-feedback loop as an annotator would: log in with a token, rank
four responses with the keyboard shortcuts (a tie included), submit with Ctrl+Enter, see
"Saved", reload, find the label still there, then `rlhf label export` and check the
preference rows. It also takes the README's screenshot of the ranking page. An admin then
opens the engineers' dashboard on a workspace holding a compare report and sees its leaderboard.

Chromium comes from Debian (`apt-get install chromium`; `make test` and `.ci/run`
install it as root). Without it the test is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import build_dashboard_workspace, label_of, unavailable
from labeling_app import auth
from labeling_app.assign import peek_item
from labeling_app.labels import load_task_set
from labeling_app.store import LabelStore
from rlhf import data
from rlhf.artifacts import ArtifactStore

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The README's screenshot is refreshed only on request, so a test run leaves the tree unchanged:
#   RLHF_UPDATE_SCREENSHOTS=1 make test
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "ranking_page.png"
CONVERSATION = [
    {"role": "system", "content": "You are a helpful support agent for a bike shop."},
    {"role": "user", "content": "My order #1042 has not arrived."},
    {"role": "assistant", "content": "Sorry to hear that! When did you place it?"},
    {"role": "user", "content": "Two weeks ago. Can you check where it is?"},
]
RESPONSES = [
    "I checked: order #1042 left our warehouse on Monday and should reach you by Friday. "
    "Here is the tracking link so you can follow it.",
    "Orders take time.",
    "I'm sorry for the wait. I can't see the parcel's location yet, but I've asked the courier "
    "and will email you within a day.",
    "Please contact the courier yourself.",
]

pytestmark = pytest.mark.slow


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium, checked before anything is set up or served."""
    if CHROMIUM.exists():
        return CHROMIUM
    unavailable(f"{CHROMIUM} not found; install Debian's Chromium with `apt-get install -y chromium` (as root)",
                "install it (.ci/run does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rlhf_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("rlhf")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "rlhf.cli", *args]


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 45) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`rlhf label serve` exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1) as r:
                if r.read() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"`rlhf label serve` was not healthy within {timeout} s:\n{log.read_text()}")


@pytest.fixture
def workspace(tmp_path):
    """A workspace with 2 items x 4 responses (overlap 1) and annotator alice; yields (ws, db url, token)."""
    ws, db = tmp_path / "ws", f"sqlite:///{tmp_path / 'labels.db'}"
    arts = ArtifactStore(ws)
    rows = [{"prompt_id": f"support-{i}", "prompt": CONVERSATION,
             "responses": [{"response_id": f"r{j}", "text": text, "model": "checkpoints/sft:v1"}
                           for j, text in enumerate(RESPONSES)]} for i in range(2)]
    with arts.create("dataset", "candidates", stage="generate", config={"schema": "candidates"}) as w:
        data.write_rows(w.path / data.DATA_FILE, rows)
    store = LabelStore(db)
    load_task_set(store, arts, w.result.ref, overlap=1)
    _, token = auth.add_user(store, "alice")
    store.close()
    return ws, db, token


@pytest.fixture
def admin_token(workspace) -> str:
    """Admin root, and the artifacts of a whole loop (a compare report included) in the same workspace."""
    ws, db, _ = workspace
    build_dashboard_workspace(ws)
    store = LabelStore(db)
    _, token = auth.add_user(store, "root", "admin")
    store.close()
    return token


@pytest.fixture
def server(chromium, workspace, tmp_path):
    """`rlhf label serve` on a free port; yields its URL. Stopped with SIGTERM, which serve passes on."""
    ws, db, _ = workspace
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(rlhf_command("--workspace", str(ws), "label", "serve", "--db", db, "--port", str(port)),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, port, log)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_idle(page) -> None:
    """Wait until the app has finished its script run (the state Streamlit marks on its root element)."""
    page.wait_for_timeout(100)  # a rerun that the last input asked for may not have started yet
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for()


def screenshot(page, path: Path) -> None:
    """The whole page. Streamlit scrolls inside its main pane, not the document, so the
    window is made as tall as that pane's content instead of using `full_page`."""
    wait_idle(page)
    height = page.evaluate("document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": 1100, "height": min(int(height), 4000)})
    wait_idle(page)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": 1100, "height": 1000})


def test_log_in_rank_submit_reload_and_export_in_chromium(chromium, workspace, admin_token, server):
    from playwright.sync_api import expect, sync_playwright

    ws, db, token = workspace
    store = LabelStore(db)
    alice = store.user("alice")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.set_default_timeout(20_000)
            page.goto(server)
            page.get_by_label("Login token", exact=True).fill(token)
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_role("heading", name="Rank the responses")).to_be_visible()
            wait_idle(page)  # the run that leases the first item has committed
            assert "s=" in page.url and token not in page.url

            item, shown = peek_item(store, alice, store.task_set().name)  # shown, not yet leased
            prefix = f"item{item.id}"
            # The shortcut script marks the highlighted response once it is listening.
            expect(page.locator(f".st-key-{prefix}_resp_0")).to_have_css("outline-style", "solid")
            wait_idle(page)

            # Keyboard: each digit ranks the highlighted response and moves on. A=2, B=1, C=2, D=3.
            for i, digit in enumerate("2123"):
                page.keyboard.press(digit)
                expect(page.locator(f".st-key-{prefix}_rank_{i}").get_by_role("radio", name=digit)).to_be_checked()
            page.get_by_label("Rationale (optional)", exact=True).fill("B answers the question; A and C are equally fine.")
            page.get_by_label("Rationale (optional)", exact=True).blur()
            shot = DOCS_SCREENSHOT if os.environ.get("RLHF_UPDATE_SCREENSHOTS") else workspace[0] / "ranking_page.png"
            screenshot(page, shot)
            assert shot.stat().st_size > 10_000  # a rendered page, not a blank image

            page.get_by_label("Rationale (optional)", exact=True).focus()
            page.keyboard.press("Control+Enter")
            expect(page.get_by_text("Saved. Your ranking: B > A = C > D")).to_be_visible()
            assert label_of(store, alice, item.id) is not None  # "Saved" came after the commit

            page.reload()
            expect(page.get_by_role("heading", name="Rank the responses")).to_be_visible()
            expect(page.get_by_text("1 / 2 done")).to_be_visible()
            last = page.locator(".st-key-last_submission")
            expect(last.get_by_text("Ranking: B > A = C > D")).to_be_visible()
            expect(last.get_by_text("B answers the question; A and C are equally fine.")).to_be_visible()

            # An admin, in a browser session of their own, opens the dashboard from the sidebar.
            admin = browser.new_page(viewport={"width": 1100, "height": 1000})
            admin.set_default_timeout(20_000)
            admin.goto(server)
            admin.get_by_label("Login token", exact=True).fill(admin_token)
            admin.get_by_role("button", name="Log in").click()
            admin.get_by_role("link", name="Dashboard").click()
            # The dashboard's first render imports its plotting and table code in the server, which
            # on a slow 2-core machine has taken longer than expect's own 5 s default.
            expect(admin.get_by_role("heading", name="Compare leaderboard")).to_be_visible(timeout=60_000)
            assert "/dashboard" in admin.url
            expect(admin.locator("svg .node").first).to_be_visible()  # the lineage graph was drawn
            # A table draws its cells on a canvas and keeps their text in an off-screen grid
            # for screen readers, so the text is found there and the table itself is what is visible.
            board = admin.locator('[data-testid="stDataFrame"]').filter(has_text="1052.1")
            expect(board).to_be_visible()
            expect(board.get_by_text("1020.3 – 1081.0", exact=True)).to_have_count(1)  # ppo's rating CI
            expect(board.get_by_text("ppo", exact=True)).to_have_count(1)
            # Into the test's workspace only: the README's dashboard shows a real demo run, not these fixtures.
            shot = ws / "dashboard.png"
            screenshot(admin, shot)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()

    a, b, c, d = shown  # letter i is shown[i]
    label = label_of(store, alice, item.id)
    assert label.ranking == [[b], sorted([a, c]), [d]] and label.shown_order == shown
    store.close()

    done = subprocess.run(rlhf_command("--workspace", str(ws), "label", "export", "--db", db),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    preferences = data.load_rows(ArtifactStore(ws).resolve("preferences:latest", kind="dataset"))
    text = {f"r{j}": t for j, t in enumerate(RESPONSES)}
    got = {(row["chosen"][0]["content"], row["rejected"][0]["content"]) for row in preferences}
    # B beats everyone, A and C tie (no pair) and both beat D.
    assert got == {(text[b], text[a]), (text[b], text[c]), (text[b], text[d]), (text[a], text[d]), (text[c], text[d])}
    assert all(row["prompt"] == CONVERSATION and row["margin"] == 1.0 for row in preferences)


def log_in_page(browser, server: str, token: str):
    """A new browser context (its own Streamlit session), signed in or refused with `token`."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(20_000)
    page.goto(server)
    page.get_by_label("Login token", exact=True).fill(token)
    page.get_by_role("button", name="Log in").click()
    wait_idle(page)
    return page


def test_two_items_in_a_row_ranked_by_keyboard_are_exported_as_the_keys_pressed(chromium, workspace, server):
    """The item after a "Saved" message takes its keys as pressed: the highlight survives the reruns,
    and a digit never overwrites a rank just given by mouse."""
    from playwright.sync_api import expect, sync_playwright

    ws, db, token = workspace
    store = LabelStore(db)
    alice = store.user("alice")
    pressed: dict[int, str] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = log_in_page(browser, server, token)
            # On the second item response A is ranked by mouse first; the keys then rank B, C, D.
            for mouse, keys in (("", "2123"), ("3", "142")):
                page.get_by_role("heading", name="Rank the responses").click()  # focus the page, not a field
                prefix = page.locator('[class*="st-key-item"][class*="_resp_0"]').first.get_attribute("class")
                item_id = int(re.search(r"st-key-item(\d+)_resp_0", prefix).group(1))
                expect(page.locator(f".st-key-item{item_id}_resp_0")).to_have_css("outline-style", "solid")
                if mouse:
                    page.locator(f".st-key-item{item_id}_rank_0").get_by_text(mouse, exact=True).click()
                    wait_idle(page)
                for key in keys:  # a practised annotator's pace: the next key comes while the last one's rerun runs
                    page.keyboard.press(key)
                    page.wait_for_timeout(150)
                wait_idle(page)
                page.get_by_role("button", name="Submit").scroll_into_view_if_needed()  # where the eye is
                page.keyboard.press("Control+Enter")
                # Feedback shows beside Submit, inside the 1280x900 window, not at the page's top.
                expect(page.get_by_text("Saved. Your ranking:")).to_be_in_viewport()
                wait_idle(page)
                pressed[item_id] = mouse + keys
        finally:
            browser.close()

    done = subprocess.run(rlhf_command("--workspace", str(ws), "label", "export", "--db", db),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = data.load_rows(ArtifactStore(ws).resolve("rankings:latest", kind="dataset"))
    items = {item.prompt_id: item.id for item in store.items(store.task_set().name)}
    assert len(rows) == 2
    for row in rows:
        keys = pressed[items[row["prompt_id"]]]
        shown = row["shown_order"]
        groups: dict[int, list[str]] = {}
        for rid, key in zip(shown, keys):
            groups.setdefault(int(key), []).append(rid)
        assert row["ranking"] == [sorted(groups[k]) for k in sorted(groups)], (keys, shown)
    assert all(label_of(store, alice, i) is not None for i in pressed)
    store.close()


def test_a_client_locked_out_for_guessing_does_not_lock_out_another_on_the_same_ip(chromium, workspace, server):
    from playwright.sync_api import expect, sync_playwright

    _, _, token = workspace
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            guesser = log_in_page(browser, server, "wrong-guess-0")
            for n in range(1, auth.FREE_FAILURES):
                guesser.get_by_label("Login token", exact=True).fill(f"wrong-guess-{n}")
                guesser.get_by_role("button", name="Log in").click()
                wait_idle(guesser)
            expect(guesser.get_by_text("Too many failed logins.")).to_be_visible()
            # Another browser from the same address (127.0.0.1) signs in with the right token.
            annotator = log_in_page(browser, server, token)
            expect(annotator.get_by_role("heading", name="Rank the responses")).to_be_visible()
            # ... and its success does not reset the guesser's lockout.
            guesser.get_by_label("Login token", exact=True).fill("wrong-guess-again")
            guesser.get_by_role("button", name="Log in").click()
            wait_idle(guesser)
            expect(guesser.get_by_text("Too many failed logins.")).to_be_visible()
        finally:
            browser.close()
