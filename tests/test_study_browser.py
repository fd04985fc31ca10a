"""The study in a real browser (issue 19, item 5): headless Chromium (Debian's ``chromium`` + ``chromium-driver``)
driven by Selenium completes a 3-case study as two participants: alice answers, goes back and revises a pick;
bob answers one case, the server is SIGKILLed and restarted, bob stops and resumes with his code and finishes.
Every vote sent before the kill is there; the votes equal the picks the test clicked, and Table 3 equals a count
done here by hand. Set ANYMS_STUDY_SCREENSHOT=1 to write docs/study_case.png (a case page; random images)."""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from eval.study import store
from eval.study.analysis import write_study_report
from eval.study.build import load_study

from .conftest import REPO, needs_browser
from .study_helpers import Server, run_study, write_study_run

pytestmark = needs_browser


def _wait_path(driver, path: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(lambda d: d.current_url.split("?")[0].endswith(path))


def _login(driver, server: Server, code: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(server.url + "/")
    driver.find_element(By.ID, "code").send_keys(code)
    driver.find_element(By.ID, "start").click()


def _answer(driver, study: dict, plan: dict, expected: dict, participant: str, case_id: str, button: str = "next",
            then: str | None = None) -> None:
    """Sets the checkboxes of the case page to ``plan[criterion]`` (positions on screen, 1-based), notes the
    methods picked in ``expected`` and presses ``button``."""
    from selenium.webdriver.common.by import By

    _wait_path(driver, f"/case/{case_id}")
    for m in study["methods"]:
        assert m not in driver.page_source  # method names never reach the participant
    method_of = {o["id"]: o["method"] for c in study["cases"] for o in c["options"]}
    for criterion, positions in plan.items():
        picked = []
        for pos in range(1, len(study["methods"]) + 1):
            box = driver.find_element(By.ID, f"{criterion}-{pos}")
            if box.is_selected() != (pos in positions):
                box.click()
            if pos in positions:
                picked.append(method_of[box.get_attribute("value")])
        expected[(participant, case_id, criterion)] = sorted(picked)
    driver.find_element(By.ID, button).click()
    if then:
        _wait_path(driver, then)


def _shown_order(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.get_attribute("value") for e in driver.find_elements(By.CSS_SELECTOR, "input[name=overall_quality]")]


def _current(study_dir: Path) -> dict:
    out: dict = {}
    for v in store.all_votes(study_dir):
        out.setdefault((v["participant"], v["case_id"], v["criterion"]), []).append(v["method"])
    return {k: sorted(v) for k, v in out.items()}


def test_two_participants_revise_resume_and_survive_sigkill(browser, tmp_path):
    run = write_study_run(tmp_path / "run")
    run_study("build", f"run_dir={run}", "n_cases=3")
    study_dir = run / "study"
    study = load_study(study_dir)
    cases = [c["id"] for c in study["cases"]]
    criteria = study["criteria"]

    def plan(shift: int) -> dict:
        p = {c: [(shift + k) % 3 + 1] for k, c in enumerate(criteria)}
        p["overall_quality"] = [1, (shift % 2) + 2]  # two picks
        return p

    expected: dict = {}
    orders = {}
    server = Server(study_dir).start()
    try:
        # alice: case 1, case 2, then Back to case 1 to revise a pick, then on to the end
        _login(browser, server, "alice")
        orders[("alice", cases[0])] = (_wait_path(browser, f"/case/{cases[0]}"), _shown_order(browser))[1]
        _answer(browser, study, plan(0), expected, "alice", cases[0], then=f"/case/{cases[1]}")
        orders[("alice", cases[1])] = _shown_order(browser)
        _answer(browser, study, plan(1), expected, "alice", cases[1], button="back", then=f"/case/{cases[0]}")
        before_revision = _current(study_dir)[("alice", cases[0], "text_alignment")]
        revised = plan(0)
        revised["text_alignment"] = [(revised["text_alignment"][0] % 3) + 1]  # another image
        _answer(browser, study, revised, expected, "alice", cases[0], then=f"/case/{cases[1]}")
        assert _current(study_dir)[("alice", cases[0], "text_alignment")] != before_revision
        # the revised page shows alice's own picks again; the screenshot of a case page, picks filled in
        from selenium.webdriver.common.by import By

        assert sum(b.is_selected() for b in browser.find_elements(By.CSS_SELECTOR, "input[type=checkbox]")) == 5
        shot = tmp_path / "study_case.png"
        browser.save_screenshot(str(shot))
        _answer(browser, study, plan(1), expected, "alice", cases[1], then=f"/case/{cases[2]}")
        orders[("alice", cases[2])] = _shown_order(browser)
        _answer(browser, study, plan(2), expected, "alice", cases[2], button="next", then="/done")

        # bob: one case, then the server dies (SIGKILL) between his votes
        browser.delete_all_cookies()
        _login(browser, server, "bob")
        _wait_path(browser, f"/case/{cases[0]}")
        assert "checked" not in browser.page_source  # alice's picks are not shown to bob
        orders[("bob", cases[0])] = _shown_order(browser)
        _answer(browser, study, plan(2), expected, "bob", cases[0], then=f"/case/{cases[1]}")
        server.kill()
        assert _current(study_dir) == expected  # every vote sent before the kill is there
        server.start()
        # bob stops and resumes with his code: back at his first unanswered case
        browser.get(server.url + f"/case/{cases[1]}")
        browser.find_element(By.ID, "stop").click()
        _wait_path(browser, "/stop")
        browser.get(server.url + f"/case/{cases[1]}")
        assert "Enter your participant code first" in browser.page_source  # stopped: no case without the code
        _login(browser, server, "bob")
        _wait_path(browser, f"/case/{cases[1]}")
        orders[("bob", cases[1])] = _shown_order(browser)
        _answer(browser, study, plan(0), expected, "bob", cases[1], then=f"/case/{cases[2]}")
        orders[("bob", cases[2])] = _shown_order(browser)
        _answer(browser, study, plan(1), expected, "bob", cases[2], then="/done")
    finally:
        server.stop()

    # the votes are exactly the picks clicked (the revision replaced alice's first answer, kept as superseded)
    assert _current(study_dir) == expected
    every = store.all_votes(study_dir, include_superseded=True)
    # superseded, kept: alice's first answer to case 1 (revised) and her answer to case 2 sent with Back (sent
    # again with Next), 5 rows each (4 criteria, two picks for overall quality)
    assert sum(v["superseded"] for v in every) == 2 * (len(criteria) + 1)
    con = sqlite3.connect(study_dir / store.VOTES_FILE)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    # shuffled per participant and case: not every page shows the study's stored order
    stored = {c["id"]: [o["id"] for o in c["options"]] for c in study["cases"]}
    assert any(order != stored[case] for (_, case), order in orders.items())
    assert orders[("alice", cases[0])] != orders[("bob", cases[0])] or orders[("alice", cases[1])] != orders[("bob", cases[1])] \
        or orders[("alice", cases[2])] != orders[("bob", cases[2])]

    # Table 3 against a count by hand
    write_study_report(study_dir, tmp_path / "report", samples=100)
    t3 = pd.read_csv(tmp_path / "report" / "table3.csv").set_index("method")
    for criterion in criteria:
        counts = Counter(m for (p, c, k), ms in expected.items() if k == criterion for m in ms)
        total = sum(counts.values())
        for m in study["methods"]:
            assert t3.loc[m, criterion] == pytest.approx(counts[m] / total), (criterion, m)
            assert t3.loc[m, f"{criterion}_votes"] == counts[m]
    assert (t3["participants"] == 2).all()

    if os.environ.get("ANYMS_STUDY_SCREENSHOT"):
        from PIL import Image

        image = Image.open(shot).convert("RGB")
        image.quantize(colors=64).save(REPO / "docs" / "study_case.png", optimize=True)
