"""The votes of a study in SQLite (WAL mode, synchronous=FULL): one row per vote.

    votes(id, participant, case_id, criterion, method, option, time, submission, superseded)

A participant's answer to one case is one transaction: the rows of their earlier answer to that case are marked
``superseded`` (kept, for the audit trail) and the new rows inserted; it is committed before the web app sends
the next page, so a server killed at any point loses no vote a participant saw recorded. Analyses read the rows
with ``superseded = 0``.
"""

from __future__ import annotations

import csv
import os
import sqlite3
import time
from pathlib import Path

VOTES_FILE = "votes.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS votes (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  participant TEXT NOT NULL,
  case_id TEXT NOT NULL,
  criterion TEXT NOT NULL,
  method TEXT NOT NULL,
  option TEXT NOT NULL,
  time REAL NOT NULL,
  submission INTEGER NOT NULL,
  superseded INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS votes_current ON votes (participant, case_id, superseded);
"""
COLUMNS = ("participant", "case_id", "criterion", "method", "option", "time", "submission")


class StoreError(RuntimeError):
    pass


def connect(study_dir: str | os.PathLike, study_id: str | None = None) -> sqlite3.Connection:
    """A connection to the study's votes; the database is made on first use and bound to ``study_id`` (votes of
    another build of the study are refused, not mixed)."""
    path = Path(str(study_dir)) / VOTES_FILE
    con = sqlite3.connect(path, timeout=30, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA busy_timeout=30000")
    con.executescript(SCHEMA)
    if study_id is not None:
        con.execute("BEGIN IMMEDIATE")
        row = con.execute("SELECT value FROM meta WHERE key='study_id'").fetchone()
        if row is None:
            con.execute("INSERT INTO meta VALUES ('study_id', ?)", (study_id,))
        con.execute("COMMIT")
        if row is not None and row[0] != study_id:
            con.close()
            raise StoreError(f"{path} holds the votes of another study ({row[0]}, this one is {study_id}); "
                             "move it away or build the study into another folder")
    return con


def record_answer(con: sqlite3.Connection, participant: str, case_id: str, picks: dict[str, list[tuple[str, str]]]) -> int:
    """One case's answer: ``picks[criterion] = [(option, method), ...]``; supersedes the earlier answer.
    Returns the number of vote rows written. Committed (fsynced) when it returns."""
    now = time.time()
    con.execute("BEGIN IMMEDIATE")
    try:
        submission = con.execute("SELECT COALESCE(MAX(submission), 0) + 1 FROM votes").fetchone()[0]
        con.execute("UPDATE votes SET superseded = 1 WHERE participant = ? AND case_id = ? AND superseded = 0",
                    (participant, case_id))
        rows = [(participant, case_id, criterion, method, option, now, submission)
                for criterion, chosen in picks.items() for option, method in chosen]
        con.executemany("INSERT INTO votes (participant, case_id, criterion, method, option, time, submission) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return len(rows)


def current_picks(con: sqlite3.Connection, participant: str, case_id: str) -> dict[str, list[str]]:
    """The participant's own current picks for a case: ``{criterion: [option, ...]}``."""
    out: dict[str, list[str]] = {}
    for criterion, option in con.execute(
            "SELECT criterion, option FROM votes WHERE participant = ? AND case_id = ? AND superseded = 0 ORDER BY id",
            (participant, case_id)):
        out.setdefault(criterion, []).append(option)
    return out


def answered_cases(con: sqlite3.Connection, participant: str) -> set[str]:
    return {r[0] for r in con.execute("SELECT DISTINCT case_id FROM votes WHERE participant = ? AND superseded = 0",
                                      (participant,))}


def stored_study_id(study_dir: str | os.PathLike) -> str | None:
    """The study id the votes database is bound to (None: no database or no vote yet)."""
    path = Path(str(study_dir)) / VOTES_FILE
    if not path.exists():
        return None
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        row = con.execute("SELECT value FROM meta WHERE key='study_id'").fetchone()
    except sqlite3.OperationalError:
        row = None
    finally:
        con.close()
    return row[0] if row else None


def all_votes(study_dir: str | os.PathLike, include_superseded: bool = False) -> list[dict]:
    path = Path(str(study_dir)) / VOTES_FILE
    if not path.exists():
        return []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        cols = COLUMNS + ("superseded",)
        where = "" if include_superseded else " WHERE superseded = 0"
        rows = con.execute(f"SELECT {', '.join(cols)} FROM votes{where} ORDER BY id").fetchall()
    finally:
        con.close()
    return [dict(zip(cols, r)) for r in rows]


def export_csv(study_dir: str | os.PathLike, out: str | os.PathLike, include_superseded: bool = False) -> int:
    """The admin export: every current vote (``include_superseded``: every row ever written) as CSV."""
    import runfolder

    rows = all_votes(study_dir, include_superseded)
    cols = list(COLUMNS) + (["superseded"] if include_superseded else [])

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    runfolder.atomic_write(out, write)
    return len(rows)
