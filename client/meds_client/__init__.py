"""Python client of the MEDS reward-shaping service (Memory-Enhanced Dynamic reward Shaping).

- `MedsClient` / `AsyncMedsClient`: score rollouts and manage runs over HTTP.
- `prompt_id`: the documented, stable id of a prompt from its question text.
- `meds_client.fingerprint` (extra `fingerprint`): layer-logit fingerprints from a HF causal LM.
- `meds_client.integrations` (extras `trl`, `verl`, `openrlhf`): trainer hooks.
"""

from ._base import ClientStats
from ._client import AsyncMedsClient, MedsClient
from ._config import (
    DEFAULT_BASE_URL,
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_ROLLOUTS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_SCORE_DEADLINE,
    DEFAULT_TIMEOUT,
    OnError,
    RetryPolicy,
)
from ._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    IdCollisionError,
    InternalServerError,
    MedsError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from ._prompt_id import normalize_prompt_text, prompt_id
from ._types import (
    GroupMemory,
    PromptMemory,
    ReclusterResult,
    Rollout,
    Run,
    RunConfig,
    ScoreResult,
    ScoreResults,
    ScoreStatus,
)
from ._version import __version__

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_BATCH_ROLLOUTS",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_SCORE_DEADLINE",
    "DEFAULT_TIMEOUT",
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncMedsClient",
    "AuthenticationError",
    "BadRequestError",
    "ClientStats",
    "ConflictError",
    "GroupMemory",
    "IdCollisionError",
    "InternalServerError",
    "MedsClient",
    "MedsError",
    "NotFoundError",
    "OnError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PromptMemory",
    "RateLimitError",
    "ReclusterResult",
    "RetryPolicy",
    "Rollout",
    "Run",
    "RunConfig",
    "ScoreResult",
    "ScoreResults",
    "ScoreStatus",
    "ServiceUnavailableError",
    "UnprocessableEntityError",
    "__version__",
    "normalize_prompt_text",
    "prompt_id",
]
