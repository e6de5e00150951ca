"""Where a veRL sample is fingerprinted: the anchor of its response, as an index into its token sequence.

Every veRL path (the engine's packed micro-batches, the legacy trainer's padded `DataProto`, and
`compute_fingerprints`) finds anchors through `_response_anchor`, so the rule lives in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from ...fingerprint import Tokenizer, boxed_token_ids, find_boxed_anchor

NO_ANCHOR = -1
FINGERPRINT_FLAG = "meds_fingerprint"
"""Non-tensor flag of a batch: compute fingerprints in this forward pass."""
ANCHOR_FIELD = "meds_anchor"
"""Per sample, the anchor's index in the sample's unpadded `input_ids` (`NO_ANCHOR`: none)."""
FINGERPRINT_FIELD = "meds_fp"
"""Per sample, the layer-logit fingerprint, float32 (zeros where there is no anchor)."""


def _response_anchor(tokenizer: Tokenizer, sequence: Sequence[int], response_start: int) -> int | None:
    """Absolute index in `sequence` (prompt + response tokens, unpadded) of the response's anchor, or None.

    The anchor is the `{` of the last `\\boxed{` of the response; the prompt is never searched.
    """
    anchor = find_boxed_anchor(sequence[response_start:], tokenizer, pattern=boxed_token_ids(tokenizer))
    return None if anchor is None else response_start + anchor


def sequence_anchors(
    tokenizer: Tokenizer, prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor]
) -> npt.NDArray[np.int64]:
    """Per sample, the anchor as an index into `prompt + response` (unpadded), `NO_ANCHOR` if none."""
    anchors = []
    for prompt, response in zip(prompts, responses, strict=True):
        sequence = prompt.tolist() + response.tolist()
        anchor = _response_anchor(tokenizer, sequence, len(prompt))
        anchors.append(NO_ANCHOR if anchor is None else anchor)
    return np.array(anchors, dtype=np.int64)
