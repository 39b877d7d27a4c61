"""What :class:`lrofw.testing.OperationMachine` prints: requests as the code that builds them (so
Hypothesis' shrunk steps run as printed), operations' outcomes, and what a handler raised."""

from __future__ import annotations

import collections.abc
import keyword
import logging
import math
import traceback

import grpc
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf.message import Message

Operation = operations_pb2.Operation


def code(value: object) -> str:
    """``value`` as Python source: messages as ``Type(field=...)`` (as Hypothesis prints steps)."""
    if isinstance(value, Message):
        descriptor = value.DESCRIPTOR
        package = descriptor.file.package
        name = descriptor.full_name[len(package) + 1 :] if package else descriptor.full_name
        fields = []
        for field, item in value.ListFields():
            text = code(item)
            ok = field.name.isidentifier() and not keyword.iskeyword(field.name)
            fields.append(f"{field.name}={text}" if ok else f"**{{{field.name!r}: {text}}}")
        return f"{name}({', '.join(fields)})"
    if isinstance(value, collections.abc.Mapping):
        return "{" + ", ".join(f"{code(k)}: {code(v)}" for k, v in value.items()) + "}"
    if isinstance(value, collections.abc.Sequence) and not isinstance(value, (str, bytes)):
        return "[" + ", ".join(code(item) for item in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    return repr(value)


class Shown:
    """A drawn request, printed as the code that builds it (the step ``state.create(request=
    ProvisionDutRequest(name='x'))`` then runs as printed: ``create`` takes a bare message too)."""

    def __init__(self, message: Message) -> None:
        self.message = message

    def __repr__(self) -> str:
        return code(self.message)


def result(op: Operation) -> tuple[str | None, bytes]:
    """An operation's result, comparable: ``("response" | "error" | None, its bytes)``."""
    which = op.WhichOneof("result")
    return which, b"" if which is None else getattr(op, which).SerializeToString(deterministic=True)


def outcome(op: Operation) -> str:
    """How an operation ended, for messages: ``error NOT_FOUND 'Unknown DUT x'``."""
    which = op.WhichOneof("result")
    if which == "error":
        names = {c.value[0]: c.name for c in grpc.StatusCode}
        status = names.get(op.error.code, str(op.error.code))
        return f"error {status} {op.error.message!r}"
    if which == "response":
        return f"response {op.response.TypeName()}"
    return "not done"


class LogTap(logging.Handler):
    """Keeps the exceptions lrofw logs for operations (the traceback of an INTERNAL outcome goes
    to the log only), so that a failure can say what the handler raised."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self.records.append((record.getMessage(), text))

    def raised(self, name: str) -> str | None:
        return next((text for message, text in self.records if name in message), None)
