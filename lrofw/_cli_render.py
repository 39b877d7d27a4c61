"""What the ``lrofw`` command prints: tables, readable blocks, JSON lines and progress lines.

Pure functions of an Operation (and of a :class:`Types`, which finds the message classes of its
response and metadata); ``lrofw.cli`` only calls the server and writes what these return.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import any_pb2, json_format, message_factory, text_format
from google.protobuf import descriptor_pool as pool_module
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

Operation = operations_pb2.Operation

#: Metadata fields read as a percentage for ``wait``'s progress line, first match wins.
PERCENT_FIELDS = ("percent", "percent_complete", "percentage", "progress_percent", "progress")

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_BAR_WIDTH = 30


def code_name(code: int) -> str:
    """A status code's name: ``code_name(5) == "NOT_FOUND"``; unknown numbers as ``CODE_42``."""
    return _CODE_NAMES.get(code, f"CODE_{code}")


class Types:
    """Finds the message class of an ``Any``: in the default descriptor pool (the types imported
    already), else in ``fallback`` (a pool fed by server reflection, say), else none.

    Example:
        >>> Types().unpack(any_pb2.Any(type_url="type.googleapis.com/x.Unknown")) is None
        True
    """

    def __init__(self, fallback: Callable[[str], Any] | None = None) -> None:
        self._fallback = fallback
        self._pools: dict[str, Any] = {}

    def _descriptor(self, full_name: str) -> Any:
        try:
            return pool_module.Default().FindMessageTypeByName(full_name)
        except KeyError:
            pass
        if self._fallback is None:
            return None
        return self._fallback(full_name)

    def unpack(self, packed: any_pb2.Any) -> Message | None:
        """The message in ``packed``, or None when its type is not known (or does not parse)."""
        descriptor = self._descriptor(packed.type_url.rpartition("/")[2])
        if descriptor is None:
            return None
        message: Message = message_factory.GetMessageClass(descriptor)()
        try:
            message.ParseFromString(packed.value)
        except Exception:  # a peer's bytes that do not parse as the type they claim
            return None
        return message


def type_name(packed: any_pb2.Any) -> str:
    """The full name of an Any's type: ``chromiumos.config.api.test.tls.ProvisionDutMetadata``."""
    return packed.type_url.rpartition("/")[2]


def result_text(op: Operation) -> str:
    """``-`` while running, ``OK`` for a response, ``CODE: message`` for an error."""
    if not op.done:
        return "-"
    if op.HasField("error"):
        text = code_name(op.error.code)
        return f"{text}: {op.error.message}" if op.error.message else text
    return "OK"


def table(ops: Sequence[Operation]) -> str:
    """``list``'s table: NAME, DONE, RESULT and the metadata's type, one row per operation."""
    rows = [("NAME", "DONE", "RESULT", "METADATA")]
    for op in ops:
        metadata = type_name(op.metadata) if op.HasField("metadata") else "-"
        rows.append((op.name, "yes" if op.done else "no", result_text(op), metadata))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(
            [*(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)), row[3]]
        ).rstrip()
        for row in rows
    )


def _message_block(label: str, packed: any_pb2.Any, types: Types) -> list[str]:
    lines = [f"{label:<10}{type_name(packed)}"]
    message = types.unpack(packed)
    if message is None:
        lines.append(f"  ({len(packed.value)} bytes; its type is not known here)")
    else:
        text = text_format.MessageToString(message).rstrip("\n")
        lines.extend(f"  {line}" for line in text.splitlines())
    return lines


def block(op: Operation, types: Types) -> str:
    """``get``'s and ``wait``'s readable block: name, done, result, response and metadata."""
    lines = [f"{'name:':<10}{op.name}", f"{'done:':<10}{'yes' if op.done else 'no'}"]
    lines.append(f"{'result:':<10}{result_text(op)}")
    if op.HasField("response"):
        lines.extend(_message_block("response:", op.response, types))
    if op.HasField("metadata"):
        lines.extend(_message_block("metadata:", op.metadata, types))
    return "\n".join(lines)


def _any_json(packed: any_pb2.Any, types: Types) -> dict[str, Any]:
    message = types.unpack(packed)
    if message is None:
        return {"@type": packed.type_url, "value": base64.b64encode(packed.value).decode()}
    body = json_format.MessageToDict(message, descriptor_pool=message.DESCRIPTOR.file.pool)  # type: ignore[arg-type]
    return {"@type": packed.type_url, **body}


def as_json(op: Operation, types: Types) -> str:
    """The operation in protobuf's JSON mapping, on one line; its response and metadata unpacked
    when their types are known, else as the Any (``@type`` and base64 ``value``)."""
    bare = Operation()
    bare.CopyFrom(op)
    bare.ClearField("metadata")
    bare.ClearField("response")
    out: dict[str, Any] = json_format.MessageToDict(bare)
    if op.HasField("metadata"):
        out["metadata"] = _any_json(op.metadata, types)
    if op.HasField("response"):
        out["response"] = _any_json(op.response, types)
    return json.dumps(out, sort_keys=False)


def percent(metadata: Message | None) -> float | None:
    """The percentage a metadata message reports in a field named as in :data:`PERCENT_FIELDS`
    (a float ``progress`` of at most 1 is read as a fraction), or None."""
    if metadata is None:
        return None
    fields = {field.name: field for field in metadata.DESCRIPTOR.fields}
    for name in PERCENT_FIELDS:
        field = fields.get(name)
        if field is None or field.type not in _NUMERIC:
            continue
        value = float(getattr(metadata, name))
        if name == "progress" and field.type in _FLOATS and value <= 1.0:
            value *= 100
        return max(0.0, min(100.0, value))
    return None


_FLOATS = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}
_NUMERIC = _FLOATS | {
    getattr(FieldDescriptor, f"TYPE_{kind}")
    for kind in ("INT64", "UINT64", "INT32", "FIXED64", "FIXED32", "UINT32", "SFIXED32",
                 "SFIXED64", "SINT32", "SINT64")
}  # fmt: skip


def progress(op: Operation | None, types: Types, bar: bool) -> str:
    """``wait``'s progress line: a bar (``bar``, for a terminal) or plain text, with the
    metadata's other scalar fields; ``waiting`` when the operation has told nothing yet."""
    if op is None or not op.HasField("metadata"):
        return "waiting"
    metadata = types.unpack(op.metadata)
    if metadata is None:
        return f"running ({type_name(op.metadata)})"
    share = percent(metadata)
    others = " ".join(
        f"{field.name}={value}"
        for field, value in metadata.ListFields()
        if field.name not in PERCENT_FIELDS and isinstance(value, (str, int, float))
    )
    if share is None:
        return f"running {others}".rstrip()
    if bar:
        filled = round(_BAR_WIDTH * share / 100)
        shown = f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {share:3.0f}%"
    else:
        shown = f"{share:.0f}%"
    return f"{shown} {others}".rstrip()
