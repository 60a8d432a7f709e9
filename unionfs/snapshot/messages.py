"""Protocol buffer messages described in Python, field by field, and built at
import into protobuf's own classes: wire-compatible with the .proto files of
the APIs strata speaks, with no generated code and no protoc."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    empty_pb2,
    field_mask_pb2,
    message_factory,
    timestamp_pb2,
)

_F = descriptor_pb2.FieldDescriptorProto
STRING, BYTES, BOOL = _F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_BOOL
INT32, INT64, UINT32 = _F.TYPE_INT32, _F.TYPE_INT64, _F.TYPE_UINT32
ENUM, MESSAGE = _F.TYPE_ENUM, _F.TYPE_MESSAGE

# (name, number, type, type name for messages and enums or "", repeated)
Field = tuple[str, int, int, str, bool]


def new_file(name: str, package: str, dependencies: Sequence[str] = ()) -> Any:
    return descriptor_pb2.FileDescriptorProto(
        name=name, package=package, syntax="proto3", dependency=list(dependencies)
    )


def add_message(
    file: Any, name: str, fields: Sequence[Field], maps: Sequence[tuple[str, int]] = ()
) -> None:
    """A message of *fields*; *maps* are map<string, string> fields (name, number)."""
    message = file.message_type.add(name=name)
    for field_name, number, kind, type_name, repeated in fields:
        field = message.field.add(name=field_name, number=number, type=kind)
        field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
        if type_name:
            field.type_name = type_name
    for field_name, number in maps:
        entry_name = "".join(part.title() for part in field_name.split("_")) + "Entry"
        entry = message.nested_type.add(name=entry_name)
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=STRING, label=_F.LABEL_OPTIONAL)
        entry.field.add(name="value", number=2, type=STRING, label=_F.LABEL_OPTIONAL)
        field = message.field.add(
            name=field_name, number=number, type=MESSAGE, label=_F.LABEL_REPEATED
        )
        field.type_name = f".{file.package}.{name}.{entry_name}"


def add_enum(file: Any, name: str, values: Sequence[str]) -> None:
    """An enum whose values are numbered from 0 in order."""
    enum = file.enum_type.add(name=name)
    for number, value in enumerate(values):
        enum.value.add(name=value, number=number)


def build_classes(files: Sequence[Any]) -> dict[str, Any]:
    """Each file's message classes by name, in a pool of their own (with
    Empty, FieldMask and Timestamp for them to use)."""
    pool = descriptor_pool.DescriptorPool()
    for known in (empty_pb2, field_mask_pb2, timestamp_pb2):
        pool.AddSerializedFile(known.DESCRIPTOR.serialized_pb)
    classes: dict[str, Any] = {}
    for proto in files:
        pool.Add(proto)
        for message in proto.message_type:
            full = f"{proto.package}.{message.name}"
            classes[message.name] = message_factory.GetMessageClass(
                pool.FindMessageTypeByName(full)
            )
    classes["Empty"] = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("google.protobuf.Empty")
    )
    return classes
