"""Where a veRL sample is fingerprinted: the anchor of its response, as an index into its token sequence.

Every veRL path (the engine's packed micro-batches, the legacy trainer's padded `DataProto`, and
`compute_fingerprints`) finds anchors through `sequence_anchors`, which applies the client's one anchor rule
(`meds_client.fingerprint.response_anchor`: the last `\\boxed{` of the response, or a prompt that ends in one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from ...fingerprint import Tokenizer, response_anchors

NO_ANCHOR = -1
FINGERPRINT_FLAG = "meds_fingerprint"
"""Non-tensor flag of a batch: compute fingerprints in this forward pass."""
ANCHOR_FIELD = "meds_anchor"
"""Per sample, the anchor's index in the sample's unpadded `input_ids` (`NO_ANCHOR`: none)."""
FINGERPRINT_FIELD = "meds_fp"
"""Per sample, the layer-logit fingerprint, float32 (zeros where there is no anchor)."""


def sequence_anchors(
    tokenizer: Tokenizer, prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor]
) -> npt.NDArray[np.int64]:
    """Per sample, the anchor as an index into `prompt + response` (unpadded), `NO_ANCHOR` if none."""
    sequences = [prompt.tolist() + response.tolist() for prompt, response in zip(prompts, responses, strict=True)]
    anchors = response_anchors(tokenizer, sequences, [len(prompt) for prompt in prompts])
    return np.array([NO_ANCHOR if anchor is None else anchor for anchor in anchors], dtype=np.int64)
