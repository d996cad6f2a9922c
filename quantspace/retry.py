"""Bounded retries with exponential backoff for Hub calls that are safe to repeat.

huggingface_hub already retries some calls itself (metadata, preupload and LFS uploads: 429/5xx and
dropped connections; file downloads: 408/429 and connections cut mid-body, resumed with a Range request).
It does not retry a download answered 5xx, nor the final commit call (repeating it could commit twice).
These helpers add a few more tries around whole steps; the commit's own care is in hub.py.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

from huggingface_hub.errors import HfHubHTTPError

try:
    from httpx2 import TransportError
except ImportError:  # pragma: no cover - older huggingface_hub
    from httpx import TransportError

T = TypeVar("T")

ATTEMPTS = 4                 # tries in all, the first included
BACKOFF_S = 2.0              # the wait before the second try; doubled for each next one (tests set it small)
MAX_WAIT_S = 60.0            # a Retry-After longer than this is not waited for
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


def sleep(seconds: float) -> None:
    """Module-level so tests can record the waits instead of waiting."""
    time.sleep(seconds)


def status_of(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def transient(exc: BaseException) -> bool:
    """A failure that may pass if the same request is sent again: the Hub busy or restarting, a cut connection.
    Looks through the exception's causes (the client wraps some errors in its own)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, TransportError):
            return True
        if isinstance(exc, HfHubHTTPError) and status_of(exc) in TRANSIENT_STATUS:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False


def retry_after(exc: BaseException) -> float | None:
    """The server's Retry-After (seconds form) on a 429/503, if any."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None   # the HTTP-date form: fall back to our own backoff


def wait_before(attempt: int, exc: BaseException | None) -> float:
    """Seconds to wait before try number `attempt + 1` (attempt counts from 0)."""
    backoff = BACKOFF_S * (2 ** attempt)
    hinted = retry_after(exc) if exc is not None else None
    return min(MAX_WAIT_S, max(backoff, hinted or 0.0))


def call(fn: Callable[[], T], attempts: int | None = None) -> T:
    """`fn()`, tried again after a transient failure; the last failure is raised as is."""
    attempts = attempts or ATTEMPTS
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt + 1 >= attempts or not transient(exc):
                raise
            sleep(wait_before(attempt, exc))
    raise AssertionError("unreachable")
