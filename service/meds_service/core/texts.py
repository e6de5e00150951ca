"""Optional rollout texts (docs/architecture.md, "Error collapse"): kept only when the run asks for them,
truncated to its `text_max_chars`, stored beside the fingerprints and read back as cluster examples. Texts
are user data: nothing logs them and no metric carries them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray


def kept_texts(texts: Sequence[str | None] | None, rows: NDArray[np.intp], limit: int) -> list[str | None] | None:
    """The texts of the rollouts at `rows`, truncated to `limit` characters; None when the run keeps no text
    (`limit` 0) or the request sent none."""
    if not limit or texts is None:
        return None
    return [None if (text := texts[row]) is None else text[:limit] for row in rows.tolist()]
