"""The public surface is pinned: adding or removing a name must be a deliberate change of this test."""

from __future__ import annotations

import meds_client
import meds_client.fingerprint

PUBLIC = {
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
}


def test_all_is_pinned() -> None:
    assert set(meds_client.__all__) == PUBLIC
    assert len(meds_client.__all__) == len(PUBLIC)
    for name in meds_client.__all__:
        assert hasattr(meds_client, name)


def test_fingerprint_all_is_pinned() -> None:
    assert set(meds_client.fingerprint.__all__) == {
        "BOXED_TEXT",
        "anchor_mask",
        "boxed_token_ids",
        "find_boxed_anchor",
        "fingerprint_sequences",
        "layer_logit_fingerprints",
        "output_embedding",
        "response_anchor",
        "response_anchors",
    }


def test_sync_and_async_clients_have_the_same_methods() -> None:
    def public(cls: type) -> set[str]:
        return {name for name in vars(cls) if not name.startswith("_")}

    sync, asynchronous = public(meds_client.MedsClient), public(meds_client.AsyncMedsClient)
    assert sync - {"close"} == asynchronous - {"aclose"}
    assert {
        "score",
        "put_run",
        "create_run",
        "get_run",
        "list_runs",
        "delete_run",
        "recluster",
        "get_prompt",
        "health",
        "ready",
    } <= sync


def test_importing_the_client_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, meds_client; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )
