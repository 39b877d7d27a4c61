"""Prometheus metrics of a manager's operations (``pip install 'lrofw[metrics]'``).

:func:`enable` makes a manager count what happens to its operations into a
``prometheus_client`` registry; serve that registry at ``/metrics`` as you serve any other
(``prometheus_client.start_http_server``, or your web framework). Counting happens in the
manager, so it is the same for ``grpc.server`` and ``grpc.aio.server``:

==========================================================  =====================================
``lrofw_operations_started_total{method}``                  operations created here
``lrofw_operations_finished_total{method,code}``            operations finished here, by code
``lrofw_operation_duration_seconds{method,code}``           histogram: creation to finish
``lrofw_operations_running{method}``                        handlers running now
``lrofw_operations_queued``                                 runs waiting for a worker now
``lrofw_waiters``                                           WaitOperation calls held now
``lrofw_operations_rescued_total``                          orphans resolved here (aborted/resumed)
``lrofw_operations_expired_total``                          finished operations removed (ttl)
``lrofw_store_errors_total{kind}``                          store failures: unavailable, corrupted,
                                                            other
==========================================================  =====================================

``method`` is the RPC's full name (``/pkg.Service/Method``; ``""`` for operations made with
:meth:`lrofw.Manager.new_operation` without one) and ``code`` a ``grpc.StatusCode`` name
(``OK``, ``CANCELLED``, ...). The three gauges are read from the managers when scraped, so they
cost nothing between scrapes. Several managers may be enabled on one registry: the counters
and gauges add up.

``import lrofw`` never imports ``prometheus_client``; this module does, when it is imported.

Example:
    >>> import prometheus_client
    >>> import lrofw.metrics
    >>> manager = lrofw.Manager()
    >>> lrofw.metrics.enable(manager)  # into prometheus_client.REGISTRY
    >>> prometheus_client.start_http_server(9464)  # http://localhost:9464/metrics
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator

import grpc

from . import _check
from .manager import Manager

try:
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised in a venv without it
    raise ImportError(
        "lrofw.metrics needs prometheus-client: pip install 'lrofw[metrics]'"
    ) from exc

__all__ = ["DURATION_BUCKETS", "enable"]

#: The duration histogram's buckets (seconds): operations run from milliseconds to hours.
DURATION_BUCKETS = (
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0,
)  # fmt: skip

#: google.rpc.Code numbers to grpc.StatusCode names (``OK``, ``CANCELLED``, ...).
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class _Metrics:
    """The metrics of one registry, and the managers counted into it: an observer of each
    manager's events (lrofw._events.Observer), and the collector of their gauges."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.managers: weakref.WeakSet[Manager] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._started = prometheus_client.Counter(
            "lrofw_operations_started_total",
            "Operations created, by method.",
            ["method"],
            registry=registry,
        )
        self._finished = prometheus_client.Counter(
            "lrofw_operations_finished_total",
            "Operations finished here, by method and final code.",
            ["method", "code"],
            registry=registry,
        )
        self._duration = prometheus_client.Histogram(
            "lrofw_operation_duration_seconds",
            "Seconds from an operation's creation to its finish, by method and final code.",
            ["method", "code"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._rescued = prometheus_client.Counter(
            "lrofw_operations_rescued_total",
            "Operations whose server stopped, resolved here (aborted, or resumed).",
            registry=registry,
        )
        self._expired = prometheus_client.Counter(
            "lrofw_operations_expired_total",
            "Finished operations removed after their ttl.",
            registry=registry,
        )
        self._store_errors = prometheus_client.Counter(
            "lrofw_store_errors_total",
            "Failed store calls, by kind: unavailable, corrupted or other.",
            ["kind"],
            registry=registry,
        )
        for kind in ("unavailable", "corrupted", "other"):
            self._store_errors.labels(kind=kind)  # shown at 0 from the start, for alerts
        registry.register(_Gauges(self))

    # --- lrofw._events.Observer ---------------------------------------------------------------

    def started(self, method: str) -> None:
        self._started.labels(method=method).inc()

    def finished(self, method: str, code: int, seconds: float) -> None:
        name = _CODE_NAMES.get(code, str(code))
        self._finished.labels(method=method, code=name).inc()
        self._duration.labels(method=method, code=name).observe(seconds)

    def rescued(self, count: int) -> None:
        self._rescued.inc(count)

    def expired(self, count: int) -> None:
        self._expired.inc(count)

    def store_error(self, kind: str) -> None:
        self._store_errors.labels(kind=kind).inc()


class _Gauges(Collector):
    """``lrofw_operations_running``, ``lrofw_operations_queued`` and ``lrofw_waiters``, read
    from the managers' registries at scrape time."""

    def __init__(self, metrics: _Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return list(self._families({}, 0, 0))

    def collect(self) -> Iterator[Metric]:
        running: dict[str, int] = {}
        queued = waiters = 0
        for manager in list(self._metrics.managers):
            by_method, manager_queued, manager_waiters = manager.registry.load()
            for method, count in by_method.items():
                running[method] = running.get(method, 0) + count
            queued += manager_queued
            waiters += manager_waiters
        return self._families(running, queued, waiters)

    @staticmethod
    def _families(running: dict[str, int], queued: int, waiters: int) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "lrofw_operations_running", "Handlers running now, by method.", labels=["method"]
        )
        for method, count in sorted(running.items()):
            family.add_metric([method], count)
        yield family
        yield GaugeMetricFamily(
            "lrofw_operations_queued", "Handlers waiting for a worker now.", value=queued
        )
        yield GaugeMetricFamily(
            "lrofw_waiters", "WaitOperation calls (and other waiters) held now.", value=waiters
        )


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def enable(manager: Manager, registry: CollectorRegistry | None = None) -> None:
    """Count ``manager``'s operations into ``registry`` (``prometheus_client.REGISTRY`` by
    default) from now on. Enabling it again on the same registry changes nothing; other
    managers enabled on the same registry add to the same metrics.

    Args:
        manager: the manager to observe.
        registry: the ``prometheus_client.CollectorRegistry`` to register the metrics in.

    Raises:
        TypeError: ``manager`` is not an :class:`lrofw.Manager`, or ``registry`` not a
            ``CollectorRegistry``.
        ValueError: ``registry`` already has metrics of these names that lrofw did not make.

    Example:
        >>> registry = prometheus_client.CollectorRegistry()
        >>> lrofw.metrics.enable(manager, registry)
        >>> b"lrofw_operations_started_total" in prometheus_client.generate_latest(registry)
        True
    """
    _check.instance("manager", manager, Manager, "an lrofw.Manager")
    if registry is None:
        registry = prometheus_client.REGISTRY
    _check.instance(
        "registry", registry, CollectorRegistry, "a prometheus_client.CollectorRegistry or None"
    )
    with _lock:
        metrics = _by_registry.get(registry)
        if metrics is None:
            try:
                metrics = _Metrics(registry)
            except ValueError as exc:  # "Duplicated timeseries in CollectorRegistry"
                raise ValueError(
                    f"this registry already has lrofw's metric names ({exc}); pass another "
                    "prometheus_client.CollectorRegistry"
                ) from exc
            _by_registry[registry] = metrics
        if manager in metrics.managers:
            return
        metrics.managers.add(manager)
    manager.events.add(metrics)
