"""The record contract: what a job record holds (status, attempts, result, error, cost).

Field names here are stable and documented in docs/job-record.md (generated from this module by
``python -m flexq.gendocs``); workers, the CLI and scripts read them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from producer.request import STORED, GenerateRequest
from producer.status import TERMINAL, Fallback, Outcome, Status, Tier


def utcnow() -> datetime:
    return datetime.now(UTC)


class Usage(BaseModel):
    prompt_tokens: int = Field(default=0, description="tokens of the prompt (`promptTokenCount`)")
    output_tokens: int = Field(default=0, description="tokens of the answer (`candidatesTokenCount`)")
    thoughts_tokens: int = Field(
        default=0, description="thinking tokens (`thoughtsTokenCount`), billed at the output rate"
    )
    total_tokens: int = Field(default=0, description="the API's `totalTokenCount`")
    cached_tokens: int = Field(default=0, description="prompt tokens served from a context cache")
    tool_use_prompt_tokens: int = Field(
        default=0, description="prompt tokens of tool results (`toolUsePromptTokenCount`)"
    )
    prompt_details: dict[str, int] = Field(
        default_factory=dict, description="prompt tokens per modality, e.g. `{\"TEXT\": 12, \"IMAGE\": 258}`"
    )
    output_details: dict[str, int] = Field(
        default_factory=dict, description="answer tokens per modality, e.g. `{\"IMAGE\": 1120}` for one image"
    )
    traffic_type: str | None = Field(default=None, description="the API's `trafficType`, when it sends one")


class Attempt(BaseModel):
    number: int = Field(description="1, 2, ... in order; the count goes on after `flexq retry`")
    tier: Tier = Field(description="the tier this attempt asked for")
    served_tier: str | None = Field(
        default=None,
        description="the tier the API says it served (`x-gemini-service-tier` header); null without a 200 answer",
    )
    started_at: datetime = Field(description="when the attempt started")
    finished_at: datetime | None = Field(default=None, description="when it ended; null while it is in flight")
    latency_ms: int | None = Field(default=None, description="from start to end, in milliseconds")
    outcome: Outcome | None = Field(  # None while the attempt is in flight
        default=None, description="how the attempt ended (see the outcomes table); null while it is in flight"
    )
    http_status: int | None = Field(
        default=None, description="HTTP status; null for timeouts, connection errors and interruptions"
    )
    error: str | None = Field(
        default=None, description="the error message, secrets redacted, cut at 1,000 characters"
    )
    retry_in_s: float | None = Field(
        default=None,
        description="the delay chosen when this attempt led to a retry (0: straight to the standard tier)",
    )
    usage: Usage | None = Field(default=None, description="token usage of a 200 answer")
    worker: str | None = Field(default=None, description="the worker process that ran it: `host:pid:random`")
    channel: str | None = Field(
        default=None,
        description="the channel it was sent through (`FLEXQ_CHANNELS`: an AI Studio key, a Vertex AI project, a "
        "relay); `default` without channels configured; for a `batch` attempt, the Batch API job's name",
    )


class ImageRef(BaseModel):
    index: int = Field(description="0, 1, ... in the order the images appear in the answer")
    candidate: int = Field(default=0, description="the candidate the image belongs to (0: the first)")
    part_index: int = Field(description="the image's position in its candidate's `content.parts`")
    mime_type: str = Field(description="e.g. `image/png`")
    bytes: int = Field(description="size of the image in bytes")
    sha256: str = Field(description="hex digest: the image's key in the blob store")
    width: int | None = Field(default=None, description="pixels, read from the image header")
    height: int | None = Field(default=None, description="pixels, read from the image header")


class FunctionCall(BaseModel):
    id: str | None = Field(default=None, description="the call's id, to send back in the `function_response`")
    name: str = Field(description="the declared function's name")
    args: dict[str, Any] = Field(default_factory=dict, description="the arguments, as the model wrote them")


class JobResult(BaseModel):
    text: str | None = Field(
        description="the answer's text parts joined, thoughts left out; null when there is none "
        "(e.g. thinking used the whole token budget)"
    )
    finish_reason: str | None = Field(description="the candidate's finish reason: `STOP`, `MAX_TOKENS`, ...")
    usage: Usage = Field(description="token usage of the successful call")
    model_version: str | None = Field(description="the model version the API reports")
    tier: str = Field(description="the tier served (the requested tier when the API does not say)")
    finish_message: str | None = Field(default=None, description="the candidate's `finishMessage`, if any")
    content: dict[str, Any] | None = Field(
        default=None,
        description="the first candidate's `Content` exactly as returned (thoughts, `thought_signature`s, function "
        "calls with their ids...), inline bytes replaced by `inline_data.blob_sha256` references",
    )
    function_calls: list[FunctionCall] = Field(default_factory=list, description="the function calls in `content`")
    images: list[ImageRef] = Field(
        default_factory=list, description="the images in the answer (their bytes are in the blob store)"
    )
    parsed: Any = Field(default=None, description="the answer parsed as JSON, when JSON output was asked for")
    safety_ratings: list[dict[str, Any]] | None = Field(default=None, description="the candidate's safety ratings")
    citation_metadata: dict[str, Any] | None = Field(default=None, description="the candidate's citations")
    grounding_metadata: dict[str, Any] | None = Field(default=None, description="search grounding, if used")
    url_context_metadata: dict[str, Any] | None = Field(default=None, description="URL context tool metadata")
    prompt_feedback: dict[str, Any] | None = Field(default=None, description="the response's `promptFeedback`")
    response_id: str | None = Field(default=None, description="the API's `responseId`")
    candidates: list[dict[str, Any]] = Field(
        default_factory=list,
        description="other candidates (`candidate_count` > 1), each as `{content, finish_reason, ...}`",
    )


class JobError(BaseModel):
    kind: str = Field(  # client_error | blocked | deadline_exceeded | unreachable | cancelled | invalid_job | ...
        # interrupted | no_image | invalid_output
        description="why the job ended without an answer (see the error kinds table)"
    )
    message: str = Field(description="what happened, in one line")
    http_status: int | None = Field(default=None, description="the last attempt's HTTP status, if any")


class Redaction(BaseModel):
    by: str = Field(
        description="the redactor: `builtin`, the `module:function` of `FLEXQ_REDACT`, or the callable's "
        "`module:qualname` given to `FlexQueue.connect(redactor=...)`"
    )
    changed: int = Field(
        description="texts it changed: the prompt, text parts of the user turns, the system instruction (0: none)"
    )


class BatchRef(BaseModel):
    """The Gemini Batch API job a ``batch``-tier job was packed into (worker.batch_tier)."""

    name: str = Field(description="the Batch API job's name, `batches/...`")
    submitted_at: datetime = Field(description="when the batch was created")
    channel: str | None = Field(default=None, description="the channel it was created on")


class JobRecord(BaseModel):
    """The persisted state of one job; ``flexq status ID --json`` prints exactly this."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(description="the job id: 1-128 letters, digits, `.`, `_`, `:` or `-`")
    status: Status = Field(
        description="`queued`: waiting for its first attempt (or for a flow-control permit); `running`: an "
        "attempt is in flight; `retrying`: waiting for the next attempt; `succeeded`, `failed`, `cancelled`: ended"
    )
    created_at: datetime = Field(description="when the job was enqueued")
    updated_at: datetime = Field(description="the record's last change")
    deadline_at: datetime = Field(description="the retry budget: no attempt starts after it (`flexq retry` resets it)")
    tier: Tier = Field(
        default=Tier.FLEX,
        description="the tier asked for at enqueue: `flex` (the default), `standard`, `priority` (not shed; the "
        "attempt's `served_tier` says when the API served it at standard), or `batch` (through the Gemini Batch API)",
    )
    fallback: Fallback = Field(
        default="none",
        description="where the job goes when its tier gives up: `standard` (after flex; for a `batch` job, flex "
        "first), `flex` (a `batch` job whose Batch API job expired or failed runs on flex), `none`",
    )
    channels: list[str] | None = Field(
        default=None,
        description="the channels to try, in order (a channel that is open or paused is skipped); null: every "
        "channel the worker has, in its `FLEXQ_CHANNELS` order",
    )
    batch: BatchRef | None = Field(
        default=None, description="the Batch API job a `batch`-tier job is waiting in; null otherwise"
    )
    tags: dict[str, str] = Field(default_factory=dict, description="the producer's labels, string to string")
    request: GenerateRequest | None = Field(  # None only for a record quarantined as invalid_job
        description="the request as submitted; null only for a record quarantined as `invalid_job`"
    )
    attempts: list[Attempt] = Field(default_factory=list, description="one entry per call to the API, oldest first")
    result: JobResult | None = Field(default=None, description="the answer, once the job has succeeded")
    error: JobError | None = Field(default=None, description="why the job failed or was cancelled")
    cost_usd: float | None = Field(
        default=None, description="USD of the successful call on its tier; null when the model's price is unknown"
    )
    standard_cost_usd: float | None = Field(default=None, description="the same usage priced at the standard tier")
    cancel_requested: bool = Field(
        default=False, description="set by `flexq cancel`; a running job ends `cancelled` when its call is aborted"
    )
    next_tier: Tier = Field(
        default=Tier.FLEX,
        description="the tier of the next attempt: the job's `tier`, then `standard` after an escalation (or `flex` "
        "after an expired batch)",
    )
    interrupts: int = Field(
        default=0,
        description="attempts cut short by a dead or stopping worker since the last enqueue; "
        "the job fails at `FLEXQ_MAX_INTERRUPTS`",
    )
    enqueues: int = Field(default=1, description="1, plus one per `flexq retry`")
    cache: bool = Field(
        default=False,
        description="answer from the response cache when an identical request was answered lately, and cache "
        "a fresh answer (`producer.cache`)",
    )
    parent_id: str | None = Field(
        default=None, description="the job this one continues (`continue_from`): its request holds that thread"
    )
    redaction: Redaction | None = Field(
        default=None,
        description="set when a redactor ran over the request at enqueue (`FLEXQ_REDACT`): `request` holds its "
        "output, the original text was neither stored nor sent",
    )

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def open_attempt(self) -> Attempt | None:
        if self.attempts and self.attempts[-1].finished_at is None:
            return self.attempts[-1]
        return None

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=False)

    @classmethod
    def from_json(cls, raw: bytes | str) -> JobRecord:
        return cls.model_validate_json(raw, context=STORED)
