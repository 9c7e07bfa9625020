"""``GET /openapi.json``: the HTTP API described as OpenAPI 3.1, generated from its models.

Every schema comes from a pydantic model — the request models the routes validate with
(``schemas.ChatRequest``, ``schemas.OpenAIChatBody``, ``routes.jobs.JobRequest``, the query
models of ``/api/probe`` and ``/api/streams``) and the answer models below — through
pydantic's own ``models_json_schema``, so a field added to a model is in the document
without anyone writing it twice. ``OPERATIONS`` adds what a model cannot say: each route's
content types (``text/plain`` and ``text/event-stream`` for streamed answers), its
parameters and the errors it can answer with.

The paths are read from the app's route table, so a route removed is gone from the
document; a route neither in ``OPERATIONS`` nor in ``UNDOCUMENTED`` is a test failure
(tests/test_openapi.py). Schemathesis checks a live server against this document in the
suite: no 5xx, and every status, content type and body as documented.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from . import __version__
from .jobs.model import JobStatus, WebhookState
from .routes.jobs import IDEMPOTENCY_KEY_MAX, JobRequest
from .routes.probe import ProbeParams
from .routes.streams import Cursor
from .schemas import ChatRequest, OpenAIChatBody
from .responses_request import ResponsesBody
from .state import app_state

# --- the answers' shapes ---


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True)


class ErrorDetail(_Answer):
    type: str = Field(description="What went wrong, for programs: validation_error, model_not_found, …")
    message: str = Field(description="What went wrong and what to do, for people.")


class ErrorBody(_Answer):
    """tokenrelay's error, on every ``/api`` path."""

    error: ErrorDetail


class OpenAIErrorDetail(_Answer):
    message: str
    type: str = Field(description="OpenAI's error type: invalid_request_error, authentication_error, …")
    param: str | None = Field(description="The request field at fault, when one is.")
    code: str | None = Field(description="tokenrelay's own error type.")


class OpenAIErrorBody(_Answer):
    """An error in OpenAI's shape, on every ``/v1`` path, which its SDKs raise as their own exceptions."""

    error: OpenAIErrorDetail


class Usage(_Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class WholeAnswer(_Answer):
    """``/api/get-response`` with ``"stream": false``: the answer in one piece at its end."""

    text: str
    finish_reason: str | None
    usage: Usage | None
    model: str


class UpstreamInfo(_Answer):
    name: str
    kind: str
    pattern: str | None
    url: str | None = Field(description="Without credentials.")


class Info(_Answer):
    upstream: str
    upstreams: list[UpstreamInfo]
    routed: bool
    simulated: bool
    model: str | None = Field(description="The default model; None when clients must name one.")
    version: str
    auth_required: bool


class JobAccepted(_Answer):
    id: str
    status: JobStatus


class JobResult(_Answer):
    text: str
    finish_reason: str | None
    usage: dict[str, int] | None


class JobWebhook(_Answer):
    url: str
    id: str = Field(description="The webhook-id sent on every delivery attempt.")
    state: WebhookState


class JobDelivery(_Answer):
    attempt: int
    at: str
    status_code: int | None
    duration_ms: int
    error: str | None


class JobView(_Answer):
    """A job as ``GET /api/jobs/{id}`` shows it (``jobs.model.Job.public``)."""

    id: str
    status: JobStatus
    model: str
    result: JobResult | None
    error: ErrorDetail | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    webhook: JobWebhook | None
    deliveries: list[JobDelivery]


class StreamEnding(_Answer):
    model_config = ConfigDict(frozen=True, extra="allow")

    kind: Literal["done", "error", "stopped"]


class StreamStatus(_Answer):
    """A resumable answer's state (``routes.streams.status``)."""

    id: str
    model: str
    status: Literal["running", "completed", "failed", "stopped"]
    text: str = Field(description="The answer so far.")
    last_event_id: int
    ending: StreamEnding | None


class ModelEntry(_Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Answer):
    object: Literal["list"]
    data: list[ModelEntry]


class _Passed(_Answer):
    # An OpenAI-compatible upstream's answer is passed on as it came: more fields than these.
    model_config = ConfigDict(frozen=True, extra="allow")


class ChatCompletion(_Passed):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]


class _Event(_Answer):
    """One server-sent event, as an SSE parser reads it: before OpenAPI 3.2 a
    ``text/event-stream`` schema describes each event of the stream."""

    data: str = Field(description="JSON, except OpenAI's closing [DONE].")


class AnswerEvent(_Event):
    """tokenrelay's SSE (``streaming.sse``): ``start``, then one event per piece of text
    (no name; ``id`` counts from 1, for Last-Event-ID), then ``done``, ``error`` or
    ``stopped``. Pings in silences are comments, which carry no event."""

    event: Literal["start", "message", "done", "error", "stopped"] = Field(
        default="message", description="The event's name; unnamed (message) for each piece of text.")
    id: str | None = Field(default=None, pattern=r"^[0-9]+$")


class TickEvent(_Event):
    event: Literal["tick"]
    id: str = Field(pattern=r"^[0-9]+$")


class ChunkEvent(_Event):
    """OpenAI's streamed chat completion: each chunk as data, then ``data: [DONE]``; an
    error after the first chunk is a ``data: {"error": …}`` event."""

    event: Literal["message"] = "message"


class ResponseObject(_Passed):
    """OpenAI's Response object (``/v1/responses``), as tokenrelay builds it from the logged
    events or an upstream serving the Responses API passes it on."""

    id: str
    object: Literal["response"]
    status: str
    model: str
    output: list[dict[str, Any]]


class ResponseEvent(_Event):
    """A Responses streaming event: named by its type (``response.created``,
    ``response.output_text.delta``, … ``response.completed``, ``response.failed``, ``error``);
    its data is JSON carrying the same ``type`` and a ``sequence_number``."""

    event: str = Field(pattern=r"^(response\.[a-z_.]+|error)$")


class ResponseCursor(_Answer):
    stream: bool | None = Field(default=None, description="true: the events as SSE, else the Response object.")
    starting_after: int | None = Field(default=None, ge=-1,
                                       description="With stream: the events after this sequence_number.")


# --- the operations ---

TEXT = "text/plain"
SSE = "text/event-stream"
JSON = "application/json"

Content = Mapping[str, type[BaseModel] | None]
"""A response's content types, each with its model (for SSE: each event's); None: plain text."""


@dataclass(frozen=True)
class Link:
    """An OpenAPI link: where this answer's value goes as the next request's parameter
    (what a client, or Schemathesis' stateful phase, does next)."""

    name: str
    method: str
    path: str
    parameter: str
    value: str
    """A runtime expression: ``$response.body#/id``, ``$response.header.X-Stream-Id``."""


@dataclass(frozen=True)
class Answer:
    description: str
    content: Content = field(default_factory=dict)
    headers: tuple[str, ...] = ()
    links: tuple[Link, ...] = ()


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    answers: Mapping[int, Answer]
    errors: Mapping[int, str]
    """The error statuses, each with when it is given; the body is the path's error shape."""
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    path_params: tuple[str, ...] = ()
    headers: tuple[tuple[str, dict[str, Any], str], ...] = ()
    public: bool = False
    """Answers without a client key."""


_ACCESS = {401: "No client key, or an unknown one (when the service has client keys).",
           403: "A request a browser sent from another site, or an unknown Host.",
           429: "Over a per-key limit, or too many failed keys from one address; Retry-After says when to try again."}
_BODY = {400: "The body is not valid JSON.",
         413: "The body is larger than TOKENRELAY_MAX_BODY_BYTES.",
         415: "The body is not sent as JSON.",
         422: "A field is missing or has the wrong type or value; the message names it."}
_UPSTREAM = {404: "No route serves the model (model_not_found).",
             502: "The model API failed, or broke its protocol, before the answer began.",
             503: "Too many connections at once, or the service is shutting down.",
             504: "The model API did not answer in time."}
_JOBS = {503: "Jobs are unavailable: their store is away, hung, or was never opened; Retry-After says when to retry."}
_STREAMED = ("Streamed: after the first byte a failure is said in-band (SSE: event: error) or the body "
             "breaks off (text), never as a short answer that looks complete.")

ACCEPT_ANSWER = ("Accept", {"type": "string", "enum": [TEXT, SSE]}, "text/event-stream for SSE events; else plain text.")
ACCEPT_STREAM = ("Accept", {"type": "string", "enum": [JSON, TEXT, SSE]},
                 "text/event-stream: events; text/plain: the text; else the status as JSON.")

_STREAM_LINKS = tuple(Link(name, method, "/api/streams/{stream_id}", "stream_id", "$response.header.X-Stream-Id")
                      for name, method in (("ResumeStream", "GET"), ("StopStream", "DELETE")))
_JOB_LINKS = tuple(Link(name, method, path, "job_id", "$response.body#/id")
                   for name, method, path in (("GetJob", "GET", "/api/jobs/{job_id}"),
                                              ("FollowJob", "GET", "/api/jobs/{job_id}/stream"),
                                              ("CancelJob", "DELETE", "/api/jobs/{job_id}")))

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/api/get-response"): Operation(
        "Ask a model; the answer streams back", "answers",
        {200: Answer("The answer: plain text, SSE events (Accept: text/event-stream), or one JSON object "
                     "(\"stream\": false). " + _STREAMED, {TEXT: None, SSE: AnswerEvent, JSON: WholeAnswer},
                     headers=("X-Stream-Id",), links=_STREAM_LINKS)},
        {**_BODY, **_ACCESS, **_UPSTREAM, 429: _ACCESS[429] + " Or the model API's own rate limit."},
        body=ChatRequest, headers=(ACCEPT_ANSWER,)),
    ("GET", "/api/info"): Operation(
        "What answers: the upstreams, the default model, whether keys are needed", "service",
        {200: Answer("The service's description.", {JSON: Info})}, {403: _ACCESS[403]}, public=True),
    ("POST", "/api/jobs"): Operation(
        "Submit a question; get the answer later", "jobs",
        {202: Answer("Accepted (or the job an Idempotency-Key already made).", {JSON: JobAccepted},
                     headers=("Location",), links=_JOB_LINKS)},
        {**_BODY, 400: "The body is not valid JSON, or webhook_url is given and the service has no webhook secret.",
         **_ACCESS, **_JOBS, 507: "The job store's disk is full; Retry-After says when to retry."},
        body=JobRequest,
        headers=(("Idempotency-Key", {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX},
                  "The same key and body return the same job instead of a new one."),)),
    ("GET", "/api/jobs/{job_id}"): Operation(
        "A job: its status, result, error and webhook attempts", "jobs",
        {200: Answer("The job.", {JSON: JobView})},
        {404: "No such job, or another key's.", **_ACCESS, **_JOBS}, path_params=("job_id",)),
    ("DELETE", "/api/jobs/{job_id}"): Operation(
        "Cancel a queued or running job", "jobs",
        {200: Answer("The cancelled job.", {JSON: JobView})},
        {404: "No such job, or another key's.", 409: "The job has already ended.", **_ACCESS, **_JOBS},
        path_params=("job_id",)),
    ("GET", "/api/jobs/{job_id}/stream"): Operation(
        "Follow a job: what it wrote so far, then live, then event: done or event: error", "jobs",
        {200: Answer("SSE events. " + _STREAMED, {SSE: AnswerEvent})},
        {404: "No such job, or another key's.", **_ACCESS, **_JOBS}, path_params=("job_id",)),
    ("GET", "/api/probe"): Operation(
        "Timed ticks for tokenrelay doctor; no model call", "service",
        {200: Answer("One tick per line (text) or per event (SSE).", {TEXT: None, SSE: TickEvent})},
        {422: _BODY[422].replace("field", "query parameter"), **_ACCESS}, query=ProbeParams,
        headers=(ACCEPT_ANSWER,)),
    ("GET", "/api/streams/{stream_id}"): Operation(
        "Come back for an answer: replay from a point, then live; or its status", "answers",
        {200: Answer("The answer's events or text from the cursor on, or its status as JSON.",
                     {SSE: AnswerEvent, TEXT: None, JSON: StreamStatus}, headers=("X-Stream-Id",))},
        {404: "No such stream (unknown, expired, or another key's).",
         422: "A query parameter has the wrong type or value.", **_ACCESS},
        query=Cursor, path_params=("stream_id",),
        headers=(ACCEPT_STREAM, ("Last-Event-ID", {"type": "string"}, "As ?after=: replay the events after this id."))),
    ("DELETE", "/api/streams/{stream_id}"): Operation(
        "Stop an answer", "answers",
        {200: Answer("Stopped (or had ended): its status.", {JSON: StreamStatus}),
         202: Answer("Asked to stop, not ended yet: its status.", {JSON: StreamStatus}, headers=("Retry-After",))},
        {404: "No such stream (unknown, expired, or another key's).", **_ACCESS}, path_params=("stream_id",)),
    ("POST", "/v1/chat/completions"): Operation(
        "OpenAI's chat completions: the body is passed on to OpenAI-compatible upstreams as sent", "openai",
        {200: Answer("A chat completion, or with \"stream\": true its chunks as SSE ending in data: [DONE]. "
                     "A failure after the first chunk is a data: {\"error\": …} event.",
                     {JSON: ChatCompletion, SSE: ChunkEvent})},
        {**_BODY, 400: "The body is not valid JSON or a field is wrong (OpenAI answers 400; param names it), "
                       "or the upstream refused the request.", **_ACCESS, **_UPSTREAM,
         429: _ACCESS[429] + " Or the model API's own rate limit."},
        body=OpenAIChatBody),
    ("POST", "/v1/responses"): Operation(
        "OpenAI's Responses API: passed on to an upstream that serves it, else translated to chat completions",
        "openai",
        {200: Answer("The Response object (with \"background\": true, at once, queued), or with \"stream\": true "
                     "its events as SSE; a failure after the first event is response.failed, then error.",
                     {JSON: ResponseObject, SSE: ResponseEvent})},
        {**_BODY, 400: "The body is not valid JSON, a field is wrong, or a field this upstream cannot honour "
                       "(param names it).", **_ACCESS, **_UPSTREAM},
        body=ResponsesBody),
    ("GET", "/v1/responses/{response_id}"): Operation(
        "A response tokenrelay keeps: its object, or with stream=true its events after starting_after, then live",
        "openai",
        {200: Answer("The Response object as it is now, or its events as SSE.", {JSON: ResponseObject,
                                                                                SSE: ResponseEvent})},
        {400: "starting_after is not a sequence number.",
         404: "No such response: unknown, expired, another key's, or kept by the upstream itself.",
         503: "The shared store of streams (Redis) is unreachable; Retry-After says when to retry.", **_ACCESS},
        query=ResponseCursor, path_params=("response_id",)),
    ("POST", "/v1/responses/{response_id}/cancel"): Operation(
        "Stop a response wherever it runs; answers once it stopped (202 if not yet)", "openai",
        {200: Answer("The Response object, cancelled or already ended.", {JSON: ResponseObject}),
         202: Answer("Not stopped within a second yet; Retry-After.", {JSON: ResponseObject}, headers=("Retry-After",))},
        {404: "No such response.", 503: "The shared store of streams (Redis) is unreachable.", **_ACCESS},
        path_params=("response_id",)),
    ("GET", "/v1/models"): Operation(
        "The models the routes serve", "openai",
        {200: Answer("OpenAI's model list.", {JSON: ModelList})}, {**_ACCESS}),
}

UNDOCUMENTED = frozenset({"/", "/favicon.ico", "/static", "/healthz", "/readyz", "/metrics", "/openapi.json"})
"""Routes deliberately left out: the web page and its files, probes for machines, and this
document itself. The document covers the API: ``/api/*`` and ``/v1/*``."""

SECURITY_SCHEME = "clientKey"
_HEADER_DESCRIPTIONS = {
    "X-Stream-Id": "The answer's id, for /api/streams/{id}.",
    "Location": "The job's URL.",
    "Retry-After": "Seconds to wait before asking again.",
}


def _error_models(path: str) -> type[BaseModel]:
    return OpenAIErrorBody if path.startswith("/v1/") else ErrorBody


def _models() -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    pairs: dict[type[BaseModel], JsonSchemaMode] = {ErrorBody: "serialization", OpenAIErrorBody: "serialization"}
    for op in OPERATIONS.values():
        for model in (op.body, op.query):
            if model is not None:
                pairs[model] = "validation"
        for answer in op.answers.values():
            for content_model in answer.content.values():
                if content_model is not None:
                    pairs[content_model] = "serialization"
    return list(pairs.items())


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _parameters(op: Operation, schemas: Mapping[str, Any], refs: Mapping[Any, dict[str, Any]]) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for name in op.path_params
    ]
    if op.query is not None:
        query_schema = schemas[refs[(op.query, "validation")]["$ref"].rsplit("/", 1)[1]]
        required = set(query_schema.get("required", ()))
        for name, prop in query_schema["properties"].items():
            params.append({"name": name, "in": "query", "required": name in required, "schema": prop,
                           **({"description": prop["description"]} if "description" in prop else {})})
    for name, schema, description in op.headers:
        params.append({"name": name, "in": "header", "required": False, "schema": schema,
                       "description": description})
    return params


def _content(content: Content, refs: Mapping[Any, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for media, model in content.items():
        if model is None:
            out[media] = {"schema": {"type": "string"}}
        else:
            out[media] = {"schema": refs[(model, "serialization")]}
    return out


def operation_id(method: str, path: str) -> str:
    """``post_api_jobs``, ``get_api_jobs_job_id``: unique per method and path."""
    return method.lower() + path.replace("/", "_").replace("{", "").replace("}", "")


def build(routes: Iterable[BaseRoute], *, auth_required: bool, default_model: str | None) -> dict[str, Any]:
    """The document for the app's ``routes``: each route in ``OPERATIONS`` that the table has."""
    refs, defs = models_json_schema(_models(), ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = defs.get("$defs", {})
    if default_model is not None:
        # An example the server answers at once, so generated requests reach the upstream
        # rather than stopping at 404 model_not_found.
        for body in (ChatRequest, OpenAIChatBody, JobRequest, ResponsesBody):
            name = refs[(body, "validation")]["$ref"].rsplit("/", 1)[1]
            schemas[name]["properties"]["model"]["examples"] = [default_model]
    security: list[dict[str, list[str]]] = [{SECURITY_SCHEME: []}]
    if not auth_required:
        security.append({})  # without client keys the key is optional
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        for method in sorted(route.methods or ()):
            op = OPERATIONS.get((method, route.path))
            if op is None or method == "HEAD":
                continue
            responses: dict[str, Any] = {}
            for status, answer in op.answers.items():
                entry: dict[str, Any] = {"description": answer.description, "content": _content(answer.content, refs)}
                if answer.headers:
                    entry["headers"] = {h: {"description": _HEADER_DESCRIPTIONS[h], "schema": {"type": "string"}}
                                        for h in answer.headers}
                if answer.links:
                    entry["links"] = {link.name: {"operationId": operation_id(link.method, link.path),
                                                  "parameters": {link.parameter: link.value}}
                                      for link in answer.links}
                responses[str(status)] = entry
            error_ref = refs[(_error_models(route.path), "serialization")]
            for status, when in sorted(op.errors.items()):
                if not auth_required and status == 401:
                    continue
                responses[str(status)] = {"description": when, "content": {JSON: {"schema": error_ref}}}
            operation: dict[str, Any] = {
                "operationId": operation_id(method, route.path),
                "summary": op.summary, "tags": [op.tag], "responses": responses,
                "security": [{}] if op.public else security,
            }
            params = _parameters(op, schemas, refs)
            if params:
                operation["parameters"] = params
            if op.body is not None:
                operation["requestBody"] = {"required": True,
                                            "content": {JSON: {"schema": refs[(op.body, "validation")]}}}
            paths.setdefault(route.path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "tokenrelay", "version": __version__,
                 "description": "Streams an LLM's answer from a model API to the people and programs waiting for "
                                "it: plain text, SSE, OpenAI-compatible /v1, and jobs with webhooks."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            SECURITY_SCHEME: {"type": "http", "scheme": "bearer",
                              "description": "A client key from TOKENRELAY_API_KEYS (or TOKENRELAY_API_KEYS_FILE)."}}},
    }


_documents: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()
"""Each app's document, made at its first request: an app's routes and settings do not change."""


def documented(routes: Sequence[BaseRoute]) -> set[tuple[str, str]]:
    """The (method, path) pairs of ``routes`` that the document describes."""
    return {(m, r.path) for r in routes if isinstance(r, Route) for m in (r.methods or ()) if (m, r.path) in OPERATIONS}


async def openapi_json(request: Request) -> Response:
    app = request.app
    body = _documents.get(app)
    if body is None:
        state = app_state(request)
        body = _documents[app] = orjson.dumps(build(app.routes, auth_required=bool(state.keys),
                                                    default_model=state.settings.default_model))
    return Response(body, media_type=JSON)
