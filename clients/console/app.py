"""The console's web application: Starlette routes rendering Jinja2 templates (autoescaped)
from Admin RPCs made with the operator's own certificate, plus one server-sent-events
stream for the audit tail.

Who may use it: whoever opens the access link the console prints at start (it sets an
HttpOnly, SameSite=Strict cookie); every POST form also carries a CSRF token, compared in
constant time; requests naming another Host are refused (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from clients.console import views
from clients.console.policy_form import form_values, policy_from_form
from clients.sdk import BrokerTlsError, ClientError, OperatorClient
from coalition.clock import wall_clock_ms
from coalition.policy import policy_from_proto, policy_to_proto

HERE = Path(__file__).resolve().parent
COOKIE = "coalition_console"
TAIL = 100
POLL_S = 0.2


@dataclass
class Console:
    """One operator's console: its client to the broker and its secrets."""

    operator: str
    broker: str
    connect: Callable[[], OperatorClient]
    access_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    client: OperatorClient | None = None
    clock: Callable[[], int] = wall_clock_ms

    def rpc(self) -> OperatorClient:
        if self.client is None:
            self.client = self.connect()
        return self.client


@dataclass(frozen=True)
class Problem:
    """A failure told in words: a title, what happened, and what to do."""

    status: int
    title: str
    text: str


def problem_of(exc: ClientError, broker: str) -> Problem:
    """The page for a failed Admin call."""
    code, msg = exc.status, exc.message
    if isinstance(exc, BrokerTlsError):
        return Problem(502, "The broker's certificate was refused", str(exc))
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        if "handshake" in msg.lower() or "certificate" in msg.lower():
            return Problem(
                502,
                "Certificate refused",
                f"The TLS handshake with the broker at {broker} failed: the broker did not "
                f"accept this operator's certificate, or this console does not trust the "
                f"broker's. ({msg})",
            )
        return Problem(
            503,
            "The broker is down or unreachable",
            f"No answer from the broker at {broker}. Check that it is running and that "
            f"this address is right; this page works again as soon as it answers. ({msg})",
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Problem(403, "Certificate refused", f"The broker refused this certificate: {msg}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return Problem(403, "Permission denied", f"The broker refused: {msg}")
    if code == grpc.StatusCode.FAILED_PRECONDITION and "already decided" in msg:
        return Problem(
            409,
            "Proposal already decided",
            f"Another operator decided this proposal first, so nothing was changed. ({msg})",
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return Problem(404, "Not found", msg)
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
        return Problem(409 if code == grpc.StatusCode.FAILED_PRECONDITION else 400, "Refused", msg)
    return Problem(502, "The broker failed", f"{code.name}: {msg}")


def _ms(value: str) -> int:
    """A datetime-local field (UTC) as Unix milliseconds; 0 for empty or unreadable."""
    try:
        t = dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC)
    except ValueError:
        return 0
    return int(t.timestamp() * 1000)


def audit_filters(request: Request) -> dict[str, Any]:
    q = request.query_params
    return {
        "partner": q.get("partner", "").strip().upper(),
        "kind": q.get("kind", "").strip(),
        "since_ms": _ms(q.get("since", "")),
        "until_ms": _ms(q.get("until", "")),
    }


def build_app(console: Console, *, allowed_hosts: list[str] | None = None) -> Starlette:
    """The console's ASGI application for one operator."""
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )

    def render(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        page = env.get_template(name).render(
            operator=console.operator,
            broker=console.broker,
            csrf=console.csrf_token,
            path=request.url.path,
            **ctx,
        )
        return HTMLResponse(page, status_code=status)

    def failed(request: Request, p: Problem) -> HTMLResponse:
        return render(request, "error.html", p.status, problem=p)

    Handler = Callable[[Request], Awaitable[Response]]

    def page(fn: Handler) -> Handler:
        """Access check, then the handler; a failed Admin call becomes its error page."""

        async def run(request: Request) -> Response:
            given = request.cookies.get(COOKIE, "")
            if not hmac.compare_digest(given.encode(), console.access_token.encode()):
                return failed(
                    request,
                    Problem(
                        401,
                        "Open the console's access link",
                        "This console serves only the browser that opened the link it "
                        "printed when it started (it holds an operator's identity).",
                    ),
                )
            if request.method == "POST":
                form = await request.form()
                token = str(form.get("csrf", ""))
                if not hmac.compare_digest(token.encode(), console.csrf_token.encode()):
                    return failed(
                        request,
                        Problem(
                            403,
                            "Form expired",
                            "This form did not come from this console (or the console "
                            "restarted since it was shown): reload the page and try again.",
                        ),
                    )
            try:
                return await fn(request)
            except ClientError as exc:
                return failed(request, problem_of(exc, console.broker))

        return run

    async def enter(request: Request) -> Response:
        token = request.query_params.get("token", "")
        if not hmac.compare_digest(token.encode(), console.access_token.encode()):
            return failed(
                request,
                Problem(401, "Wrong access link", "Use the link the console printed."),
            )
        resp = RedirectResponse("/partners", status_code=303)
        resp.set_cookie(COOKIE, console.access_token, httponly=True, samesite="strict")
        return resp

    async def home(request: Request) -> Response:
        return RedirectResponse("/partners", status_code=303)

    async def partners_page(request: Request) -> Response:
        rows = await views.partners(console.rpc())
        return render(request, "partners.html", partners=rows, done=request.query_params)

    async def suspend(request: Request) -> Response:
        code = request.path_params["code"]
        reason = str((await request.form()).get("reason", "")).strip()
        if not reason:
            return failed(
                request, Problem(400, "A reason is needed", "Say why the partner is suspended.")
            )
        await console.rpc().suspend(code, reason)
        return RedirectResponse(f"/partners?suspended={code}", status_code=303)

    async def partner_page(request: Request) -> Response:
        code = request.path_params["code"]
        client = console.rpc()
        versions = await views.history(client, code)
        current = policy_from_proto((await client.policy(code)).policy)
        return render(
            request,
            "partner.html",
            partner=code,
            versions=versions,
            form=form_values(current),
            done=request.query_params,
        )

    async def change_policy(request: Request) -> Response:
        code = request.path_params["code"]
        form = {k: str(v) for k, v in (await request.form()).items()}
        reason = form.get("reason", "").strip()
        if not reason:
            return failed(request, Problem(400, "A reason is needed", "Say why it changes."))
        client = console.rpc()
        current = await client.policy(code)
        try:
            new = policy_from_form(policy_from_proto(current.policy), form)
        except ValueError as exc:
            return failed(request, Problem(400, "The policy is not valid", str(exc)))
        resp = await client.set_policy(policy_to_proto(new), reason, current.version)
        if resp.WhichOneof("result") == "proposal":
            pid = resp.proposal.proposal_id
            return RedirectResponse(f"/proposals?proposed={pid}", status_code=303)
        return RedirectResponse(f"/partners/{code}?applied={resp.applied.version}", 303)

    async def proposals_page(request: Request) -> Response:
        include = request.query_params.get("all") == "1"
        props = await views.proposals(
            console.rpc(), console.operator, console.clock(), include_decided=include
        )
        return render(
            request,
            "proposals.html",
            proposals=props,
            all=include,
            self_approval=views.SELF_APPROVAL,
            done=request.query_params,
        )

    async def decide(request: Request) -> Response:
        pid, verb = request.path_params["pid"], request.path_params["verb"]
        if verb not in ("approve", "reject"):
            return failed(request, Problem(404, "Not found", f"no action {verb!r}"))
        reason = str((await request.form()).get("reason", "")).strip()
        client = console.rpc()
        if verb == "approve":
            await client.approve(pid, reason)
        else:
            await client.reject(pid, reason)
        return RedirectResponse(f"/proposals?{verb}d={pid}", status_code=303)

    async def audit_page(request: Request) -> Response:
        f = audit_filters(request)
        client = console.rpc()
        entries = await client.audit(**f, limit=TAIL, tail=True)
        verdict = await views.verification(client, console.clock())
        return render(
            request,
            "audit.html",
            entries=[views.entry_dict(e) for e in reversed(entries)],
            last_seq=entries[-1].seq if entries else 0,
            tail=TAIL,
            verdict=verdict,
            q=request.query_params,
        )

    async def audit_stream(request: Request) -> Response:
        f = audit_filters(request)
        try:
            # A reconnecting EventSource says the last entry it got (the events' ids).
            after = max(
                int(request.query_params.get("after", "0") or 0),
                int(request.headers.get("last-event-id", "0") or 0),
            )
        except ValueError:
            after = 0

        async def events() -> AsyncIterator[str]:
            last = after
            since = f["since_ms"]
            yield "retry: 1000\n\n"
            while not await request.is_disconnected():
                try:
                    got = await console.rpc().audit(
                        **{**f, "since_ms": since}, limit=TAIL, tail=True
                    )
                except ClientError as exc:
                    p = problem_of(exc, console.broker)
                    yield f"event: problem\ndata: {json.dumps(p.title)}\n\n"
                    await asyncio.sleep(1)
                    continue
                if len(got) == TAIL and got[0].seq > last + 1 and last:
                    # More than TAIL new entries since the last poll: say so, never hide it.
                    yield f"event: gap\ndata: {json.dumps(got[0].seq - last - 1)}\n\n"
                for e in got:
                    if e.seq > last:
                        last = e.seq
                        since = max(since, e.time_ms)
                        data = json.dumps(views.entry_dict(e))
                        yield f"id: {e.seq}\nevent: entry\ndata: {data}\n\n"
                await asyncio.sleep(POLL_S)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def messages_page(request: Request) -> Response:
        q = request.query_params
        try:
            before = int(q.get("before", "0"))
        except ValueError:
            before = 0
        rows = await views.messages(
            console.rpc(),
            before=before,
            sender=q.get("sender", "").strip().upper(),
            topic=q.get("topic", "").strip(),
        )
        return render(request, "messages.html", messages=rows, q=q)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if console.client is not None:
                await console.client.close()

    routes = [
        Route("/enter", enter),
        Route("/", page(home)),
        Route("/partners", page(partners_page)),
        Route("/partners/{code}/suspend", page(suspend), methods=["POST"]),
        Route("/partners/{code}", page(partner_page)),
        Route("/partners/{code}/policy", page(change_policy), methods=["POST"]),
        Route("/proposals", page(proposals_page)),
        Route("/proposals/{pid}/{verb:str}", page(decide), methods=["POST"]),
        Route("/audit", page(audit_page)),
        Route("/audit/stream", page(audit_stream)),
        Route("/messages", page(messages_page)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    hosts = allowed_hosts or ["127.0.0.1", "localhost", "[::1]", "::1"]
    return Starlette(
        routes=routes,
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)],
        lifespan=lifespan,
    )
