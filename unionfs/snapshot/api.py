"""The messages of containerd's snapshots service (containerd.services.snapshots.v1),
described here field by field and built at import: no generated code, no protoc.

Only the wire matters to containerd: package, message and field names, numbers
and types below are those of its v1 API (1.6 and later; 2.x adds
`CommitSnapshotRequest.parent`, field 5, carried here too).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import empty_pb2, field_mask_pb2, timestamp_pb2

from .messages import (
    ENUM,
    INT64,
    MESSAGE,
    STRING,
    Field,
    add_enum,
    add_message,
    build_classes,
    new_file,
)

SERVICE = "containerd.services.snapshots.v1.Snapshots"

# Kind
UNKNOWN, VIEW, ACTIVE, COMMITTED = 0, 1, 2, 3
KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}


def _files() -> list[Any]:
    types = new_file("strata/containerd/types/mount.proto", "containerd.types")
    add_message(
        types,
        "Mount",
        [
            ("type", 1, STRING, "", False),
            ("source", 2, STRING, "", False),
            ("target", 3, STRING, "", False),
            ("options", 4, STRING, "", True),
        ],
    )
    api = new_file(
        "strata/containerd/services/snapshots/v1/snapshots.proto",
        "containerd.services.snapshots.v1",
        [
            types.name,
            empty_pb2.DESCRIPTOR.name,
            field_mask_pb2.DESCRIPTOR.name,
            timestamp_pb2.DESCRIPTOR.name,
        ],
    )
    add_enum(api, "Kind", ["UNKNOWN", "VIEW", "ACTIVE", "COMMITTED"])
    mounts: Field = ("mounts", 1, MESSAGE, ".containerd.types.Mount", True)
    key: list[Field] = [("snapshotter", 1, STRING, "", False), ("key", 2, STRING, "", False)]
    parent: Field = ("parent", 3, STRING, "", False)
    info: str = ".containerd.services.snapshots.v1.Info"
    stamp = ".google.protobuf.Timestamp"
    add_message(api, "PrepareSnapshotRequest", [*key, parent], (("labels", 4),))
    add_message(api, "PrepareSnapshotResponse", [mounts])
    add_message(api, "ViewSnapshotRequest", [*key, parent], (("labels", 4),))
    add_message(api, "ViewSnapshotResponse", [mounts])
    add_message(api, "MountsRequest", key)
    add_message(api, "MountsResponse", [mounts])
    add_message(api, "RemoveSnapshotRequest", key)
    add_message(
        api,
        "CommitSnapshotRequest",
        [
            ("snapshotter", 1, STRING, "", False),
            ("name", 2, STRING, "", False),
            ("key", 3, STRING, "", False),
            ("parent", 5, STRING, "", False),
        ],
        (("labels", 4),),
    )
    add_message(api, "StatSnapshotRequest", key)
    add_message(
        api,
        "Info",
        [
            ("name", 1, STRING, "", False),
            ("parent", 2, STRING, "", False),
            ("kind", 3, ENUM, ".containerd.services.snapshots.v1.Kind", False),
            ("created_at", 4, MESSAGE, stamp, False),
            ("updated_at", 5, MESSAGE, stamp, False),
        ],
        (("labels", 6),),
    )
    add_message(api, "StatSnapshotResponse", [("info", 1, MESSAGE, info, False)])
    add_message(
        api,
        "UpdateSnapshotRequest",
        [
            ("snapshotter", 1, STRING, "", False),
            ("info", 2, MESSAGE, info, False),
            ("update_mask", 3, MESSAGE, ".google.protobuf.FieldMask", False),
        ],
    )
    add_message(api, "UpdateSnapshotResponse", [("info", 1, MESSAGE, info, False)])
    add_message(
        api,
        "ListSnapshotsRequest",
        [("snapshotter", 1, STRING, "", False), ("filters", 2, STRING, "", True)],
    )
    add_message(api, "ListSnapshotsResponse", [("info", 1, MESSAGE, info, True)])
    add_message(api, "UsageRequest", key)
    add_message(
        api,
        "UsageResponse",
        [("size", 1, INT64, "", False), ("inodes", 2, INT64, "", False)],
    )
    add_message(api, "CleanupRequest", [("snapshotter", 1, STRING, "", False)])
    return [types, api]


_CLASSES = build_classes(_files())

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
