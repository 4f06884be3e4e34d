"""The feature windows, declared once: the Beam job computes them and the Feast views declare them.

Each window is a name and a length in milliseconds; every entity also gets an ``all`` (whole
history) window. :mod:`pipelines.aggregates` and :mod:`features.feature_repo` both read
:data:`WINDOWS_MS`, and the feature service's version is derived from it, so changing a window
changes the service name models ask for.

>>> [name for name, _ in WINDOWS_MS] + [ALL]
['1h', '1d', '7d', 'all']
>>> window_names()
('1h', '1d', '7d', 'all')
>>> feature_service_name("dcnv2"), feature_service_name("din", side=True)
('ctr_dcnv2_v1', 'ctr_din_side_v1')
"""

from __future__ import annotations

import hashlib
import math

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

#: (name, length in ms) of each sliding event-time window, shortest first
WINDOWS_MS: tuple[tuple[str, int], ...] = (("1h", HOUR_MS), ("1d", DAY_MS), ("7d", 7 * DAY_MS))
#: the window over an entity's whole history
ALL = "all"


def window_names(windows_ms: tuple[tuple[str, int], ...] = WINDOWS_MS) -> tuple[str, ...]:
    """The window names of the feature columns, ``all`` last."""
    return (*(name for name, _ in windows_ms), ALL)


def windows_fingerprint(windows_ms: tuple[tuple[str, int], ...] = WINDOWS_MS) -> str:
    """A short digest of the windows, for naming feature-service versions after them."""
    return hashlib.sha256(repr(windows_ms).encode()).hexdigest()[:8]


#: the feature-set version of each window layout ever served: a model trained on one layout must
#: never be served features of another, so a new layout gets a new version (and service names)
FEATURE_SET_VERSIONS = {"b7b61ed3": 1}


def feature_set_version(windows_ms: tuple[tuple[str, int], ...] = WINDOWS_MS) -> int:
    """The version of a window layout; a layout without a recorded version is an error, not a silent v1."""
    fp = windows_fingerprint(windows_ms)
    if fp not in FEATURE_SET_VERSIONS:
        raise ValueError(
            f"windows {windows_ms} (fingerprint {fp}) have no feature-set version: add one to "
            f"features.windows.FEATURE_SET_VERSIONS, so models trained on older windows keep theirs"
        )
    return FEATURE_SET_VERSIONS[fp]


def feature_service_name(
    model_kind: str, windows_ms: tuple[tuple[str, int], ...] = WINDOWS_MS, side: bool = False
) -> str:
    """The Feast feature service a model of ``model_kind`` asks for: ``ctr_<kind>_v<feature-set version>``.

    ``side``: the service that adds the batch views ``user_profile`` and ``item_catalog`` (``ctr_<kind>_side_v<N>``).
    """
    return f"ctr_{model_kind}{'_side' if side else ''}_v{feature_set_version(windows_ms)}"


#: milliseconds per unit of a duration string
UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": HOUR_MS, "d": DAY_MS}


def parse_duration_ms(text: str) -> int:
    """``'90s'`` -> 90000; units ms, s, m, h, d; a bare number is seconds.

    >>> parse_duration_ms("20m"), parse_duration_ms("1h"), parse_duration_ms("250ms"), parse_duration_ms("3")
    (1200000, 3600000, 250, 3000)
    """
    t = text.strip().lower()
    for unit in ("ms", "s", "m", "h", "d"):
        if t.endswith(unit) and (unit != "s" or not t.endswith("ms")):
            num, mult = t[: -len(unit)], UNITS_MS[unit]
            break
    else:
        num, mult = t, 1_000
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"duration must be a number with a unit (ms, s, m, h, d), got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"duration must be finite and >= 0, got {text!r}")
    return int(round(value * mult))
