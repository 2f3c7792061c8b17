"""Strict JSON: what parity writes (summary.json, results/, bisect.json, run.json, trace metadata)
never holds a bare NaN or Infinity, which strict JSON parsers reject.

A non-finite float is written as the string ``"nan"``, ``"inf"`` or ``"-inf"`` (the convention
``max_rel_l2`` and the point metrics already used), and the file is produced with
``allow_nan=False`` so a non-finite number that slipped through is an error, not a silent bare
``NaN``. Readers treat these strings as the numbers they name.
"""

from __future__ import annotations

import json
import math
from typing import Any


def encode(value: Any) -> Any:
    """``value`` with every non-finite float replaced by "nan"/"inf"/"-inf" (numpy scalars and
    arrays become plain Python; tuples become lists)."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return encode(value.item())
        if isinstance(value, np.ndarray):
            return encode(value.tolist())
    except ImportError:  # pragma: no cover
        pass
    return value


def dumps(data: Any, **kwargs) -> str:
    """``json.dumps`` of :func:`encode` (data) with ``allow_nan=False``; objects JSON cannot
    encode are written as ``str`` (as before)."""
    kwargs.setdefault("default", str)
    return json.dumps(encode(data), allow_nan=False, **kwargs)


def to_float(value: Any) -> float | None:
    """Read back a number written by :func:`dumps` ("nan"/"inf"/"-inf" included); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return float(value)
    return float(value)
