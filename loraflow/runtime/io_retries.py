"""Retries for hub I/O, and nothing else.

Only a request that failed in transit is retried: a connection error, a timeout, a dropped connection, or an
HTTP 408/429/5xx answer, with exponential backoff. A 4xx answer (bad token, missing repo, a commit race), a
contract violation, a training or verification error is a fact about the input, and retrying it would only
repeat it, so no Prefect task in loraflow has `retries` set: the retries live here, around single requests.
"""

import logging
import time
from typing import Callable, TypeVar

T = TypeVar("T")
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
log_default = logging.getLogger("loraflow.runtime.io_retries")


def transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's in-transit errors (huggingface_hub 2.x talks through httpx2, 1.x through httpx)."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, ConnectionError)


def is_transient(error: BaseException) -> bool:
    """True for a request that failed in transit or got 408/429/5xx: worth sending again."""
    if isinstance(error, transport_errors()):
        return True
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None) in TRANSIENT_STATUS


def with_io_retries(call: Callable[[], T], what: str, *, retries: int, delay: float, log=log_default) -> T:
    """`call()`, sent again up to `retries` times after a transient failure, waiting delay, 2*delay, ... between."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as error:
            if attempt == retries or not is_transient(error):
                raise
            wait = delay * 2**attempt
            log.warning("%s failed in transit (%s: %s); retry %d of %d in %.1f s", what, type(error).__name__,
                        str(error).splitlines()[0][:200] if str(error) else "", attempt + 1, retries, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")
