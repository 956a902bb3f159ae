"""The simulated Gemini endpoint: request handling, capacity, rate limits and fault injection."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from simulator import batch, files, outputs, signatures, vertex, wire
from simulator.config import SimConfig, SimStats
from simulator.faults import (
    FINISH_KINDS,
    MODIFIER_KINDS,
    SHAPE_KINDS,
    Directives,
    Fault,
    directive_key,
    parse_directives,
)
from simulator.request import FLEX, PRIORITY, STANDARD, BadRequest, ParsedRequest, field_of, parse_request

TIER_HEADER = "x-gemini-service-tier"
SERVER_TIMEOUT_HEADER = "X-Server-Timeout"
# A request past its X-Server-Timeout answers 504 this much later than the deadline, so a client whose
# timeout equals the header (the SDK sends ceil(timeout)) deterministically times out first.
SERVER_TIMEOUT_GRACE_S = 0.5
RPM_WINDOW_S = 60.0
LOGNORMAL_SIGMA = 0.5
ACTIONS = ("generateContent", "streamGenerateContent")
#: Largest request body read (aiohttp's default is 1 MiB): inline images, inline batches over their limit
#: (refused with the API's 400, not aiohttp's 413) and the SDK's 8 MiB upload chunks fit.
CLIENT_MAX_SIZE = 64 * 1024 * 1024
#: A fault directive in a batch request: the HTTP error it would get from generateContent, which becomes
#: the request's error entry (connection faults have no status: they end as INTERNAL).
BATCH_FAULT_BODIES: dict[str, dict[str, Any]] = {
    "503": wire.unavailable(0),
    "504": wire.deadline_exceeded(),
    "400": wire.invalid_argument(wire.UNKNOWN_FIELD_MESSAGE),
    "403": wire.permission_denied(wire.LEAKED_KEY_MESSAGE),
    "429-billing": wire.billing_depleted(),
}
#: The paths google-genai calls in Vertex AI mode: express mode (an API key), then project and location.
VERTEX_ROUTES = (
    "/{version}/publishers/{publisher}/models/{target}",
    "/{version}/projects/{project}/locations/{location}/publishers/{publisher}/models/{target}",
)


class _Abort(Exception):
    """Close the connection without writing a response."""


@dataclass(frozen=True)
class _Call:
    model: str
    version: str
    stream: bool
    req: ParsedRequest
    directives: Directives
    server_timeout_s: float | None
    route: vertex.Route | None = None  # None: the Gemini API path
    facts: dict[str, Any] | None = None  # what the stats keep of a Vertex AI call

    @property
    def tier(self) -> str:
        return self.req.tier

    @property
    def vertex(self) -> bool:
        return self.route is not None


def _json(status: int, body: dict[str, Any], tier: str | None = None) -> web.Response:
    headers = {TIER_HEADER: tier} if tier is not None else None
    return web.json_response(body, status=status, headers=headers)


def _html(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/html")


def _parse_timeout(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


class Simulator:
    """Owns the state (counters, per-prompt fault counts, in-flight counts) and the aiohttp app."""

    def __init__(self, config: SimConfig) -> None:
        config.validate()
        self.config = config
        self.stats = SimStats()
        self._rng = random.Random(config.seed)
        self._id_rng = random.Random(None if config.seed is None else config.seed + 1)
        self._started_s = time.monotonic()
        self._rpm_windows: dict[str, deque[float]] = {}
        self._overload_turn = 0
        self._closing = asyncio.Event()
        self.app = web.Application(client_max_size=CLIENT_MAX_SIZE)
        self.files = files.FileStore(
            self._authorized, self.stats, random.Random(None if config.seed is None else config.seed + 2)
        )
        self.batches = batch.BatchStore(
            self._authorized, self._batch_answer, self.files, lambda: self.config, self.stats,
            random.Random(None if config.seed is None else config.seed + 3),
        )
        self.batches.routes(self.app)  # before generateContent's route, which would take :batchGenerateContent
        self.files.routes(self.app)
        self.app.router.add_post("/{version}/models/{target}", self._generate)
        for route in VERTEX_ROUTES:
            self.app.router.add_post(route, self._generate)
        self.app.router.add_get("/_sim/stats", self._get_stats)
        self.app.router.add_post("/_sim/reset", self._post_reset)
        self.app.router.add_get("/_sim/config", self._get_config)
        self.app.router.add_post("/_sim/config", self._post_config)
        self.app.router.add_get("/healthz", self._healthz)

    # ---- control -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Clear counters, per-prompt fault state, rate-limit windows, batches and files."""
        self.stats.reset()
        self.batches.clear()
        self.files.clear()
        self._rpm_windows.clear()
        self._overload_turn = 0
        self._started_s = time.monotonic()  # capacity schedules and load profiles start over

    def begin_shutdown(self) -> None:
        """Wake every sleeping or hanging request so that it drops its connection at once."""
        self._closing.set()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started_s

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _get_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats.to_json())

    async def _post_reset(self, _request: web.Request) -> web.Response:
        self.reset()  # also restarts the clock of capacity_schedule and the load profile
        return web.json_response(self.stats.to_json())

    async def _get_config(self, _request: web.Request) -> web.Response:
        return web.json_response(self.config.__dict__)

    async def _post_config(self, request: web.Request) -> web.Response:
        """Change config fields at run time: body {"rate_503": 0.5, ...}."""
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object of SimConfig fields")
            new_config = self.config.updated(changes)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if new_config.seed != self.config.seed:
            self._rng.seed(new_config.seed)
        self.config = new_config
        return web.json_response(self.config.__dict__)

    # ---- generateContent -----------------------------------------------------------------------
    async def _generate(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        facts: dict[str, Any] = {}  # a Vertex AI call's, filled in by _serve
        try:
            response = await self._serve(request, facts)
        except _Abort:
            if request.transport is not None:
                request.transport.abort()
            return web.Response()
        self.stats.count_status(response.status)
        if facts:
            facts["status"] = response.status
        return response

    async def _serve(self, request: web.Request, facts: dict[str, Any]) -> web.StreamResponse:
        version = request.match_info["version"]
        model, _, action = request.match_info["target"].rpartition(":")
        timeout_header = request.headers.get(SERVER_TIMEOUT_HEADER)
        if timeout_header is not None:
            self.stats.record_server_timeout(timeout_header)
        route = vertex.route_of(request.match_info)
        credential = self._credential(request, route)
        if credential is None:
            return _json(401, vertex.unauthenticated()) if route else _json(403, wire.permission_denied())
        if action not in ACTIONS or not model.startswith("gemini-") or (route and route.publisher != "google"):
            if route is not None:
                return _json(404, vertex.not_found(route.resource))
            return _json(404, wire.not_found(model or request.match_info["target"], version))
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _json(400, wire.invalid_argument("Invalid JSON payload received. Unexpected token."))
        try:
            if route is not None:
                body = self._vertex_body(request, credential, body, version, facts)
            req = parse_request(body)
            if route is not None:
                req = replace(req, tier=vertex.header_tier(request.headers))
            outputs.validate(model, req)
        except BadRequest as exc:
            return _json(400, wire.invalid_argument(exc.message, exc.field))
        self.stats.count_tier(req.tier)
        check = signatures.check_signatures(model, req.body)
        self.stats.count_signatures(check.checked, rejected=check.error is not None)
        if check.error is not None:
            return _json(400, wire.invalid_argument(check.error.message, check.error.field))
        directives = parse_directives(req.texts)
        if directives.errors:
            message = f"Simulator: unknown directive(s): {', '.join(directives.errors)}"
            return _json(400, wire.invalid_argument(message))
        stream = action == "streamGenerateContent"
        call = _Call(model, version, stream, req, directives, _parse_timeout(timeout_header), route, facts or None)
        if directives.has_fault:
            return await self._serve_directed(call, request)
        return await self._serve_normal(call, request)

    def _credential(self, request: web.Request, route: vertex.Route | None) -> str | None:
        """Count the request's credential: an API key on both APIs, or (Vertex AI only) a bearer token."""
        if route is None:
            if not (request.headers.get("x-goog-api-key") or request.query.get("key")):
                return None
            self.stats.api_keys_seen += 1
            return "api_key"
        kind = vertex.credential_kind(request.headers, request.query)
        if kind == "api_key":
            self.stats.api_keys_seen += 1
        elif kind == "bearer":
            self.stats.bearer_tokens_seen += 1
        return kind

    def _authorized(self, request: web.Request) -> bool:
        """The Gemini API's key check, for the Batch and Files API routes."""
        return self._credential(request, None) is not None

    async def _batch_answer(self, model: str, body: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """A request inside a batch, answered like generateContent (no capacity, rate limit or latency):
        (the 200 body, None), or (None, the HTTP error body it would get)."""
        try:
            req = parse_request(body)
            outputs.validate(model, req)
        except BadRequest as exc:
            return None, wire.invalid_argument(exc.message, exc.field)
        check = signatures.check_signatures(model, req.body)
        self.stats.count_signatures(check.checked, rejected=check.error is not None)
        if check.error is not None:
            return None, wire.invalid_argument(check.error.message, check.error.field)
        directives = parse_directives(req.texts)
        if directives.errors:
            return None, wire.invalid_argument(f"Simulator: unknown directive(s): {', '.join(directives.errors)}")
        thinking, finish, fault = self._first_fault(directives.faults, req.full_text)
        if fault is not None:
            return None, self._batch_fault_body(model, fault)
        if finish is None:
            await outputs.prepare(model, req)
        answer = outputs.plan(req, model, thinking=thinking, finish_kind=finish, new_id=self._call_id)
        self.stats.count_output(answer.output)
        answered = wire.success_body(req, answer, model, wire.response_id(self._id_rng), STANDARD)
        usage = dict(answered.get("usageMetadata") or {})
        usage.pop("serviceTier", None)  # the tier of a batch request is the batch: not said per response
        return answered | {"usageMetadata": usage}, None

    def _batch_fault_body(self, model: str, fault: Fault) -> dict[str, Any]:
        if fault.kind in BATCH_FAULT_BODIES:
            return BATCH_FAULT_BODIES[fault.kind]
        if fault.kind.startswith("429"):
            return wire.quota_exceeded(model, self.config.retry_delay_s, self._rng)
        if fault.kind == "404":
            return wire.not_found(model, "v1beta")
        return wire.internal()

    def _vertex_body(
        self, request: web.Request, credential: str, body: Any, version: str, facts: dict[str, Any]
    ) -> Any:
        """Record the Vertex request's facts, then take its serviceTier out (refused, or ignored)."""
        has_tier = isinstance(body, dict) and ("serviceTier" in body or "service_tier" in body)
        raw = field_of(body, "serviceTier", "service_tier") if isinstance(body, dict) else None
        facts.update(vertex.call_facts(request.path, credential, request.headers, raw, has_tier))
        self.stats.record_vertex_call(facts)
        if not isinstance(body, dict):
            return body  # parse_request refuses it
        _, rest = vertex.split_service_tier(body, version)
        return rest

    async def _serve_directed(self, call: _Call, request: web.Request) -> web.StreamResponse:
        """Fault directives fire in order of appearance; the first still-active one wins."""
        thinking, finish, fault = self._first_fault(call.directives.faults, call.req.full_text)
        if fault is not None:
            return await self._fault_response(call, fault)
        return await self._answer(call, request, self._service_time(call), thinking, finish)

    def _first_fault(self, faults: Iterable[Fault], full_text: str) -> tuple[bool, str | None, Fault | None]:
        """The directives of one request, counted, in order of appearance: (thinking asked for, the finish
        kind of the first answer-shaping one, or else the first error fault still active)."""
        thinking = False
        for fault in faults:
            key = directive_key(fault.spec, full_text)
            count = self.stats.calls_by_directive_key.get(key, 0) + 1
            self.stats.calls_by_directive_key[key] = count
            if fault.times is not None and count > fault.times:
                continue
            if fault.kind in MODIFIER_KINDS:
                thinking = True
                continue
            if fault.kind in FINISH_KINDS or fault.kind in SHAPE_KINDS or fault.kind == "block":
                return thinking, FINISH_KINDS.get(fault.kind) or SHAPE_KINDS.get(fault.kind, "BLOCK"), None
            return thinking, None, fault
        return thinking, None, None

    async def _fault_response(self, call: _Call, fault: Fault) -> web.Response:
        kind = fault.kind
        if kind == "reset":
            self.stats.connection_resets += 1
            raise _Abort
        if kind == "hang":
            return await self._hang(call)
        delay_s = call.directives.latency_s
        if delay_s is None:
            delay_s = self.config.shed_latency_s if kind == "503" else 0.0
        await self._sleep(delay_s)
        if kind == "503":
            return self._overloaded()
        if kind in ("500", "502", "504", "html500"):
            return self._server_error(kind)
        if kind.startswith("429"):
            return self._quota_error(call, fault)
        if kind == "400":
            return _json(400, wire.invalid_argument(wire.UNKNOWN_FIELD_MESSAGE))
        if kind == "403":
            return _json(403, wire.permission_denied(wire.LEAKED_KEY_MESSAGE))
        if call.route is not None:
            return _json(404, vertex.not_found(call.route.resource))
        return _json(404, wire.not_found(call.model, call.version))

    def _server_error(self, kind: str) -> web.Response:
        if kind == "500":
            return _json(500, wire.internal())
        if kind == "504":
            return _json(504, wire.deadline_exceeded())
        if kind == "502":
            return _html(502, wire.HTML_502)
        return _html(500, wire.HTML_500)

    def _quota_error(self, call: _Call, fault: Fault) -> web.Response:
        if call.vertex:
            return _json(429, vertex.resource_exhausted())  # every 429 kind: Vertex sends no details
        if fault.kind == "429-daily":
            return _json(429, wire.daily_quota_exceeded(call.model, self._rng))
        if fault.kind == "429-billing":
            return _json(429, wire.billing_depleted())
        if fault.kind == "429-legacy":
            return _json(429, wire.legacy_rate_limited(call.model))
        if fault.retry_delay_s is None:
            return _json(429, wire.quota_exceeded(call.model, self.config.retry_delay_s, self._rng))
        delay_s = fault.retry_delay_s
        retry_delay = wire.format_seconds(delay_s) + "s"  # as written in the directive, not truncated
        return _json(429, wire.quota_exceeded(call.model, delay_s, self._rng, retry_delay=retry_delay))

    async def _hang(self, call: _Call) -> web.Response:
        """Never answer; a flex request with X-Server-Timeout gets 504 just after its deadline."""
        if call.tier == FLEX and call.server_timeout_s is not None:
            await self._sleep(call.server_timeout_s + SERVER_TIMEOUT_GRACE_S)
            return _json(504, wire.deadline_exceeded())
        await self._closing.wait()
        raise _Abort

    async def _serve_normal(self, call: _Call, request: web.Request) -> web.StreamResponse:
        """Rate limit, random faults and flex capacity, then a normal answer."""
        cfg = self.config
        if cfg.rpm is not None:
            wait_s = self._rpm_admit(call.model, cfg.rpm)
            if wait_s is not None:
                return self._rate_limited(call, wait_s)
        if cfg.rate_429 > 0 and self._rng.random() < cfg.rate_429:
            return self._rate_limited(call, cfg.retry_delay_s)
        if cfg.rate_500 > 0 and self._rng.random() < cfg.rate_500:
            return _json(500, wire.internal())
        service_s = self._service_time(call)
        if call.tier == PRIORITY:
            return await self._serve_priority(call, request, service_s)
        if call.tier != FLEX:
            return await self._answer(call, request, service_s, False, None)
        elapsed_s = self.elapsed_s
        capacity = cfg.effective_capacity(elapsed_s)
        rate_503 = cfg.effective_rate_503(elapsed_s)
        full = capacity is not None and self.stats.in_flight_flex >= capacity
        if full or (rate_503 > 0 and self._rng.random() < rate_503):
            self.stats.count_shed("capacity" if full else "random")
            await self._sleep(cfg.shed_latency_s)
            return self._overloaded()
        self.stats.flex_started()
        try:
            return await self._answer(call, request, service_s, False, None)
        finally:
            self.stats.flex_finished()

    async def _serve_priority(self, call: _Call, request: web.Request, service_s: float) -> web.StreamResponse:
        """Never shed; past priority_capacity calls in service, quietly served (and billed) at standard."""
        limit = self.config.priority_capacity
        if limit is not None and self.stats.in_flight_priority >= limit:
            self.stats.priority_downgrades += 1
            return await self._answer(call, request, service_s, False, None, served=STANDARD)
        self.stats.priority_started()
        try:
            return await self._answer(call, request, service_s, False, None)
        finally:
            self.stats.priority_finished()

    def _rate_limited(self, call: _Call, delay_s: float) -> web.Response:
        if call.vertex:
            return _json(429, vertex.resource_exhausted())
        return _json(429, wire.quota_exceeded(call.model, delay_s, self._rng))

    def _rpm_admit(self, model: str, rpm: int) -> float | None:
        """Count the request in the model's sliding window; seconds until a slot frees if full."""
        now_s = time.monotonic()
        window = self._rpm_windows.setdefault(model, deque())
        while window and window[0] <= now_s - RPM_WINDOW_S:
            window.popleft()
        if len(window) >= rpm:
            return max(0.0, window[0] + RPM_WINDOW_S - now_s)
        window.append(now_s)
        return None

    def _overloaded(self) -> web.Response:
        self._overload_turn += 1
        return _json(503, wire.unavailable(self._overload_turn - 1))

    def _service_time(self, call: _Call) -> float:
        if call.directives.latency_s is not None:
            return call.directives.latency_s
        mean_s = self.config.latency_s
        dist = self.config.latency_dist
        if mean_s <= 0 or dist == "const":
            return mean_s
        if dist == "exp":
            return self._rng.expovariate(1.0 / mean_s)
        if dist == "uniform":
            return self._rng.uniform(0.5 * mean_s, 1.5 * mean_s)
        mu = math.log(mean_s) - LOGNORMAL_SIGMA**2 / 2.0  # keeps the mean at mean_s
        return self._rng.lognormvariate(mu, LOGNORMAL_SIGMA)

    async def _sleep(self, delay_s: float) -> None:
        """Sleep, unless the server shuts down first: then drop the connection."""
        if delay_s <= 0:
            return
        try:
            await asyncio.wait_for(self._closing.wait(), timeout=delay_s)
        except TimeoutError:
            return
        raise _Abort

    async def _answer(
        self, call: _Call, request: web.Request, service_s: float, thinking: bool, finish: str | None,
        served: str | None = None,
    ) -> web.StreamResponse:
        """Spend the service time (504 if it outlasts a flex X-Server-Timeout), then answer 200 at the
        `served` tier (default: the one asked for, or serve_flex_as for flex)."""
        deadline_s = call.server_timeout_s
        if call.tier == FLEX and deadline_s is not None and service_s > deadline_s:
            await self._sleep(deadline_s + SERVER_TIMEOUT_GRACE_S)
            return _json(504, wire.deadline_exceeded())
        await self._sleep(service_s)
        if finish is None:
            await outputs.prepare(call.model, call.req)
        answer = outputs.plan(call.req, call.model, thinking=thinking, finish_kind=finish, new_id=self._call_id)
        resp_id = wire.response_id(self._id_rng)
        if served is None:
            served = self.config.serve_flex_as if call.tier == FLEX else call.tier
        self.stats.count_ok(call.tier)
        self.stats.count_output(answer.output)
        header_tier = None if call.vertex else served  # Vertex AI says it in usageMetadata.trafficType only
        if call.stream:
            chunks = wire.stream_chunks(call.req, answer, call.model, resp_id, served)
        else:
            chunks = [wire.success_body(call.req, answer, call.model, resp_id, served)]
        if call.vertex:
            chunks = [vertex.with_traffic_type(chunk, served) for chunk in chunks]
            self._count_traffic_type(call, vertex.TRAFFIC_TYPES[served])
        if not call.stream:
            return _json(200, chunks[0], header_tier)
        return await self._stream(request, chunks, header_tier)

    def _count_traffic_type(self, call: _Call, traffic_type: str) -> None:
        self.stats.count_traffic_type(traffic_type)
        if call.facts is not None:
            call.facts["traffic_type"] = traffic_type

    def _call_id(self) -> str:
        return "call-" + wire.response_id(self._id_rng)[:12]

    async def _stream(
        self, request: web.Request, chunks: list[dict[str, Any]], tier: str | None
    ) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream"} | ({TIER_HEADER: tier} if tier is not None else {})
        response = web.StreamResponse(status=200, headers=headers)
        await response.prepare(request)
        try:
            for chunk in chunks:
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n")
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away mid-stream
        return response
