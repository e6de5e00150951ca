"""Wire models of the v1 API (requests end in Request, responses in Response)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, with_config
from typing_extensions import TypedDict

from ..core.config import MAX_INT, MAX_KNN_K, MAX_TEXT_CHARS, RunConfig

RUN_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
MAX_ID_CHARS = 512
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
MAX_STEP = 2**63 - 1
# The largest float32 in its shortest decimal form, as clients write float32 values: as a float64 it is a little
# above that float32 (3.4028234663852886e38), and every value up to it reads back as a finite float32.
F32_MAX = 3.4028235e38


def _whole(value: Any) -> Any:
    """85.0 read as 85, as JSON Schema counts it an integer; every other value is left to the strict check
    (which refuses strings, booleans and 85.5)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Step = Annotated[int, Field(ge=0, le=MAX_STEP), BeforeValidator(_whole)]
Count = Annotated[int, Field(ge=0), BeforeValidator(_whole)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class FingerprintMatrix(_Strict):
    """Compact fingerprints: a base64 little-endian row-major float32 matrix, rows picked by `fingerprint_row`."""

    dtype: Literal["float32"] = "float32"
    shape: Annotated[list[Count], Field(min_length=2, max_length=2)]
    data: str


@with_config(ConfigDict(extra="forbid", strict=True, allow_inf_nan=False))
class RolloutIn(TypedDict):
    """One rollout. A TypedDict, not a model: validating 10^4 of them into dicts is twice as fast."""

    rollout_id: Annotated[
        Id,
        Field(
            description="Distinct within a request. (prompt_id, rollout_id) identifies the rollout in its run: "
            "a retry of the same pair is answered `duplicate`."
        ),
    ]
    prompt_id: Annotated[Id, Field(description="Stable id of the prompt (the client derives it from its text).")]
    correct: NotRequired[Annotated[bool | None, Field(description="Correctness; null = unknown (never penalised).")]]
    fingerprint: NotRequired[
        Annotated[
            list[float] | None,
            Field(description="Layer-wise logit fingerprint (float32 values); null = none (the rollout is skipped)."),
        ]
    ]
    fingerprint_row: NotRequired[
        Annotated[
            Count | None,
            Field(description="Row of `fingerprint_matrix` holding this rollout's fingerprint (instead of a list)."),
        ]
    ]
    reward: NotRequired[
        Annotated[float | None, Field(description="Raw reward; when given, the shaped reward is returned.")]
    ]
    text: NotRequired[
        Annotated[
            str | None,
            Field(description="The response's text: kept, truncated, only when the run's text_max_chars > 0."),
        ]
    ]


class ScoreRequest(_Strict):
    step: Step | None = Field(None, description="Training step, stored with every remembered rollout.")
    rollouts: Annotated[list[RolloutIn], Field(min_length=1)]
    fingerprint_matrix: FingerprintMatrix | None = None


class RolloutOut(BaseModel):
    rollout_id: str
    status: Literal["scored", "skipped", "duplicate"]
    cluster: int | None = Field(description="Predicted error cluster (-1 = noise); null before the first fit.")
    cluster_size: int = Field(description="Earlier rollouts of this prompt and group in that cluster.")
    penalty: float = Field(description="min(alpha * ln(cluster_size + 1), beta) for targeted groups, else 0.")
    shaped_reward: float | None = Field(description="reward - penalty (wrong), reward / (1 + penalty) (correct).")


class BatchMetrics(BaseModel):
    """A batch's error collapse (docs/architecture.md, "Error collapse"): the same keys in every answer.
    A wrong rollout is judged when its prompt had a fit; the per-prompt values average over prompts with a
    judged wrong rollout, and every noise rollout counts as a cluster of its own."""

    repeat_rate: float = Field(description="Share of wrong rollouts that fell into an existing cluster.")
    distinct_error_clusters: float = Field(description="Clusters among a prompt's judged wrong rollouts.")
    largest_cluster_share: float = Field(description="The largest cluster's share of them.")
    cluster_entropy: float = Field(description="Entropy (nats) of their spread over clusters.")
    penalised_fraction: float = Field(description="Share of remembered rollouts with a penalty above 0.")
    mean_penalty: float = Field(description="Mean penalty of remembered rollouts (scored or duplicate).")


class MetricCounts(BaseModel):
    """The metrics' denominators, to combine the answers of a batch sent in several requests."""

    wrong_rollouts: int = Field(description="Remembered wrong rollouts (denominator of repeat_rate).")
    judged_prompts: int = Field(description="Prompts with a judged wrong rollout (the per-prompt averages).")
    remembered_rollouts: int = Field(description="Scored or duplicate rollouts (the penalty metrics).")


class ScoreResponse(BaseModel):
    results: list[RolloutOut]
    metrics: BatchMetrics
    metric_counts: MetricCounts


class RunStats(BaseModel):
    model_config = ConfigDict(extra="allow")

    keys: int
    vectors: int
    pending_refits: int
    refits_in_flight: int
    rollouts: int
    dim: int | None
    index_device: str | None


class RunResponse(BaseModel):
    run: str
    config: RunConfig
    stats: RunStats
    created_at: float


class RunListResponse(BaseModel):
    runs: list[RunResponse]


class ReclusterRequest(_Strict):
    all: bool = Field(False, description="Refit every key, not only those with pending refits.")


class ReclusterResponse(BaseModel):
    run: str
    refitted_keys: int
    vectors: int
    seconds: float


class ClusterSteps(BaseModel):
    size: int = Field(description="Vectors of the cluster in the last fit.")
    first_step: int | None = Field(description="Earliest training step of its vectors; null = none recorded.")
    last_step: int | None = Field(description="Latest training step of its vectors; null = none recorded.")


class GroupMemory(BaseModel):
    vectors: int
    fitted: int = Field(description="Vectors covered by the last HDBSCAN fit.")
    pending_refit: bool
    clusters: dict[str, int] = Field(description="Label -> size in the last fit (-1 = noise).")
    cluster_steps: dict[str, ClusterSteps] = Field(description="Label -> size and first and last step seen.")
    labels: list[int] = Field(description="Labels of the fitted vectors in arrival order.")
    steps: list[int | None] = Field(description="Training step of each fitted vector (aligned with labels).")


class PromptResponse(BaseModel):
    prompt_id: str
    groups: dict[Literal["wrong", "correct", "unknown"], GroupMemory]


class ErrorBody(BaseModel):
    type: str
    message: str
    request_id: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class HealthResponse(BaseModel):
    status: str
    detail: dict[str, Any] = Field(default_factory=dict)


class FingerprintBytes(BaseModel):
    dtype: Literal["float32"] = "float32"
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]
    data: bytes = Field(description="Little-endian row-major float32 bytes.")


class ScoreColumnsRequest(BaseModel):
    """The columnar msgpack form of a score request: one entry per rollout in every column (documentation
    of `application/msgpack` bodies; binary columns are msgpack bin values)."""

    step: Step | None = None
    rollout_id: Annotated[list[Id], Field(min_length=1)]
    prompt_id: Annotated[list[Id], Field(min_length=1)]
    correct: bytes | None = Field(None, description="int8 per rollout: 1 correct, 0 wrong, -1 unknown.")
    reward: bytes | None = Field(None, description="float64 per rollout; NaN = none.")
    fingerprints: FingerprintBytes | None = Field(None, description="Rows of the rollouts that have one, in order.")
    fingerprint_present: bytes | None = Field(
        None, description="uint8 per rollout: 1 = owns the next fingerprint row (absent = every rollout does)."
    )
    text: list[str | None] | None = Field(None, description="Text per rollout (kept when text_max_chars > 0).")


class ScoreColumnsResponse(BaseModel):
    """The columnar msgpack form of a score answer (when the request sends `Accept: application/msgpack`)."""

    rollout_id: list[str]
    status: bytes = Field(description="int8 per rollout: 0 scored, 1 skipped, 2 duplicate.")
    cluster: bytes = Field(description="int32 per rollout; -2147483648 = none.")
    cluster_size: bytes = Field(description="int32 per rollout.")
    penalty: bytes = Field(description="float64 per rollout.")
    shaped_reward: bytes = Field(description="float64 per rollout; NaN = none.")
    metrics: BatchMetrics
    metric_counts: MetricCounts


# ---- limits the schema states but the models cannot (set per deployment, or checked in core) ------------

RUN_CONFIG_LIMITS: dict[str, dict[str, Any]] = {
    "alpha": {"minimum": 0},
    "beta": {"minimum": 0},
    "cluster_selection_epsilon": {"minimum": 0},
    "knn_k": {"minimum": 1, "maximum": MAX_KNN_K},
    "min_cluster_size": {"minimum": 2, "maximum": MAX_INT},
    "min_samples": {"minimum": 1, "maximum": MAX_INT},
    "last_n_layers": {"minimum": 1, "maximum": MAX_INT},
    "max_memory_per_key": {"minimum": 2, "maximum": MAX_INT},
    "dim": {"minimum": 1},
    "text_max_chars": {"minimum": 0, "maximum": MAX_TEXT_CHARS},
}
"""What RunConfig checks (core/config.py) on each field, as JSON Schema keywords."""


def publish_limits(schema: dict[str, Any], *, max_batch: int, max_dim: int) -> dict[str, Any]:
    """Add to a generated OpenAPI schema the limits the server enforces beyond its models: the batch and
    fingerprint sizes of this deployment, float32's range, and the run config's ranges."""
    components = schema["components"]["schemas"]
    limits = {**RUN_CONFIG_LIMITS, "dim": {"minimum": 1, "maximum": max_dim}}
    for name, keywords in limits.items():
        _number_branch(components["RunConfig"]["properties"][name]).update(keywords)
    components["ScoreRequest"]["properties"]["rollouts"]["maxItems"] = max_batch
    for column in ("rollout_id", "prompt_id"):
        components["ScoreColumnsRequest"]["properties"][column]["maxItems"] = max_batch
    fingerprint = _array_branch(components["RolloutIn"]["properties"]["fingerprint"])
    fingerprint.update({"minItems": 1, "maxItems": max_dim})
    fingerprint["items"].update({"minimum": -F32_MAX, "maximum": F32_MAX})
    shape = components["FingerprintMatrix"]["properties"]["shape"]
    shape["prefixItems"] = [{"type": "integer", "minimum": 0}, {"type": "integer", "minimum": 0, "maximum": max_dim}]
    return schema


def _number_branch(prop: dict[str, Any]) -> dict[str, Any]:
    """The integer or number schema of a property (of `anyOf` when it is nullable)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") in ("integer", "number"):
            return branch  # type: ignore[no-any-return]
    raise KeyError(f"no number in {prop}")


def _array_branch(prop: dict[str, Any]) -> dict[str, Any]:
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "array":
            return branch  # type: ignore[no-any-return]
    raise KeyError(f"no array in {prop}")
