"""The args of the detection endpoint: `ServeArgs` (the `args:` of serving/serve_config.yaml) and its parts.

Every field carries its help text; `ServeArgs.from_config` validates them once, at `build_app`, and names
each field that is wrong.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeploymentLimits(_Args):
    """How much of the cluster a deployment takes, and how much work it accepts before refusing more."""

    replicas: int = Field(default=1, ge=1, description="Replicas of the deployment.")
    max_ongoing_requests: int = Field(default=16, ge=1, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(
        default=64, ge=-1, description="Requests each caller queues for the deployment beyond that; more get 503. "
        "-1: unbounded (not for the ingress)."
    )
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica (the student on a GPU: 1, or a share).")


class FeedbackSettings(_Args):
    enabled: bool = Field(default=True, description="Log every answered request under <storage>/<name>/feedback/.")
    keep_images: bool = Field(default=True, description="Keep the images (content-addressed) so that hard examples "
                              "and corrections can go to the teacher; off keeps only their sha256.")
    hard_below: float = Field(default=0.5, ge=0, le=1, description="Members' agreement below this marks a hard "
                              "example (`raydar label --from-feedback` sends those to the teacher).")
    flush_rows: int = Field(default=64, ge=1, description="Rows per Parquet part.")
    flush_s: float = Field(default=2.0, gt=0, description="Longest a row waits before its part is written.")


class ServeArgs(_Args):
    """The args of `build_app` (the `args:` of serve_config.yaml)."""

    spec: str = Field(description="Dataset spec (YAML): task, fusion weights, knowledge base, teacher (the RAG VLM).")
    set: dict[str, Any] = Field(default_factory=dict, description="Spec overrides, as `raydar ... --set`.")
    storage: str | None = Field(default=None, description="Storage root (default $RAYDAR_STORAGE, else ~/.raydar): "
                                "the knowledge base and the feedback log live there.")
    members: list[Literal["finetuned", "rag"]] | None = Field(
        default=None, description="Members to serve; default the spec's `serving.members`.")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Adapter name -> finetune checkpoint (folder, run folder or pyarrow URI), "
        "or `base` for the untuned base model. Names are what clients ask for (`adapter`).")
    default_adapter: str | None = Field(default=None, description="Adapter used when a request names none; "
                                        "default the first of `adapters`.")
    rag_base_url: str | None = Field(default=None, description="OpenAI-compatible endpoint of the RAG VLM; "
                                     "default the spec's teacher.base_url.")
    token_env: str = Field(default="RAYDAR_SERVE_TOKEN", description="Environment variable holding the API token.")
    token_file: str | None = Field(default=None, description="File holding the API token (a mounted secret); "
                                   "read when the variable is not set.")
    max_request_bytes: int = Field(default=20 * 2**20, gt=0, description="Larger request bodies get 413.")
    max_image_pixels: int | None = Field(default=None, gt=0, description="Images declaring more pixels get 413 "
                                         "before they are decoded; default the spec's images.max_image_pixels.")
    image_formats: list[Literal["png", "jpeg", "webp", "gif", "bmp", "tiff"]] = Field(
        default=["png", "jpeg", "webp"], description="Accepted image formats (by content, not name); others get 415.")
    request_timeout_s: float = Field(default=30.0, gt=0, description="A request taking longer gets 504.")
    member_timeout_s: float = Field(default=20.0, gt=0, description="A member answering later is left out "
                                    "(the answer is degraded).")
    adapter_registry_max_age_s: float = Field(
        default=2.0, gt=0, description="The ingress maps adapter names with the student's registry it last saw "
        "while it is younger than this; an older one is still used for the names it knows and asked again in "
        "the background, so no request waits on it.")
    models_registry_wait_s: float = Field(
        default=2.0, gt=0, description="/v1/models waits at most this long for a fresher adapter registry when it "
        "knows one (the one known stands in after that); with none known it waits member_timeout_s.")
    ready_probe_timeout_s: float = Field(default=2.0, gt=0, description="/readyz: a member that does not answer a "
                                         "cheap call within this is not ready.")
    member_probe_interval_s: float = Field(
        default=0.5, gt=0, description="A member whose replica died is left out of answers at once (they are "
        "degraded, not kept waiting for its replacement) and asked a cheap call this often, each waiting up to "
        "ready_probe_timeout_s, until it answers again.")
    feedback_counts_max_age_s: float = Field(
        default=5.0, gt=0, description="/v1/stats re-reads the feedback log's counts (every replica's rows) at "
        "most this often; lower is fresher and reads storage more.")
    batching: bool = Field(default=True, description="Group concurrent requests to the student into batches.")
    max_batch_size: int = Field(default=8, ge=1, description="Largest batch; more memory, more throughput.")
    batch_wait_timeout_s: float = Field(default=0.0, ge=0, description="Requests that find the student busy wait "
                                        "for its batch to end and go together in the next; this is how much longer "
                                        "that batch then waits to fill. A request that finds it idle starts at once.")
    max_new_tokens: int = Field(default=256, gt=0, description="Longest answer the student may generate.")
    device: str | None = Field(default=None, description="Torch device of the student; default cuda if present.")
    public_docs: bool = Field(default=True, description="Serve /docs and /openapi.json without the token "
                              "(they hold no data).")
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    ingress: DeploymentLimits = Field(default_factory=lambda: DeploymentLimits(
        max_ongoing_requests=32, max_queued_requests=64, num_cpus=0.5))
    finetuned: DeploymentLimits = Field(default_factory=DeploymentLimits)
    rag: DeploymentLimits = Field(default_factory=lambda: DeploymentLimits(
        max_ongoing_requests=32, num_cpus=0.5))
    max_surge_percent: int = Field(default=100, ge=0, le=100, description="Extra replicas during a rolling "
                                   "restart (a redeploy): old replicas answer until their replacements are ready.")

    @field_validator("adapters")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise ValueError(f"adapter name {name!r}: use letters, digits, '-', '_' or '.', at most 64")
        return value

    @model_validator(mode="after")
    def _default_adapter(self) -> ServeArgs:
        if self.default_adapter is not None and self.default_adapter not in self.adapters:
            raise ValueError(f"default_adapter {self.default_adapter!r} is not one of adapters {sorted(self.adapters)}")
        if self.member_timeout_s > self.request_timeout_s:
            raise ValueError("member_timeout_s must not exceed request_timeout_s")
        return self

    @classmethod
    def from_config(cls, args: dict) -> ServeArgs:
        """`args` validated; a ValueError lists every problem, one line per field."""
        try:
            return cls.model_validate(args)
        except ValidationError as e:
            problems = "\n".join(
                f"  {'.'.join(map(str, err['loc'])) or '(args)'}: {err['msg'].removeprefix('Value error, ')}"
                for err in e.errors())
            raise ValueError(f"serving args: {e.error_count()} problem(s)\n{problems}") from None


class AdapterConfig(_Args):
    """FineTunedMember's user_config: which adapters it serves. Changing it reconfigures live replicas."""

    adapters: dict[str, str] = Field(min_length=1)
    default: str

    @model_validator(mode="after")
    def _default_known(self) -> AdapterConfig:
        if self.default not in self.adapters:
            raise ValueError(f"default adapter {self.default!r} is not one of {sorted(self.adapters)}")
        return self
