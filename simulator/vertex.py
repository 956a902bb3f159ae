"""Vertex AI's side of the simulator: its paths and credentials, the tier header, the body's
``serviceTier`` it refuses or ignores, ``usageMetadata.trafficType`` and its error bodies.

What is copied from the real service, and what is only modelled, is in docs/gemini-wire.md
("Vertex AI").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from simulator.request import FLEX, PRIORITY, STANDARD, BadRequest, field_of
from simulator.wire import error_body

#: The header that asks for the flex (or priority) pay-as-you-go pool. The body's serviceTier does not.
SHARED_REQUEST_TYPE = "X-Vertex-AI-LLM-Shared-Request-Type"
#: ``shared`` skips Provisioned Throughput, ``dedicated`` uses only it. Recorded, not acted on.
REQUEST_TYPE = "X-Vertex-AI-LLM-Request-Type"
HEADER_TIERS: dict[str, str] = {"flex": FLEX, "priority": PRIORITY}
TRAFFIC_TYPES: dict[str, str] = {FLEX: "ON_DEMAND_FLEX", STANDARD: "ON_DEMAND", PRIORITY: "ON_DEMAND_PRIORITY"}
#: The proto enum names a JSON body may carry: accepted, and never acted on (billed as the header says).
BODY_TIER_NAMES = frozenset(
    {"SERVICE_TIER_UNSPECIFIED", "SERVICE_TIER_STANDARD", "SERVICE_TIER_FLEX", "SERVICE_TIER_PRIORITY"}
)
RESOURCE_EXHAUSTED_MESSAGE = (
    "Resource exhausted. Please try again later. Please refer to "
    "https://cloud.google.com/vertex-ai/generative-ai/docs/error-code-429 for more details."
)
UNAUTHENTICATED_MESSAGE = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie "
    "or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)


@dataclass(frozen=True)
class Route:
    """Where a Vertex request went: ``resource`` is the path between the version and the action,
    e.g. ``projects/p/locations/global/publishers/google/models/gemini-2.5-flash``."""

    resource: str
    publisher: str
    project: str | None
    location: str | None


def route_of(match_info: Mapping[str, str]) -> Route | None:
    """The Vertex route of a request, or None for a Gemini API (AI Studio) path."""
    publisher = match_info.get("publisher")
    if publisher is None:
        return None
    model = match_info["target"].rpartition(":")[0] or match_info["target"]
    project, location = match_info.get("project"), match_info.get("location")
    scope = f"projects/{project}/locations/{location}/" if project is not None else ""
    return Route(f"{scope}publishers/{publisher}/models/{model}", publisher, project, location)


def credential_kind(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """``api_key`` (express mode), ``bearer`` (an OAuth access token, as ADC gives), or None."""
    if headers.get("x-goog-api-key") or query.get("key"):
        return "api_key"
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return "bearer"
    return None


def header_tier(headers: Mapping[str, str]) -> str:
    """The tier the shared-request-type header asks for; any other value (or none) is standard."""
    value = headers.get(SHARED_REQUEST_TYPE, "").strip().lower()
    return HEADER_TIERS.get(value, STANDARD)


def split_service_tier(body: dict[str, Any], version: str) -> tuple[Any, dict[str, Any]]:
    """(the body's serviceTier as sent, the body without it). A value that is not one of the proto
    enum names (``"flex"``, the SDK's spelling) is refused the way Vertex's JSON parser does."""
    raw = field_of(body, "serviceTier", "service_tier")
    rest = {k: v for k, v in body.items() if k not in ("serviceTier", "service_tier")}
    if raw is None or (isinstance(raw, str) and raw in BODY_TIER_NAMES):
        return raw, rest
    shown = f'"{raw}"' if isinstance(raw, str) else repr(raw)
    enum = f"type.googleapis.com/google.cloud.aiplatform.{version}.ServiceTier"
    message = f"Invalid value at 'service_tier' ({enum}), {shown}"
    raise BadRequest(message, field="service_tier")


def call_facts(
    path: str, credential: str, headers: Mapping[str, str], body_tier: Any, has_body_tier: bool
) -> dict[str, Any]:
    """What /_sim/stats keeps of one Vertex request (never a key or a token)."""
    return {
        "path": path,
        "credential": credential,
        "shared_request_type": headers.get(SHARED_REQUEST_TYPE),
        "request_type": headers.get(REQUEST_TYPE),
        "body_has_service_tier": has_body_tier,
        "body_service_tier": body_tier if isinstance(body_tier, str | int | float | bool) else None,
        "status": None,
        "traffic_type": None,
    }


def with_traffic_type(body: dict[str, Any], served_tier: str) -> dict[str, Any]:
    """A 200 body (or stream chunk) as Vertex sends it: ``usageMetadata.trafficType`` always,
    no ``serviceTier`` (that field is the Gemini API's)."""
    usage = dict(body.get("usageMetadata") or {})
    usage.pop("serviceTier", None)
    usage["trafficType"] = TRAFFIC_TYPES[served_tier]
    return {**body, "usageMetadata": usage}


def resource_exhausted() -> dict[str, Any]:
    """Vertex's pay-as-you-go 429: the shared pool is out of capacity. No details, no retry delay."""
    return error_body(429, "RESOURCE_EXHAUSTED", RESOURCE_EXHAUSTED_MESSAGE)


def unauthenticated() -> dict[str, Any]:
    detail = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "CREDENTIALS_MISSING",
              "domain": "googleapis.com", "metadata": {"service": "aiplatform.googleapis.com"}}
    return error_body(401, "UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE, [detail])


def not_found(resource: str) -> dict[str, Any]:
    message = (
        f"Publisher Model `{resource}` was not found or your project does not have access to it. Please ensure "
        "you are using a valid model version. For more information, see: "
        "https://cloud.google.com/vertex-ai/generative-ai/docs/learn/model-versions"
    )
    return error_body(404, "NOT_FOUND", message)
