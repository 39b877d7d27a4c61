"""Checks of public arguments: the one place a bad argument becomes a ``TypeError`` (wrong kind of
value) or ``ValueError`` (right kind, wrong value) whose message names the parameter and shows
what it got. Every public entry point checks its arguments here when it is called, so nothing
fails later, deep inside, with an ``AttributeError``.

Example:
    >>> positive_seconds("max_wait", "60")
    Traceback (most recent call last):
    TypeError: max_wait must be a number of seconds (int or float), got '60'
"""

from __future__ import annotations

import datetime
import math
import numbers
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def shown(value: object) -> str:
    """``value`` as a message shows it: its repr, cut to 80 characters.

    Example:
        >>> shown("x" * 100)[-5:]
        'xx...'
    """
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def seconds(name: str, value: object, *, timedelta_ok: bool = False) -> float:
    """A finite number of seconds, of any sign (a ``timedelta`` too when ``timedelta_ok``).

    Example:
        >>> seconds("seconds", float("nan"))
        Traceback (most recent call last):
        ValueError: seconds must be a finite number of seconds, got nan
    """
    if timedelta_ok and isinstance(value, datetime.timedelta):
        number = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        kinds = "int, float or datetime.timedelta" if timedelta_ok else "int or float"
        raise TypeError(f"{name} must be a number of seconds ({kinds}), got {shown(value)}")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number of seconds, got {shown(value)}")
    return number


def positive_seconds(name: str, value: object, *, timedelta_ok: bool = False) -> float:
    """A duration more than zero, in seconds (a ``timedelta`` too when ``timedelta_ok``).

    Example:
        >>> positive_seconds("lease", 15)
        15.0
    """
    number = seconds(name, value, timedelta_ok=timedelta_ok)
    if number <= 0:
        raise ValueError(f"{name} must be positive, got {shown(value)}")
    return number


def non_negative_seconds(name: str, value: object) -> float:
    """A duration of zero or more, in seconds.

    Example:
        >>> non_negative_seconds("grace", -1)
        Traceback (most recent call last):
        ValueError: grace must not be negative, got -1
    """
    number = seconds(name, value)
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {shown(value)}")
    return number


def optional(check: Callable[[str, object], T], name: str, value: object) -> T | None:
    """``check(name, value)``, or None when ``value`` is None (a parameter whose None means
    "no limit" or "the default").

    Example:
        >>> optional(positive_seconds, "timeout", None) is None
        True
    """
    return None if value is None else check(name, value)


def count(name: str, value: object, minimum: int) -> int:
    """A whole number (an ``int``, never a ``bool`` or a ``float``) of at least ``minimum``.

    Example:
        >>> count("max_workers", 0, 1)
        Traceback (most recent call last):
        ValueError: max_workers must be at least 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {shown(value)}")
    number = int(value)
    if number < minimum:
        if minimum == 0:
            raise ValueError(f"{name} must not be negative, got {number}")
        raise ValueError(f"{name} must be at least {minimum}, got {number}")
    return number


def flag(name: str, value: object) -> bool:
    """``True`` or ``False`` (not any truthy value: ``"no"`` is a mistake, not a yes).

    Example:
        >>> flag("aio", 1)
        Traceback (most recent call last):
        TypeError: aio must be True or False, got 1
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {shown(value)}")
    return value


def function(name: str, value: object, what: str = "") -> Callable[..., Any]:
    """Something callable; ``what`` says what it is called with, for the message.

    Example:
        >>> function("clock", 3, "() -> float")
        Traceback (most recent call last):
        TypeError: clock must be callable (() -> float), got 3
    """
    if not callable(value):
        detail = f" ({what})" if what else ""
        raise TypeError(f"{name} must be callable{detail}, got {shown(value)}")
    return value


def text(name: str, value: object) -> str:
    """A ``str``.

    Example:
        >>> text("name_prefix", b"operations")
        Traceback (most recent call last):
        TypeError: name_prefix must be a str, got b'operations'
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {shown(value)}")
    return value


def instance(name: str, value: object, kind: type | tuple[type, ...], what: str) -> None:
    """Check that ``value`` is an instance of ``kind``; ``what`` names it for the message.

    Example:
        >>> instance("manager", None, dict, "an lrofw.Manager")
        Traceback (most recent call last):
        TypeError: manager must be an lrofw.Manager, got None
    """
    if isinstance(value, type) and issubclass(value, kind):
        raise TypeError(f"{name} must be {what}, got the class itself: pass an instance of it")
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be {what}, got {shown(value)}")


def timeout(timeout: object) -> float | None:
    """The one rule for a ``timeout`` argument of every wait lrofw offers (``Manager.wait``,
    ``lrofw.wait``, the futures, and their asyncio twins; docs/clients.md#timeouts): seconds as
    a real number; ``None`` or ``math.inf`` is no limit (returned as None); ``0`` looks once and
    does not wait.

    Raises:
        TypeError: ``timeout`` is not a real number (a str, a bool, a ``timedelta``...).
        ValueError: ``timeout`` is negative or NaN.

    Example:
        >>> timeout(2), timeout(math.inf), timeout(0)
        (2.0, None, 0.0)
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(
            f"timeout must be a number of seconds or None, got {type(timeout).__name__}"
        )
    seconds = float(timeout)
    if math.isnan(seconds):
        raise ValueError("timeout must be a number of seconds or None, got nan")
    if seconds < 0:
        raise ValueError(f"timeout must not be negative, got {seconds:g}")
    return None if math.isinf(seconds) else seconds
