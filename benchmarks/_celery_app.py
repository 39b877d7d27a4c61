"""The Celery 5 app for ``benchmarks.celery_bench``: a no-op task, Redis as broker and backend.

Both the broker and the result backend are the local Redis, database 15
(:data:`REDIS_URL`), so that the benchmark touches nothing else in that server;
``benchmarks.celery_bench`` flushes database 15 before it starts the worker.

Everything is Celery's default (JSON serializer, prefetch multiplier 4, late ack off, results
stored and read back through the Redis backend, which waits for them on pub/sub rather than by
polling), except the one setting below that only silences a start-up warning.

The worker is started by ``benchmarks.celery_bench`` as
``python -m celery -A benchmarks._celery_app worker --pool=prefork --concurrency=2 ...``;
:func:`client` is the factory ``benchmarks._load`` calls in each client process.
"""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery  # type: ignore[import-untyped]

REDIS_URL = "redis://127.0.0.1:6379/15"

app = Celery("lrofw_bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    # Celery 5.3+ warns (CPendingDeprecationWarning) at every start unless this is set
    # explicitly; True is the value it already uses, so this only stops the noise.
    broker_connection_retry_on_startup=True,
)


@app.task(name="lrofw_bench.noop")  # type: ignore[untyped-decorator]
def noop() -> None:
    """Do nothing: what is measured is Celery's own cost of one submit-to-result."""
    return None


def client() -> Callable[[], object]:
    """One client: each call submits one ``noop`` and blocks until its result is back."""

    def submit_and_wait() -> object:
        return noop.delay().get(timeout=30)

    return submit_and_wait
