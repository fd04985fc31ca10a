"""The human study kit (issue 19) without a browser: building, the analysis against counts done by hand, the
report hook, and every bad input of item 3 sent over HTTP to a real server (a 4xx and nothing stored)."""

from __future__ import annotations

import shutil
import socket
import sqlite3

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from eval.study import store
from eval.study.analysis import krippendorff_alpha, metric_agreement, table3
from eval.study.build import StudyError, build_study, load_study

from .study_helpers import COMBINATIONS, METHODS, Server, csrf_of, options_of, run_study, write_study_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_study_run(tmp_path_factory.mktemp("study_run") / "run")


@pytest.fixture(scope="module")
def study_dir(run):
    run_study("build", f"run_dir={run}", "n_cases=3")
    return run / "study"


def test_build_draws_cases_across_subject_counts_reproducibly(run, tmp_path):
    a = build_study([run], tmp_path / "a", n_cases=3, seed=5)
    b = build_study([run], tmp_path / "b", n_cases=3, seed=5)
    assert [(c["combination"], c["seed"], [o["id"] for o in c["options"]]) for c in a["cases"]] == \
           [(c["combination"], c["seed"], [o["id"] for o in c["options"]]) for c in b["cases"]]
    assert sorted(c["n_subjects"] for c in a["cases"]) == sorted(set(COMBINATIONS.values()))  # one per count
    nine = build_study([run], tmp_path / "nine", seed=0)  # the default: the paper's 9
    assert nine["n_cases"] == 9 and len({(c["combination"], c["seed"]) for c in nine["cases"]}) == 9
    counts = [c["n_subjects"] for c in nine["cases"]]
    # round robin over the counts: the 4-subject combination has 2 (combination, seed) pairs, both drawn; the rest
    # split evenly
    assert counts.count(4) == 2 and abs(counts.count(2) - counts.count(3)) <= 1
    case = a["cases"][0]
    folder = tmp_path / "a" / "files" / case["id"]
    for o in case["options"]:  # the images are the run folder's pixels, under opaque names, without metadata
        shown, source = Image.open(folder / f"{o['id']}.png"), Image.open(run / o["image"])
        assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(source.convert("RGB")))
        assert o["method"] not in o["id"] and not shown.info
    # a PNG imported from elsewhere that names its method in a text chunk: the study's copy does not
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text("Comment", "made by ms_diffusion")
    o = case["options"][1]
    tagged = tmp_path / "tagged"
    shutil.copytree(run, tagged, ignore=shutil.ignore_patterns("study*"))
    Image.open(tagged / o["image"]).save(tagged / o["image"], pnginfo=meta)
    rebuilt = build_study([tagged], tmp_path / "tagged_study", n_cases=3, seed=5)
    option = next(x for x in rebuilt["cases"][0]["options"] if x["method"] == o["method"])
    assert b"ms_diffusion" not in (tmp_path / "tagged_study" / "files" / rebuilt["cases"][0]["id"] / f"{option['id']}.png").read_bytes()
    assert (folder / "layout.png").is_file() and (folder / "ref0.png").is_file()
    with pytest.raises(StudyError, match="n_cases=99"):
        build_study([run], tmp_path / "c", n_cases=99)
    with pytest.raises(StudyError, match="none of the run folders"):
        build_study([run], tmp_path / "d", methods=["anyms", "nope"])
    with pytest.raises(StudyError, match="holds a study already"):
        build_study([run], tmp_path / "a", n_cases=3, seed=5)


def _votes(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["participant", "case_id", "criterion", "method"])


def test_table3_shares_and_bootstrap_by_hand():
    rows = [("p1", "case01", "text_alignment", "anyms"), ("p1", "case01", "text_alignment", "ms_diffusion"),
            ("p2", "case01", "text_alignment", "anyms"), ("p3", "case01", "text_alignment", "text_only"),
            ("p1", "case01", "layout_control", "anyms")]
    t = table3(_votes(rows), list(METHODS), ["text_alignment", "layout_control"], samples=200, seed=0).set_index("method")
    assert t.loc["anyms", "text_alignment"] == pytest.approx(2 / 4)
    assert t.loc["ms_diffusion", "text_alignment"] == pytest.approx(1 / 4)
    assert t.loc["text_only", "text_alignment"] == pytest.approx(1 / 4)
    assert t.loc["anyms", "layout_control"] == 1.0 and t.loc["text_only", "layout_control"] == 0.0
    assert t.loc["anyms", "text_alignment_votes"] == 2
    assert 0 <= t.loc["anyms", "text_alignment_lo"] <= 0.5 <= t.loc["anyms", "text_alignment_hi"] <= 1


def test_krippendorff_alpha_perfect_and_chance():
    study = {"criteria": ["text_alignment"], "cases": [
        {"id": f"case{i}", "options": [{"method": m} for m in METHODS]} for i in range(4)]}
    same = [(p, f"case{i}", "text_alignment", METHODS[i % 3]) for p in ("a", "b", "c") for i in range(4)]
    assert krippendorff_alpha(_votes(same), study).loc[0, "alpha"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noise = [(p, f"case{i}", "text_alignment", METHODS[rng.integers(3)]) for p in "abcdefgh" for i in range(4)]
    assert krippendorff_alpha(_votes(noise), study).loc[0, "alpha"] < 0.4


def test_metric_agreement_by_hand():
    study = {"criteria": ["text_alignment"], "cases": [
        {"id": "case01", "combination": "c01", "seed": 0, "options": [{"method": m} for m in METHODS]}]}
    metrics = pd.DataFrame({"case_id": "case01", "method": list(METHODS), "clip_t": [30.0, 20.0, 10.0]})
    # people: anyms 2 votes, ms_diffusion 1, text_only 0 -> same order as the metric: tau = 1, top-1 agrees
    rows = [("a", "case01", "text_alignment", "anyms"), ("b", "case01", "text_alignment", "anyms"),
            ("a", "case01", "text_alignment", "ms_diffusion")]
    per_case, summary = metric_agreement(_votes(rows), study, metrics)
    assert per_case.loc[0, "top1"] and per_case.loc[0, "tau"] == pytest.approx(1.0)
    # people prefer text_only: the metric's best is not theirs, the order is reversed
    rows = [("a", "case01", "text_alignment", "text_only"), ("b", "case01", "text_alignment", "text_only"),
            ("a", "case01", "text_alignment", "ms_diffusion")]
    per_case, summary = metric_agreement(_votes(rows), study, metrics)
    assert not per_case.loc[0, "top1"] and per_case.loc[0, "tau"] == pytest.approx(-1.0)
    assert summary.loc[0, "top1_agreement"] == 0.0


def _login(client: httpx.Client, code: str) -> httpx.Response:
    token = csrf_of(client.get("/").text)
    return client.post("/start", data={"csrf": token, "code": code}, follow_redirects=True)


def _count(study_dir) -> int:
    con = sqlite3.connect(study_dir / store.VOTES_FILE)
    try:
        return con.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
    finally:
        con.close()


def test_bad_input_gets_4xx_and_stores_nothing(study_dir):
    study = load_study(study_dir)
    criteria = study["criteria"]
    server = Server(study_dir).start()
    try:
        # bound to localhost by default: the machine's other addresses do not answer
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(("10.255.255.255", 1))
                own = probe.getsockname()[0]
            except OSError:
                own = "127.0.0.1"
        if not own.startswith("127."):
            with pytest.raises(OSError):
                socket.create_connection((own, server.port), timeout=2).close()
        with httpx.Client(base_url=server.url, timeout=20) as client:
            bad_code = client.post("/start", data={"csrf": csrf_of(client.get("/").text), "code": "../../x;drop"})
            assert bad_code.status_code == 400
            page = _login(client, "alice")
            assert page.status_code == 200 and "/case/case01" in str(page.url)
            html = page.text
            for m in study["methods"]:  # method names never reach the participant
                assert m not in html
            token = csrf_of(html)
            opts = options_of(html, criteria[0])
            good = {"csrf": token, "nav": "next", **{c: [opts[0]] for c in criteria}}
            before = _count(study_dir)
            other_case = study["cases"][1]["options"][0]["id"]
            bad = {
                "unknown case": ("/case/case99", good),
                "unknown option (method id)": ("/case/case01", {**good, criteria[0]: ["odeadbeef"]}),
                "another case's option": ("/case/case01", {**good, criteria[0]: [other_case]}),
                "method name as option": ("/case/case01", {**good, criteria[0]: [study["methods"][0]]}),
                "three picks": ("/case/case01", {**good, criteria[0]: opts[:3]}),
                "same pick twice": ("/case/case01", {**good, criteria[0]: [opts[0], opts[0]]}),
                "forged field": ("/case/case01", {**good, "participant": "bob"}),
                "forged criterion": ("/case/case01", {**good, "method": [opts[0]]}),
                "bad nav": ("/case/case01", {**good, "nav": "jump"}),
                "no csrf token": ("/case/case01", {k: v for k, v in good.items() if k != "csrf"}),
                "wrong csrf token": ("/case/case01", {**good, "csrf": "x" * 43}),
                "missing answers": ("/case/case01", {"csrf": token, "nav": "next", criteria[0]: [opts[0]]}),
            }
            for what, (url, data) in bad.items():
                r = client.post(url, data=data)
                assert 400 <= r.status_code < 500, (what, r.status_code)
                assert _count(study_dir) == before, what
            # a cross-site form post: the browser names the other origin (and would not send the cookie at all)
            r = client.post("/case/case01", data=good, headers={"Origin": "http://evil.example"})
            assert r.status_code == 403 and _count(study_dir) == before
            # a form from another site with no session at all
            with httpx.Client(base_url=server.url, timeout=20) as stranger:
                r = stranger.post("/case/case01", data=good)
                assert r.status_code in (401, 403) and _count(study_dir) == before
                assert stranger.get("/case/case01").status_code == 401
                assert stranger.get(f"/files/case01/{opts[0]}.png").status_code == 401
            # images only from the study's own files
            assert client.get(f"/files/case01/{opts[0]}.png").status_code == 200
            for path in ["/files/case01/..%2Fstudy.json", "/files/case01/%2E%2E%2F%2E%2E%2Fstudy.json",
                         "/files/..%2F..%2Fstudy.json/x", "/files/case01/../../study.json", "/files/case01/layout.PNG",
                         "/files/case01/.secret_key", "/files/case01/%2Fetc%2Fpasswd", "/files/case02/" + opts[0] + ".png",
                         "/study.json", "/votes.sqlite"]:
                r = client.get(path)
                assert r.status_code == 404, (path, r.status_code)
                assert b"study_id" not in r.content and b"SQLite" not in r.content
            # the good form is stored, in one piece
            assert client.post("/case/case01", data=good).status_code == 302
            assert _count(study_dir) == before + len(criteria)
            # another participant cannot see alice's picks
            with httpx.Client(base_url=server.url, timeout=20) as bob:
                page = _login(bob, "bob")
                assert "checked" not in bob.get("/case/case01").text
    finally:
        server.stop()


def test_export_and_report(study_dir, tmp_path):
    study = load_study(study_dir)
    con = store.connect(study_dir, study["study_id"])
    try:
        for p, pick in (("r1", 0), ("r2", 0), ("r3", 1)):
            for case in study["cases"]:
                o = case["options"][pick]
                store.record_answer(con, p, case["id"], {c: [(o["id"], o["method"])] for c in study["criteria"]})
    finally:
        con.close()
    out = run_study("export", f"study_dir={study_dir}", f"export_csv={tmp_path / 'votes.csv'}")
    exported = pd.read_csv(tmp_path / "votes.csv")
    assert set(exported.columns) >= {"participant", "case_id", "criterion", "method", "time"}
    assert len(exported) == len(store.all_votes(study_dir)) and "votes" in out.stdout
    run_study("report", f"study_dir={study_dir}", f"out_dir={tmp_path / 'report'}", "bootstrap.samples=50")
    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"table3.md", "table3.csv", "table3.tex", "agreement.md", "agreement.csv"} <= files
    md = (tmp_path / "report" / "table3.md").read_text()
    ours, published = md.split("## Published (not measured here)")
    assert "AnyMS (published)" in published and "(published)" not in ours and "0.72" in published
    assert "; as printed" in published and "x 100" not in published  # vote shares are shown as printed
    t3 = pd.read_csv(tmp_path / "report" / "table3.csv")
    assert set(t3["method"]) == set(study["methods"])  # the csv holds our rows only
    agreement = pd.read_csv(tmp_path / "report" / "agreement.csv")
    assert set(agreement["metric"]) == {"clip_t", "iou", "ap50", "clip_i", "dino", "dreamsim"}
    # r1 and r2 pick option 0, r3 option 1 in every case: check agreement against the synthetic metrics, which
    # rank anyms > ms_diffusion > text_only (dreamsim reversed; per-image AP50 100 / 100 or 0 / 0)
    cases = pd.read_csv(tmp_path / "report" / "agreement_cases.csv")
    for case in study["cases"]:
        people = case["options"][0]["method"]
        for metric, best in (("clip_t", "anyms"), ("iou", "anyms"), ("dreamsim", "text_only")):
            row = cases[(cases["case_id"] == case["id"]) & (cases["metric"] == metric)].iloc[0]
            assert row["metric_best"] == best and bool(row["top1"]) == (people == best), (case["id"], metric)
        ap = cases[(cases["case_id"] == case["id"]) & (cases["metric"] == "ap50")].iloc[0]
        assert ap["metric_best"] == "anyms,ms_diffusion" and bool(ap["top1"]) == (people != "text_only")


def test_report_hook_adds_table3(tmp_path):
    """eval/report.py calls report_hook: nothing without votes; with a study's votes, Table 3 beside Table 1."""
    from eval.study.analysis import report_hook

    run = write_study_run(tmp_path / "run", methods=METHODS[:2], seeds=(0,))
    study = build_study([run], run / "study", n_cases=2)
    assert report_hook([run], tmp_path / "report") == []  # no votes yet: no Table 3
    con = store.connect(run / "study", study["study_id"])
    try:
        for case in study["cases"]:
            o = case["options"][0]
            store.record_answer(con, "p1", case["id"], {c: [(o["id"], o["method"])] for c in study["criteria"]})
    finally:
        con.close()
    files = report_hook([run], tmp_path / "report", {"samples": 20, "seed": 0}, "TINY")
    # a study built again over its votes with other cases: serving and reporting refuse, nothing is mixed
    build_study([run], run / "study", n_cases=2, seed=7, overwrite=True)
    with pytest.raises(StudyError, match="another build"):
        report_hook([run], tmp_path / "report2")
    with pytest.raises(store.StoreError, match="another study"):
        from eval.study.app import create_app

        create_app(run / "study")
    assert "table3.md" in files and (tmp_path / "report" / "table3.md").read_text().count("TINY") == 1
    t3 = pd.read_csv(tmp_path / "report" / "table3.csv").set_index("method")
    first = study["cases"][0]["options"][0]["method"]
    assert t3.loc[first, "overall_quality_votes"] == sum(c["options"][0]["method"] == first for c in study["cases"])


def test_report_calls_the_hook():
    """The hook in eval/report.py stays a few lines (other work changes that file)."""
    from .conftest import REPO

    text = (REPO / "eval" / "report.py").read_text()
    assert "from eval.study.analysis import report_hook" in text and "report_hook(run_dirs, out" in text
