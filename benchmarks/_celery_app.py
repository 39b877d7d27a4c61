"""The Celery 5 app for ``benchmarks.celery_bench``: a no-op task, Redis as broker and backend.

The Redis is the benchmark's own (``benchmarks._redis``: a ``redis-server`` on a free port that
``benchmarks.celery_bench`` starts and stops); its URL comes in the environment variable
``LROFW_BENCH_REDIS_URL`` (:data:`benchmarks._redis.URL_VARIABLE`), which ``celery_bench`` sets
for the worker and client processes it starts. There is no default: without it this module
refuses to load rather than use whatever Redis runs on the usual port.

Everything is Celery's default (JSON serializer, prefetch multiplier 4, late ack off, results
stored and read back through the Redis backend, which waits for them on pub/sub rather than by
polling), except the one setting below that only silences a start-up warning.

The worker is started by ``benchmarks.celery_bench`` as
``python -m celery -A benchmarks._celery_app worker --pool=prefork --concurrency=2 ...``;
:func:`client` is the factory ``benchmarks._load`` calls in each client process.

Example::

    app = make_app("redis://127.0.0.1:41234/0")
    app.tasks[NOOP].delay().get(timeout=30)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from celery import Celery  # type: ignore[import-untyped]

from benchmarks._redis import URL_VARIABLE

NOOP = "lrofw_bench.noop"


def make_app(url: str) -> Any:
    """A Celery app with ``url`` as broker and result backend and the no-op task :data:`NOOP`."""
    app = Celery("lrofw_bench", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        # Celery 5.3+ warns (CPendingDeprecationWarning) at every start unless this is set
        # explicitly; True is the value it already uses, so this only stops the noise.
        broker_connection_retry_on_startup=True,
    )

    # shared=False: the task belongs to this app only (a shared one would be offered to every
    # app made later, and the benchmark's own process makes two: Celery warns of a duplicate).
    @app.task(name=NOOP, shared=False)  # type: ignore[untyped-decorator]
    def noop() -> None:
        """Do nothing: what is measured is Celery's own cost of one submit-to-result."""
        return None

    return app


def _url() -> str:
    url = os.environ.get(URL_VARIABLE)
    if not url:
        raise RuntimeError(
            f"{URL_VARIABLE} is not set: benchmarks._celery_app is started by "
            "benchmarks.celery_bench, which runs a Redis of its own and passes its URL"
        )
    return url


app = make_app(_url())


def client() -> Callable[[], object]:
    """One client: each call submits one ``noop`` and blocks until its result is back."""
    noop = app.tasks[NOOP]

    def submit_and_wait() -> object:
        return noop.delay().get(timeout=30)

    return submit_and_wait
