"""`rlhflab label serve --db FILE`: the ranking web app, on FastAPI + uvicorn.

Pages (server-rendered HTML, one small script, nothing from elsewhere: it works offline):
    GET  /login, POST /login, POST /logout    sign in with a token from `label add-annotator`
    GET  /rank                  the next task (or ?task=ID: one of your own, to change its label)
    GET  /mine                  the tasks you labelled
    GET  /guidelines            the project's guidelines (Markdown)
    GET  /admin                 progress, throughput, agreement, disputed tasks (admin only)
    GET  /admin/task/ID         every label of one task (admin only)
JSON API (the page uses it with its session cookie; scripts with `Authorization: Bearer TOKEN`):
    GET  /api/next              hand out your next task: {task, prompt, answers: [{slot, text}], rules}
    GET  /api/task/ID           one of your tasks, with your label
    POST /api/label             {task, submission, order: [[letters best]...], all_bad, flags, critiques}
    GET  /api/labels            the tasks you labelled
    GET  /api/admin/stats       the admin page's figures;  POST /api/admin/annotators {name}: a token

Security: a person sees and changes only their own labels (an admin sees all); tokens are stored
as hashes; every text from the database is HTML-escaped and the Content-Security-Policy allows
only the app's own script; a state-changing request signed in by cookie must carry the session's
CSRF token (header X-CSRF-Token, or a form field) and, when the browser sends one, this site's
Origin; SQL is always parameterised.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request), which
# are imported inside create_app because FastAPI is an optional dependency.
import asyncio
import hmac
import html
import json
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template
from urllib.parse import parse_qs

from rlhflab.config import opt
from rlhflab.errors import UsageError
from rlhflab.feedback.label_commands import statistics
from rlhflab.feedback.labeling import LabelDB, Refused

WEB = Path(__file__).parent / "label_web"
COOKIE = "rlhflab_label"
HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                      "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
           "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin",
           "Cache-Control": "no-store"}


@dataclass
class LabelServeConfig:
    """Serve the ranking web app for a labeling database."""

    stage = "label serve"
    db: str = opt("", "the labeling database (made by `rlhflab label init`)")
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0 opens it to the network; put TLS in front)")
    port: int = opt(8100, "port to listen on")
    lease_minutes: float = opt(30.0, "a task handed out and not labelled within this time goes to someone else")
    max_body_kb: int = opt(64, "largest request body in KiB")

    def check(self) -> None:
        if not self.db:
            raise UsageError("--db: give the labeling database (made by `rlhflab label init`)")
        if not 0 < self.port < 65536:   # the other numbers: their ranges (config.RANGES) are checked before this
            raise UsageError(f"--port: must be in 1..65535, got {self.port}")


# ---------------------------------------------------------------------------------------------
# HTML, always escaped.


def h(value) -> str:
    return html.escape(str(value), quote=True)


def _inline(text: str) -> str:
    """Inline Markdown on already-escaped text: `code`, **bold**, *emphasis*, [text](http link)."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<![*\w])\*([^*]+)\*(?!\w)", r"<em>\1</em>", text)
    return re.sub(r"\[([^\]]+)\]\((https?://[^)\s\"]+|/[^)\s\"]*)\)", r'<a href="\2">\1</a>', text)


def markdown(source: str) -> str:
    """The little Markdown guidelines need: headings, paragraphs, lists, code blocks, inline marks.
    The text is escaped first, so no HTML in it ever reaches the page as markup."""
    out, para, items, code = [], [], None, None

    def flush():
        nonlocal para, items
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
        if items:
            tag = items[0]
            out.append(f"<{tag}>" + "".join(f"<li>{_inline(i)}</li>" for i in items[1:]) + f"</{tag}>")
        para, items = [], None

    for raw in source.splitlines():
        line = h(raw)
        if code is not None:
            if raw.strip().startswith("```"):
                out.append("<pre><code>" + "\n".join(code) + "</code></pre>")
                code = None
            else:
                code.append(line)
            continue
        stripped = line.strip()
        bullet = re.match(r"^\s*(?:[-*]|(\d+)\.)\s+(.*)$", raw)
        if raw.strip().startswith("```"):
            flush()
            code = []
        elif not stripped:
            flush()
        elif heading := re.match(r"^(#{1,4})\s+(.*)$", stripped):
            flush()
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif bullet:
            tag = "ol" if bullet.group(1) else "ul"
            if items is None or items[0] != tag:
                flush()
                items = [tag]
            items.append(h(bullet.group(2)))
        elif items is not None:
            items[-1] += " " + stripped
        else:
            para.append(stripped)
    if code is not None:
        out.append("<pre><code>" + "\n".join(code) + "</code></pre>")
    flush()
    return "\n".join(out)


def page(title: str, body: str, person: dict | None, csrf: str = "") -> str:
    nav = ""
    if person:
        links = [("/rank", "rank"), ("/mine", "my labels"), ("/guidelines", "guidelines")]
        if person["admin"]:
            links.append(("/admin", "admin"))
        nav = " ".join(f'<a href="{u}">{t}</a>' for u, t in links)
        nav += (f' <span class="who">{h(person["name"])}</span><form method="post" action="/logout" class="inline">'
                f'<input type="hidden" name="csrf" value="{h(csrf)}"><button type="submit">sign out</button></form>')
    return Template((WEB / "page.html").read_text(encoding="utf-8")).substitute(
        title=h(title), nav=nav, body=body, csrf=h(csrf))


def _prompt_html(prompt: list[dict]) -> str:
    return "".join(f'<div class="turn {h(m["role"])}"><span class="role">{h(m["role"])}</span>'
                   f'<div class="text">{h(m["content"])}</div></div>' for m in prompt)


def rank_body(task: dict, submission: str, notice: str = "") -> str:
    cards = []
    for answer in task["answers"]:
        slot = answer["slot"]
        rules = "".join(f'<label><input type="checkbox" class="rule" value="{h(r)}"> {h(r)}</label>'
                        for r in task["rules"])
        cards.append(
            f'<article class="answer" draggable="true" data-slot="{slot}" id="answer-{slot}">'
            f'<div class="bar"><span class="letter">{slot}</span><span class="place"></span>'
            f'<button type="button" class="place-next">place next</button></div>'
            f'<div class="text">{h(answer["text"])}</div>'
            f'<fieldset class="rules"><legend>breaks a rule</legend>{rules}</fieldset>'
            f'<details><summary>critique</summary><textarea class="critique" maxlength="5000" '
            f'aria-label="critique of answer {slot}"></textarea></details></article>')
    existing = json.dumps(task["label"]).replace("<", "\\u003c")
    return (f'<p id="notice">{h(notice)}</p>'
            f'<section id="task" data-task="{task["task"]}" data-submission="{h(submission)}">'
            f'<h1>Task {task["task"]}</h1><div class="prompt">{_prompt_html(task["prompt"])}</div>'
            f'<div class="workspace"><div id="answers">{"".join(cards)}</div>'
            '<aside><h2>Your order</h2><ol id="order"></ol>'
            '<p class="hint">Click <em>place next</em>, press an answer\'s letter, or drag answers here; '
            'drag within the list to reorder. <em>tie</em> ties an answer with the one above.</p>'
            '<label class="all-bad"><input type="checkbox" id="all-bad"> all bad <kbd>x</kbd></label>'
            '<div class="buttons"><button type="button" id="submit">submit <kbd>Enter</kbd></button>'
            '<button type="button" id="undo">take back <kbd>Backspace</kbd></button></div>'
            '<p id="status" role="status"></p></aside></div></section>'
            f'<script type="application/json" id="existing">{existing}</script>')


def admin_body(stats: dict, token_notice: str = "", csrf: str = "") -> str:
    def fmt(value, percent=False):
        if value is None:
            return "–"
        return f"{100 * value:.1f}%" if percent else (f"{value:.3f}" if isinstance(value, float) else str(value))

    rows = "".join(
        f'<tr><td>{h(p["name"])}{" (admin)" if p["admin"] else ""}</td><td>{p["labels"]}</td><td>{fmt(p["per_hour"])}'
        f'</td><td>{fmt(p["median_seconds"])}</td><td>{fmt(p["majority_agreement"], True)} ({p["majority_pairs"]})</td>'
        f'<td>{fmt(p["gold_agreement"], True)} ({p["gold_pairs"]})</td><td>{p["flags"]}</td></tr>'
        for p in stats["annotators"])
    disputed = "".join(
        f'<tr><td><a href="/admin/task/{d["task"]}">{d["task"]}</a></td><td>{fmt(d["agreement"], True)}</td>'
        f'<td>{d["labels"]}</td><td class="snippet">{h(d["prompt"][:120])}</td></tr>' for d in stats["disputed"])
    return (
        f'<h1>Admin</h1><p class="notice">{h(token_notice)}</p>'
        f'<dl class="figures"><dt>progress</dt><dd id="progress">{fmt(stats["progress"], True)}</dd>'
        f'<dt>tasks complete</dt><dd>{stats["complete"]} of {stats["tasks"]} (overlap {stats["overlap"]})</dd>'
        f'<dt>labels</dt><dd id="labels">{stats["labels"]}</dd><dt>gold items</dt><dd>{stats["gold_tasks"]}</dd>'
        f'<dt>Krippendorff\'s alpha (ordinal)</dt><dd id="alpha">{fmt(stats["alpha"])}</dd>'
        f'<dt>agreement with the majority</dt><dd id="majority">{fmt(stats["majority_agreement"], True)}</dd>'
        f'<dt>agreement with gold</dt><dd id="gold">{fmt(stats["gold_agreement"], True)}</dd></dl>'
        '<h2>Annotators</h2><table id="annotators"><tr><th>name</th><th>labels</th><th>per hour</th>'
        '<th>median s</th><th>with majority (pairs)</th><th>with gold (pairs)</th><th>flags</th></tr>'
        f'{rows}</table>'
        '<h2>Most disagreement</h2><table id="disputed"><tr><th>task</th><th>agreement</th><th>labels</th>'
        f'<th>prompt</th></tr>{disputed}</table>'
        '<h2>New annotator</h2><form method="post" action="/admin/annotators">'
        f'<input type="hidden" name="csrf" value="{h(csrf)}"><input name="name" required maxlength="100" '
        'aria-label="name"> <button type="submit">create and show token</button></form>')


def task_admin_body(task: dict, labels: list[dict], people: dict) -> str:
    answers = "".join(f'<li><div class="text">{h(a)}</div></li>' for a in task["answers"])
    rows = "".join(
        f'<tr><td>{h(people[lb["annotator"]]["name"])}</td><td>{h(lb["ranks"])}</td>'
        f'<td>{"yes" if lb["all_bad"] else ""}'
        f'</td><td>{h(json.dumps(lb["flags"], ensure_ascii=False))}</td>'
        f'<td>{h(json.dumps(lb["critiques"], ensure_ascii=False))}</td></tr>' for lb in labels)
    gold = f'<p>gold ranks: {h(task["gold"])}</p>' if task["gold"] else ""
    return (f'<h1>Task {task["id"]}</h1><p class="source">{h(task["source"])}</p><div class="prompt">'
            f'{_prompt_html(task["prompt"])}</div><h2>Answers (in the file\'s order; ranks below align)</h2>'
            f'<ol start="0" class="plain">{answers}</ol>{gold}<h2>Labels</h2><table><tr><th>annotator</th>'
            f'<th>ranks (1 = best)</th><th>all bad</th><th>flags</th><th>critiques</th></tr>{rows}</table>')


# ---------------------------------------------------------------------------------------------
# The app.


def create_app(db: LabelDB, config: LabelServeConfig):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.exceptions import StarletteHTTPException as HTTPException
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse

    app = FastAPI(title="rlhflab label", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.db = db
    lease_s = config.lease_minutes * 60
    limit = config.max_body_kb * 1024

    def wants_html(request: Request) -> bool:
        return not request.url.path.startswith("/api/")

    def error_response(request: Request, status: int, message: str):
        if status == 401 and wants_html(request):
            return RedirectResponse("/login", status_code=303)
        if wants_html(request):
            body = f'<h1>{status}</h1><p class="error">{h(message)}</p><p><a href="/rank">back</a></p>'
            return HTMLResponse(page(str(status), body, None), status_code=status, headers=HEADERS)
        return JSONResponse({"error": message}, status_code=status, headers=HEADERS)

    @app.exception_handler(Refused)
    async def refused(request, exc: Refused):
        return error_response(request, exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error_response(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error_response(request, 400, str(exc))

    def html_page(title: str, body: str, person: dict | None, csrf: str = "", status: int = 200):
        return HTMLResponse(page(title, body, person, csrf), status_code=status, headers=HEADERS)

    def identify(request: Request) -> tuple[dict, str | None]:
        """(person, the session's CSRF token, or None when signed in by a bearer token)."""
        given = request.headers.get("authorization", "")
        if given:
            scheme, _, token = given.partition(" ")
            person = db.who(token.strip()) if scheme.lower() == "bearer" else None
            if person is None:
                raise Refused(401, "unknown token (send `Authorization: Bearer TOKEN`)")
            return person, None
        cookie = request.cookies.get(COOKIE)
        found = db.session(cookie) if cookie else None
        if found is None:
            raise Refused(401, "sign in first")
        return found

    def check_origin(request: Request) -> None:
        origin = request.headers.get("origin")
        if origin and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
            raise Refused(403, "cross-site request refused")

    def check_csrf(request: Request, csrf: str | None, given: str | None) -> None:
        if csrf is None:   # a bearer token, which a browser never sends by itself
            return
        check_origin(request)
        if not given or not hmac.compare_digest(given.encode(), csrf.encode()):
            raise Refused(403, "missing or wrong CSRF token; reload the page")

    def admin_only(person: dict) -> None:
        if not person["admin"]:
            raise Refused(403, "admin only")

    async def body_bytes(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise Refused(413, f"the request body is over {limit} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise Refused(413, f"the request body is over {limit} bytes")
        return bytes(data)

    async def json_body(request: Request) -> dict:
        try:
            data = json.loads((await body_bytes(request)).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise Refused(400, "the request body is not UTF-8 JSON") from None
        if not isinstance(data, dict):
            raise Refused(400, "the request body must be a JSON object")
        return data

    async def form_body(request: Request) -> dict:
        try:
            fields = parse_qs((await body_bytes(request)).decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            raise Refused(400, "the form is not UTF-8") from None
        return {key: values[-1] for key, values in fields.items()}

    # -- static files and sign-in ------------------------------------------------------------

    @app.get("/static/{name}")
    def static(name: str):
        types = {"rank.js": "text/javascript; charset=utf-8", "label.css": "text/css; charset=utf-8"}
        if name not in types:
            raise Refused(404, "no such file")
        return FileResponse(WEB / name, media_type=types[name], headers={"X-Content-Type-Options": "nosniff"})

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/login")
    def login_page(error: str = ""):
        message = f'<p class="error">{h(error)}</p>' if error else ""
        body = (f'<h1>Sign in</h1>{message}<form method="post" action="/login" class="login">'
                '<label>token <input type="password" name="token" id="token" autocomplete="off" required></label> '
                '<button type="submit">sign in</button></form>')
        return html_page("Sign in", body, None)

    @app.post("/login")
    async def login(request: Request):
        check_origin(request)
        token = (await form_body(request)).get("token", "").strip()
        person = db.who(token) if token else None
        if person is None:
            return RedirectResponse("/login?error=unknown+token", status_code=303)
        session, _ = db.open_session(person["id"])
        response = RedirectResponse("/admin" if person["admin"] else "/rank", status_code=303)
        response.set_cookie(COOKIE, session, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        return response

    @app.post("/logout")
    async def logout(request: Request):
        _, csrf = identify(request)
        check_csrf(request, csrf, (await form_body(request)).get("csrf"))
        db.close_session(request.cookies.get(COOKIE, ""))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- pages -------------------------------------------------------------------------------

    @app.get("/")
    def home(request: Request):
        person, _ = identify(request)
        return RedirectResponse("/admin" if person["admin"] else "/rank", status_code=303)

    @app.get("/rank")
    def rank_page(request: Request, task: int | None = None, done: int | None = None):
        person, csrf = identify(request)
        notice = f"Label for task {done} stored." if done is not None else ""
        if task is None:
            task = db.next_task(person["id"], lease_s)
        if task is None:
            body = (f'<p id="notice">{h(notice)}</p><h1>All done</h1>'
                    '<p id="all-done">No task is left for you. Thank you!</p>')
            return html_page("All done", body, person, csrf or "")
        shown = db.task_for(task, person["id"])
        return html_page(f"Task {task}", rank_body(shown, secrets.token_urlsafe(16), notice), person, csrf or "")

    @app.get("/mine")
    def mine(request: Request):
        person, csrf = identify(request)
        rows = "".join(f'<li><a href="/rank?task={r["task"]}">task {r["task"]}</a> '
                       f'<span class="snippet">{h(r["prompt"][-1]["content"][:100])}</span></li>'
                       for r in db.own_labels(person["id"]))
        return html_page("My labels", f'<h1>My labels</h1><ul id="mine">{rows}</ul>', person, csrf or "")

    @app.get("/guidelines")
    def guidelines(request: Request):
        person, csrf = identify(request)
        return html_page("Guidelines", f'<article class="guidelines">{markdown(db.guidelines)}</article>',
                         person, csrf or "")

    @app.get("/admin")
    def admin_page(request: Request):
        person, csrf = identify(request)
        admin_only(person)
        return html_page("Admin", admin_body(statistics(db), csrf=csrf or ""), person, csrf or "")

    @app.post("/admin/annotators")
    async def admin_new_annotator(request: Request):
        person, csrf = identify(request)
        admin_only(person)
        form = await form_body(request)
        check_csrf(request, csrf, form.get("csrf"))
        token = db.add_annotator(form.get("name", ""))
        notice = f"Token for {form.get('name', '').strip()} (shown once): {token}"
        return html_page("Admin", admin_body(statistics(db), notice, csrf or ""), person, csrf or "")

    @app.get("/admin/task/{task_id}")
    def admin_task(task_id: int, request: Request):
        person, csrf = identify(request)
        admin_only(person)
        tasks, people, labels = db.everything()
        if task_id not in tasks:
            raise Refused(404, f"no task {task_id}")
        body = task_admin_body(tasks[task_id], [lb for lb in labels if lb["task"] == task_id], people)
        return html_page(f"Task {task_id}", body, person, csrf or "")

    # -- the JSON API ------------------------------------------------------------------------

    @app.get("/api/next")
    def api_next(request: Request):
        person, _ = identify(request)
        task = db.next_task(person["id"], lease_s)
        if task is None:
            return JSONResponse({"task": None, "done": True}, headers=HEADERS)
        return JSONResponse(db.task_for(task, person["id"]), headers=HEADERS)

    @app.get("/api/task/{task_id}")
    def api_task(task_id: int, request: Request):
        person, _ = identify(request)
        return JSONResponse(db.task_for(task_id, person["id"]), headers=HEADERS)

    @app.post("/api/label")
    async def api_label(request: Request):
        person, csrf = identify(request)
        check_csrf(request, csrf, request.headers.get("x-csrf-token"))
        body = await json_body(request)
        return JSONResponse(await run_in_thread(db.submit, person["id"], body), headers=HEADERS)

    @app.get("/api/labels")
    def api_labels(request: Request):
        person, _ = identify(request)
        return JSONResponse({"labels": db.own_labels(person["id"])}, headers=HEADERS)

    @app.get("/api/admin/stats")
    def api_stats(request: Request):
        person, _ = identify(request)
        admin_only(person)
        return JSONResponse(statistics(db), headers=HEADERS)

    @app.post("/api/admin/annotators")
    async def api_new_annotator(request: Request):
        person, csrf = identify(request)
        admin_only(person)
        check_csrf(request, csrf, request.headers.get("x-csrf-token"))
        name = (await json_body(request)).get("name")
        if not isinstance(name, str):
            raise Refused(400, "name: expected a string")
        return JSONResponse({"name": name.strip(), "token": db.add_annotator(name)}, headers=HEADERS)

    return app


async def run_in_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)


def run(config: LabelServeConfig) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UsageError("the labeling app needs FastAPI and uvicorn: pip install 'rlhflab[serve]'") from None
    db = LabelDB(config.db)
    app = create_app(db, config)
    where = f"http://{config.host}:{config.port}"
    print(f"labeling {config.db}: {where}/  (sign in with a token from `rlhflab label add-annotator`)",
          file=sys.stderr)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=2)
    finally:
        db.close()
    return 0

