"""The HTTP API of the detection endpoint: request and response models, the error table, the routes.

The models are the documented contract (GET /openapi.json); `fastapi_app(ingress)` builds one ingress
replica's FastAPI app, whose routes check the bearer token and hand each request to the ingress.
"""

from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from serving.ingress import EnsembleIngress


class ApiError(Exception):
    """An answer other than 200, with a code a program can read and a reason a person can."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class DetectRequest(BaseModel):
    """POST /v1/detect with a JSON body. (Or send the image as multipart field `image`, or as the raw body
    with an image/* content type.)"""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="The image's bytes in base64 (a data: URL with base64 also works). URLs are "
                       "never fetched.")
    adapter: str | None = Field(default=None, description="Adapter name (GET /v1/models); default the default one.")


class MemberResult(BaseModel):
    status: Literal["ok", "failed", "timeout"]
    label: dict | None = Field(default=None, description="The member's label in the task's schema.")
    score: float | None = Field(default=None, description="The member's confidence in its whole answer, if it has one.")
    error: str | None = None
    latency_ms: float
    model: str | None = None
    adapter: str | None = None
    adapter_version: str | None = None
    batch_size: int | None = Field(default=None, description="Images the student answered together with this one.")
    examples: list[str] | None = Field(default=None, description="RAG: image ids of the examples in its prompt.")
    raw: str | None = Field(default=None, description="The member's answer as generated.")


class DetectResponse(BaseModel):
    request_id: str
    image_id: str = Field(description="sha256 of the image's bytes; send it back with /v1/feedback.")
    dataset: str
    task: str
    fused: dict = Field(description="The ensemble's label, in the task's schema (points and boxes carry a score: "
                        "the weighted share of the members that found them).")
    members: dict[str, MemberResult]
    weights: dict[str, float]
    agreement: float | None = Field(description="How much the members agree, 0-1; null with one member answering.")
    hard_example: bool = Field(description="The members disagreed: the image goes to the teacher for a label.")
    degraded: bool = Field(description="A member failed or timed out; `members` says which and why.")
    latency_ms: float


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_id: str = Field(description="The image_id /v1/detect returned.")
    label: dict = Field(description="The correct label, in the task's schema.")
    request_id: str | None = None
    comment: str | None = Field(default=None, max_length=2000)
    image: str | None = Field(default=None, description="The image in base64, needed only if the endpoint did not "
                              "keep it (feedback.keep_images off).")


class FeedbackResponse(BaseModel):
    accepted: bool
    image_id: str
    training_samples: int = Field(description="Corrections and hard examples collected so far.")


_DETECT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "format": "binary"}, "adapter": {"type": "string"}}}},
            "application/json": {"schema": DetectRequest.model_json_schema()},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_ERRORS = {status: {"description": text, "content": {"application/json": {"example": {
    "error": {"code": code, "message": text}}}}} for status, code, text in [
        (400, "bad_request", "Malformed JSON, base64 or multipart, or a corrupt image; the message says which."),
        (401, "unauthorized", "Missing or wrong bearer token."),
        (404, "unknown_adapter", "No adapter of that name (unknown_adapter); for feedback, an image that was not "
                                 "kept (unknown_image) or a request_id that was not logged (unknown_request)."),
        (413, "too_large", "The body is over the size limit, or the image declares more pixels than allowed."),
        (415, "unsupported_media_type", "Not an accepted image format or content type."),
        (503, "unavailable", "Overloaded (Serve's queue is full), or no member answered."),
        (504, "timeout", "The request took longer than the request timeout."),
    ]}


# ---------------------------------------------------------------- the routes


def fastapi_app(ingress: EnsembleIngress) -> FastAPI:
    """The FastAPI app of one ingress replica: routes, auth, the error format."""
    @asynccontextmanager
    async def lifespan(_):
        yield
        await ingress.feedback_writer.flush()  # rows still buffered reach the log when the replica stops

    public = ingress.settings["public_docs"]
    app = FastAPI(
        lifespan=lifespan,
        title=f"raydar detection endpoint: {ingress.spec.name}",
        description="The fine-tuned student and the RAG-augmented VLM, fused. Every route but /healthz and "
        "/readyz needs `Authorization: Bearer <token>`.",
        version="1",
        docs_url="/docs" if public else None, openapi_url="/openapi.json" if public else None, redoc_url=None,
    )
    bearer = HTTPBearer(auto_error=False, description="The API token (serving args token_env / token_file).")

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(given.encode(), ingress.token.encode()):
            ingress.stats.record(401)
            raise ApiError(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        if e.status not in (401, 503):  # those are counted where they happen
            ingress.stats.record(e.status)
        return JSONResponse({"error": {"code": e.code, "message": e.message}}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        ingress.stats.record(400)
        return JSONResponse({"error": {"code": "bad_request", "message": str(e)}}, status_code=400)

    protected = [Depends(authorised)]

    @app.get("/healthz", summary="Liveness: the ingress runs.")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: every member answers.", responses={503: _ERRORS[503]})
    async def readyz() -> JSONResponse:
        ok, members = await ingress.ready()
        return JSONResponse({"ready": ok, "members": members}, status_code=200 if ok else 503)

    @app.post("/v1/detect", response_model=DetectResponse, dependencies=protected, openapi_extra=_DETECT_BODY,
              summary="Detect in one image: the fused result and each member's.", responses=_ERRORS)
    async def detect(request: Request) -> DetectResponse:
        timeout = ingress.settings["request_timeout_s"]
        try:
            return await asyncio.wait_for(ingress.detect(request), timeout)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {timeout:g} s") from None

    @app.post("/v1/feedback", response_model=FeedbackResponse, status_code=202, dependencies=protected,
              summary="A user's correction of a result; it becomes training data.",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": FeedbackRequest.model_json_schema()}}}},
              responses={k: _ERRORS[k] for k in (400, 401, 413)})
    async def feedback(request: Request) -> FeedbackResponse:
        return await ingress.feedback(request)

    @app.get("/v1/models", dependencies=protected, summary="The members, their models and adapters, the weights.")
    async def models() -> dict:
        return await ingress.models()

    @app.get("/v1/stats", dependencies=protected,
             summary="Requests, member failures and agreement (this replica); training samples collected (all).")
    async def stats() -> dict:
        return await ingress.stats_view()

    return app
