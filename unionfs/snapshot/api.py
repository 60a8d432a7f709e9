"""The messages of containerd's snapshots service (containerd.services.snapshots.v1),
described here field by field and built at import: no generated code, no protoc.

Only the wire matters to containerd: package, message and field names, numbers
and types below are those of its v1 API (1.6 and later; 2.x adds
`CommitSnapshotRequest.parent`, field 5, carried here too).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    empty_pb2,
    field_mask_pb2,
    message_factory,
    timestamp_pb2,
)

SERVICE = "containerd.services.snapshots.v1.Snapshots"

_F = descriptor_pb2.FieldDescriptorProto
_STRING, _INT64, _ENUM, _MESSAGE = _F.TYPE_STRING, _F.TYPE_INT64, _F.TYPE_ENUM, _F.TYPE_MESSAGE
_REPEATED = _F.LABEL_REPEATED

# Kind
UNKNOWN, VIEW, ACTIVE, COMMITTED = 0, 1, 2, 3
KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}

# (name, number, type, type name or "", repeated); "map" fields are string to string.
Field = tuple[str, int, int, str, bool]


def _message(
    file: descriptor_pb2.FileDescriptorProto,
    name: str,
    fields: list[Field],
    maps: tuple[tuple[str, int], ...] = (),
) -> None:
    message = file.message_type.add(name=name)
    for field_name, number, kind, type_name, repeated in fields:
        field = message.field.add(name=field_name, number=number, type=kind)
        field.label = _REPEATED if repeated else _F.LABEL_OPTIONAL
        if type_name:
            field.type_name = type_name
    for field_name, number in maps:
        entry_name = "".join(part.title() for part in field_name.split("_")) + "Entry"
        entry = message.nested_type.add(name=entry_name)
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=_STRING, label=_F.LABEL_OPTIONAL)
        entry.field.add(name="value", number=2, type=_STRING, label=_F.LABEL_OPTIONAL)
        field = message.field.add(name=field_name, number=number, type=_MESSAGE, label=_REPEATED)
        field.type_name = f".{file.package}.{name}.{entry_name}"


def _files() -> list[descriptor_pb2.FileDescriptorProto]:
    types = descriptor_pb2.FileDescriptorProto(
        name="strata/containerd/types/mount.proto", package="containerd.types", syntax="proto3"
    )
    _message(
        types,
        "Mount",
        [
            ("type", 1, _STRING, "", False),
            ("source", 2, _STRING, "", False),
            ("target", 3, _STRING, "", False),
            ("options", 4, _STRING, "", True),
        ],
    )
    api = descriptor_pb2.FileDescriptorProto(
        name="strata/containerd/services/snapshots/v1/snapshots.proto",
        package="containerd.services.snapshots.v1",
        syntax="proto3",
        dependency=[
            types.name,
            empty_pb2.DESCRIPTOR.name,
            field_mask_pb2.DESCRIPTOR.name,
            timestamp_pb2.DESCRIPTOR.name,
        ],
    )
    kind = api.enum_type.add(name="Kind")
    for value_name, number in (("UNKNOWN", 0), ("VIEW", 1), ("ACTIVE", 2), ("COMMITTED", 3)):
        kind.value.add(name=value_name, number=number)
    mounts: Field = ("mounts", 1, _MESSAGE, ".containerd.types.Mount", True)
    key: list[Field] = [("snapshotter", 1, _STRING, "", False), ("key", 2, _STRING, "", False)]
    parent: Field = ("parent", 3, _STRING, "", False)
    info: str = ".containerd.services.snapshots.v1.Info"
    stamp = ".google.protobuf.Timestamp"
    _message(api, "PrepareSnapshotRequest", [*key, parent], (("labels", 4),))
    _message(api, "PrepareSnapshotResponse", [mounts])
    _message(api, "ViewSnapshotRequest", [*key, parent], (("labels", 4),))
    _message(api, "ViewSnapshotResponse", [mounts])
    _message(api, "MountsRequest", key)
    _message(api, "MountsResponse", [mounts])
    _message(api, "RemoveSnapshotRequest", key)
    _message(
        api,
        "CommitSnapshotRequest",
        [
            ("snapshotter", 1, _STRING, "", False),
            ("name", 2, _STRING, "", False),
            ("key", 3, _STRING, "", False),
            ("parent", 5, _STRING, "", False),
        ],
        (("labels", 4),),
    )
    _message(api, "StatSnapshotRequest", key)
    _message(
        api,
        "Info",
        [
            ("name", 1, _STRING, "", False),
            ("parent", 2, _STRING, "", False),
            ("kind", 3, _ENUM, ".containerd.services.snapshots.v1.Kind", False),
            ("created_at", 4, _MESSAGE, stamp, False),
            ("updated_at", 5, _MESSAGE, stamp, False),
        ],
        (("labels", 6),),
    )
    _message(api, "StatSnapshotResponse", [("info", 1, _MESSAGE, info, False)])
    _message(
        api,
        "UpdateSnapshotRequest",
        [
            ("snapshotter", 1, _STRING, "", False),
            ("info", 2, _MESSAGE, info, False),
            ("update_mask", 3, _MESSAGE, ".google.protobuf.FieldMask", False),
        ],
    )
    _message(api, "UpdateSnapshotResponse", [("info", 1, _MESSAGE, info, False)])
    _message(
        api,
        "ListSnapshotsRequest",
        [("snapshotter", 1, _STRING, "", False), ("filters", 2, _STRING, "", True)],
    )
    _message(api, "ListSnapshotsResponse", [("info", 1, _MESSAGE, info, True)])
    _message(api, "UsageRequest", key)
    _message(
        api,
        "UsageResponse",
        [("size", 1, _INT64, "", False), ("inodes", 2, _INT64, "", False)],
    )
    _message(api, "CleanupRequest", [("snapshotter", 1, _STRING, "", False)])
    return [types, api]


def _build() -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    for known in (empty_pb2, field_mask_pb2, timestamp_pb2):
        pool.AddSerializedFile(known.DESCRIPTOR.serialized_pb)
    classes: dict[str, Any] = {}
    for proto in _files():
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


_CLASSES = _build()

# The message classes (protobuf's own; typed Any as generated stubs would not be).
Mount: Any = _CLASSES["Mount"]
PrepareSnapshotRequest: Any = _CLASSES["PrepareSnapshotRequest"]
PrepareSnapshotResponse: Any = _CLASSES["PrepareSnapshotResponse"]
ViewSnapshotRequest: Any = _CLASSES["ViewSnapshotRequest"]
ViewSnapshotResponse: Any = _CLASSES["ViewSnapshotResponse"]
MountsRequest: Any = _CLASSES["MountsRequest"]
MountsResponse: Any = _CLASSES["MountsResponse"]
RemoveSnapshotRequest: Any = _CLASSES["RemoveSnapshotRequest"]
CommitSnapshotRequest: Any = _CLASSES["CommitSnapshotRequest"]
StatSnapshotRequest: Any = _CLASSES["StatSnapshotRequest"]
StatSnapshotResponse: Any = _CLASSES["StatSnapshotResponse"]
Info: Any = _CLASSES["Info"]
UpdateSnapshotRequest: Any = _CLASSES["UpdateSnapshotRequest"]
UpdateSnapshotResponse: Any = _CLASSES["UpdateSnapshotResponse"]
ListSnapshotsRequest: Any = _CLASSES["ListSnapshotsRequest"]
ListSnapshotsResponse: Any = _CLASSES["ListSnapshotsResponse"]
UsageRequest: Any = _CLASSES["UsageRequest"]
UsageResponse: Any = _CLASSES["UsageResponse"]
CleanupRequest: Any = _CLASSES["CleanupRequest"]
Empty: Any = _CLASSES["Empty"]

# method: (request class, response class, server streaming)
METHODS: dict[str, tuple[Any, Any, bool]] = {
    "Prepare": (PrepareSnapshotRequest, PrepareSnapshotResponse, False),
    "View": (ViewSnapshotRequest, ViewSnapshotResponse, False),
    "Mounts": (MountsRequest, MountsResponse, False),
    "Commit": (CommitSnapshotRequest, Empty, False),
    "Remove": (RemoveSnapshotRequest, Empty, False),
    "Stat": (StatSnapshotRequest, StatSnapshotResponse, False),
    "Update": (UpdateSnapshotRequest, UpdateSnapshotResponse, False),
    "List": (ListSnapshotsRequest, ListSnapshotsResponse, True),
    "Usage": (UsageRequest, UsageResponse, False),
    "Cleanup": (CleanupRequest, Empty, False),
}
