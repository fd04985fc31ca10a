"""The study's web app (Flask): a participant enters a code, answers one case at a time (one or two images per
criterion), can go back and revise, stop and resume (by entering the same code again).

Flask because the app is a handful of server-rendered form pages with a synchronous SQLite write per answer:
Flask's request-per-thread model and Werkzeug's threaded server fit that directly, with no ASGI server, no
async database driver and no extra form-parsing package (FastAPI would need uvicorn and python-multipart);
Flask is maintained by Pallets and its signed session cookie (itsdangerous) carries the CSRF token.

Safety: every form is checked before anything is stored, and a bad one gets a 4xx and stores nothing: the CSRF
token (a per-session random token in the signed, SameSite=Strict cookie, compared with the form's) and the
Origin/Referer host when the browser sends one; the participant code (``[A-Za-z0-9_-]{2,32}``); the case id; each
field's name (only ``csrf``, ``nav`` and one per criterion); each option id (the case's own); at most two picks per
criterion. Images are looked up by (case, file) in the study's own table, never joined from a URL path.
Participants see their own picks only; method names never leave the server.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import random
import re
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, abort, redirect, render_template_string, request, send_file, session, url_for

from . import store
from .build import FILES, load_study

log = logging.getLogger(__name__)

CODE = re.compile(r"^[A-Za-z0-9_-]{2,32}$")
SECRET_FILE = ".secret_key"

BASE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Image study</title>
<style>
body{font-family:sans-serif;margin:12px;color:#222;max-width:1100px}
.refs img{height:96px;border:1px solid #ccc;margin-right:6px}.layout img{border:1px solid #ccc}
.opts{display:flex;gap:10px;flex-wrap:wrap}.opt{text-align:center}.opt img{width:170px;height:170px;border:1px solid #999}
table.crit td{padding:2px 8px;text-align:center}.err{color:#b00;font-weight:bold}
.top{display:flex;gap:24px;align-items:flex-start}
</style></head><body>{{ body|safe }}</body></html>"""

LOGIN = """<h1>Image study</h1>
{% if error %}<p class="err">{{ error }}</p>{% endif %}
<p>Enter your participant code (letters, digits, - or _). Enter the same code later to resume.</p>
<form method="post" action="{{ url_for('start') }}">
<input type="hidden" name="csrf" value="{{ csrf }}">
<input id="code" name="code" autocomplete="off"> <button id="start" type="submit">Start</button></form>"""

CASE = """<p>Participant <b>{{ participant }}</b> &middot; case {{ index }} of {{ total }}</p>
{% if error %}<p class="err" id="error">{{ error }}</p>{% endif %}
<div class="top"><div><b>Prompt:</b> <span id="prompt">{{ case.prompt }}</span>
<div class="refs"><b>References:</b><br>{% for s in case.subjects %}<figure style="display:inline-block;margin:0 6px 0 0">
<img src="{{ url_for('image', case_id=case.id, name=s.reference) }}" alt="{{ s.phrase }}"><figcaption>{{ s.phrase }}</figcaption></figure>{% endfor %}</div></div>
<div class="layout"><b>Layout:</b><br><img src="{{ url_for('image', case_id=case.id, name=case.layout) }}" alt="layout"></div></div>
<form method="post" action="{{ url_for('case', case_id=case.id) }}">
<input type="hidden" name="csrf" value="{{ csrf }}">
<div class="opts">{% for o in options %}<div class="opt"><img src="{{ url_for('image', case_id=case.id, name=o + '.png') }}" alt="image {{ loop.index }}"><br>Image {{ loop.index }}</div>{% endfor %}</div>
<p>For each question pick one or two images.</p>
<table class="crit"><tr><th></th>{% for o in options %}<th>Image {{ loop.index }}</th>{% endfor %}</tr>
{% for c in criteria %}<tr><td style="text-align:left">{{ questions[c] }}</td>{% for o in options %}
<td><input type="checkbox" name="{{ c }}" value="{{ o }}" id="{{ c }}-{{ loop.index }}" {% if o in picks.get(c, []) %}checked{% endif %}></td>{% endfor %}</tr>{% endfor %}
</table>
<p>{% if index > 1 %}<button type="submit" name="nav" value="back" id="back" formnovalidate>Back</button>{% endif %}
<button type="submit" name="nav" value="next" id="next">{{ 'Finish' if index == total else 'Next' }}</button>
<a href="{{ url_for('stop') }}" id="stop">Stop for now</a></p></form>"""

DONE = """<h1>Thank you</h1><p id="done">You answered all {{ total }} cases, participant <b>{{ participant }}</b>.
You can still <a href="{{ url_for('case', case_id=first) }}">go back and revise</a>.</p>"""

STOPPED = """<h1>Paused</h1><p id="paused">Your answers so far are saved. Enter your code again to resume.</p>
<p><a href="{{ url_for('index') }}">Start page</a></p>"""


ERROR = """<h1>Not accepted</h1><p id="refused">{{ message }} Nothing was stored.</p>
{% if home %}<p><a href="{{ url_for('index') }}">Start page</a></p>{% endif %}"""


def _secret(study_dir: Path) -> bytes:
    path = study_dir / SECRET_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path.read_bytes()


def option_order(study_id: str, participant: str, case: dict) -> list[str]:
    """The case's options in this participant's order: shuffled per participant and case, the same on every visit."""
    options = [o["id"] for o in case["options"]]
    seed = int.from_bytes(hashlib.sha256(f"{study_id}|{participant}|{case['id']}".encode()).digest()[:8], "big")
    random.Random(seed).shuffle(options)
    return options


def create_app(study_dir: str | os.PathLike) -> Flask:
    study_dir = Path(str(study_dir)).resolve()
    study = load_study(study_dir)
    cases = {c["id"]: c for c in study["cases"]}
    order = [c["id"] for c in study["cases"]]
    criteria = list(study["criteria"])
    max_picks = int(study["max_picks"])
    # the only files served: (case, name) -> path inside the study folder
    files = {}
    for c in study["cases"]:
        names = [f"{o['id']}.png" for o in c["options"]] + [s["reference"] for s in c["subjects"]] + [c["layout"]]
        for name in names:
            files[(c["id"], name)] = study_dir / FILES / c["id"] / name
    store.connect(study_dir, study["study_id"]).close()  # binds the database to this study (refuses another's)

    app = Flask(__name__)
    app.secret_key = _secret(study_dir)
    app.config.update(SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_HTTPONLY=True, MAX_CONTENT_LENGTH=64 * 1024)

    def db():
        return store.connect(study_dir)

    def page(template: str, status: int = 200, **context):
        body = render_template_string(template, **context)
        return render_template_string(BASE, body=body), status, {"Cache-Control": "no-store",
                                                                 "X-Frame-Options": "DENY",
                                                                 "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'"}

    def csrf_token() -> str:
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(32)
        return session["csrf"]

    @app.before_request
    def check_cross_site():
        if request.method != "POST":
            return None
        source = request.headers.get("Origin") or request.headers.get("Referer")
        if source and source != "null" and urlsplit(source).netloc != request.host:
            abort(403, "cross-site request refused")
        if source == "null":
            abort(403, "cross-site request refused")
        sent = request.form.get("csrf", "")
        expected = session.get("csrf", "")
        if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
            abort(403, "missing or wrong form token: reload the page")
        return None

    @app.errorhandler(401)
    def not_signed_in(err):
        return page(ERROR, 401, message="Enter your participant code first.", home=True)

    @app.errorhandler(400)
    @app.errorhandler(403)
    @app.errorhandler(404)
    def refused(err):
        return page(ERROR, err.code, message=f"{err.name}: {err.description}", home=err.code == 403)

    @app.get("/")
    def index():
        if session.get("participant"):
            return redirect(url_for("resume"))
        return page(LOGIN, csrf=csrf_token(), error=None)

    @app.post("/start")
    def start():
        if set(request.form) - {"csrf", "code"}:
            abort(400, "unexpected form field")
        code = request.form.get("code", "").strip()
        if not CODE.match(code):
            return page(LOGIN, 400, csrf=csrf_token(), error="A participant code is 2-32 letters, digits, - or _.")
        session.clear()
        session["participant"] = code
        session["csrf"] = secrets.token_urlsafe(32)
        return redirect(url_for("resume"))

    @app.get("/resume")
    def resume():
        participant = _participant()
        con = db()
        try:
            done = store.answered_cases(con, participant)
        finally:
            con.close()
        todo = [c for c in order if c not in done]
        return redirect(url_for("case", case_id=todo[0]) if todo else url_for("finished"))

    def _participant() -> str:
        participant = session.get("participant")
        if not participant or not CODE.match(participant):
            abort(401, "enter your participant code first")
        return participant

    def _case(case_id: str) -> dict:
        if case_id not in cases:
            abort(404, "no such case in this study")
        return cases[case_id]

    def render_case(case: dict, participant: str, picks: dict, error: str | None = None, status: int = 200):
        return page(CASE, status, case=case, participant=participant, index=order.index(case["id"]) + 1,
                    total=len(order), options=option_order(study["study_id"], participant, case), criteria=criteria,
                    questions=study["questions"], picks=picks, csrf=csrf_token(), error=error)

    @app.get("/case/<case_id>")
    def case(case_id):
        participant = _participant()
        c = _case(case_id)
        con = db()
        try:
            picks = store.current_picks(con, participant, case_id)
        finally:
            con.close()
        return render_case(c, participant, picks)

    @app.post("/case/<case_id>")
    def answer(case_id):
        participant = _participant()
        c = _case(case_id)
        allowed = {"csrf", "nav", *criteria}
        if set(request.form) - allowed:
            abort(400, "unexpected form field")
        nav = request.form.getlist("nav")
        if len(nav) > 1 or (nav and nav[0] not in ("next", "back")):
            abort(400, "bad navigation value")
        method_of = {o["id"]: o["method"] for o in c["options"]}
        picks: dict[str, list[str]] = {}
        for criterion in criteria:
            chosen = request.form.getlist(criterion)
            if any(o not in method_of for o in chosen):
                abort(400, "an image id that this case does not contain")
            if len(set(chosen)) != len(chosen):
                abort(400, "the same image picked twice")
            if len(chosen) > max_picks:
                abort(400, f"more than {max_picks} picks for one question")
            picks[criterion] = chosen
        i = order.index(case_id)
        going_back = nav == ["back"]
        missing = [k for k in criteria if not picks[k]]
        if missing and not (going_back and not any(picks.values())):
            # a half-answered case is not stored: the participant answers every question or none (going back)
            return render_case(c, participant, picks, status=422,
                               error="Pick one or two images for every question" + (" (or none, to go back)"
                                                                                     if going_back else "") + ".")
        if not missing:
            con = db()
            try:
                store.record_answer(con, participant, case_id,
                                    {k: [(o, method_of[o]) for o in v] for k, v in picks.items()})
            finally:
                con.close()
        if going_back:
            return redirect(url_for("case", case_id=order[max(i - 1, 0)]))
        return redirect(url_for("case", case_id=order[i + 1]) if i + 1 < len(order) else url_for("resume"))

    @app.get("/done")
    def finished():
        participant = _participant()
        return page(DONE, participant=participant, total=len(order), first=order[0])

    @app.get("/stop")
    def stop():
        session.clear()
        return page(STOPPED)

    @app.get("/files/<case_id>/<name>")
    def image(case_id, name):
        _participant()
        path = files.get((case_id, name))
        if path is None or not path.is_file():
            abort(404)
        return send_file(path, mimetype="image/png", max_age=0)

    return app


def serve(study_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000) -> None:
    app = create_app(study_dir)
    log.info("study: serving %s at http://%s:%s/ (Ctrl-C stops; votes are in %s)", study_dir, host, port,
             Path(str(study_dir)) / store.VOTES_FILE)
    try:
        app.run(host=host, port=int(port), threaded=True, debug=False, use_reloader=False)
    except OSError as err:  # the port taken, or a host this machine does not have
        raise SystemExit(f"study serve: cannot listen on {host}:{port} ({err.strerror or err}); give port=...") from None
