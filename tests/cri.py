"""A small client of Kubernetes' CRI (runtime.v1), what a kubelet says to
containerd, for the parts the tests use: pull an image, run a pod sandbox on
the host network, create, start, exec in, stop and remove containers."""

from __future__ import annotations

from typing import Any

import grpc

from unionfs.snapshot.messages import (
    BOOL,
    BYTES,
    ENUM,
    INT32,
    INT64,
    MESSAGE,
    STRING,
    UINT32,
    add_enum,
    add_message,
    build_classes,
    new_file,
)

NODE = 2  # NamespaceMode: the host's namespace


def _classes() -> dict[str, Any]:
    api = new_file("strata/tests/cri/api.proto", "runtime.v1")
    add_enum(api, "NamespaceMode", ["POD", "CONTAINER", "NODE", "TARGET"])

    def of(name: str) -> str:
        return f".runtime.v1.{name}"

    add_message(api, "ImageSpec", [("image", 1, STRING, "", False)], (("annotations", 2),))
    add_message(api, "Int64Value", [("value", 1, INT64, "", False)])
    add_message(api, "KeyValue", [("key", 1, STRING, "", False), ("value", 2, STRING, "", False)])
    add_message(api, "PodSandboxMetadata", [
        ("name", 1, STRING, "", False), ("uid", 2, STRING, "", False),
        ("namespace", 3, STRING, "", False), ("attempt", 4, UINT32, "", False),
    ])  # fmt: skip
    add_message(api, "NamespaceOption", [
        ("network", 1, ENUM, of("NamespaceMode"), False),
        ("pid", 2, ENUM, of("NamespaceMode"), False),
        ("ipc", 3, ENUM, of("NamespaceMode"), False),
    ])  # fmt: skip
    add_message(api, "LinuxSandboxSecurityContext", [
        ("namespace_options", 1, MESSAGE, of("NamespaceOption"), False),
        ("run_as_user", 3, MESSAGE, of("Int64Value"), False),
    ])  # fmt: skip
    add_message(api, "LinuxPodSandboxConfig", [
        ("cgroup_parent", 1, STRING, "", False),
        ("security_context", 2, MESSAGE, of("LinuxSandboxSecurityContext"), False),
    ])  # fmt: skip
    add_message(api, "PodSandboxConfig", [
        ("metadata", 1, MESSAGE, of("PodSandboxMetadata"), False),
        ("hostname", 2, STRING, "", False),
        ("log_directory", 3, STRING, "", False),
        ("linux", 8, MESSAGE, of("LinuxPodSandboxConfig"), False),
    ], (("labels", 6), ("annotations", 7)))  # fmt: skip
    add_message(api, "ContainerMetadata", [
        ("name", 1, STRING, "", False), ("attempt", 2, UINT32, "", False),
    ])  # fmt: skip
    add_message(api, "LinuxContainerSecurityContext", [
        ("namespace_options", 3, MESSAGE, of("NamespaceOption"), False),
        ("run_as_user", 5, MESSAGE, of("Int64Value"), False),
        ("readonly_rootfs", 7, BOOL, "", False),
    ])  # fmt: skip
    add_message(api, "LinuxContainerConfig", [
        ("security_context", 2, MESSAGE, of("LinuxContainerSecurityContext"), False),
    ])  # fmt: skip
    add_message(api, "ContainerConfig", [
        ("metadata", 1, MESSAGE, of("ContainerMetadata"), False),
        ("image", 2, MESSAGE, of("ImageSpec"), False),
        ("command", 3, STRING, "", True),
        ("args", 4, STRING, "", True),
        ("working_dir", 5, STRING, "", False),
        ("envs", 6, MESSAGE, of("KeyValue"), True),
        ("log_path", 11, STRING, "", False),
        ("linux", 15, MESSAGE, of("LinuxContainerConfig"), False),
    ], (("labels", 9), ("annotations", 10)))  # fmt: skip
    add_message(api, "PullImageRequest", [
        ("image", 1, MESSAGE, of("ImageSpec"), False),
        ("sandbox_config", 3, MESSAGE, of("PodSandboxConfig"), False),
    ])  # fmt: skip
    add_message(api, "PullImageResponse", [("image_ref", 1, STRING, "", False)])
    add_message(api, "RemoveImageRequest", [("image", 1, MESSAGE, of("ImageSpec"), False)])
    add_message(api, "RemoveImageResponse", [])
    add_message(api, "RunPodSandboxRequest", [
        ("config", 1, MESSAGE, of("PodSandboxConfig"), False),
        ("runtime_handler", 2, STRING, "", False),
    ])  # fmt: skip
    add_message(api, "RunPodSandboxResponse", [("pod_sandbox_id", 1, STRING, "", False)])
    add_message(api, "CreateContainerRequest", [
        ("pod_sandbox_id", 1, STRING, "", False),
        ("config", 2, MESSAGE, of("ContainerConfig"), False),
        ("sandbox_config", 3, MESSAGE, of("PodSandboxConfig"), False),
    ])  # fmt: skip
    add_message(api, "CreateContainerResponse", [("container_id", 1, STRING, "", False)])
    add_message(api, "StartContainerRequest", [("container_id", 1, STRING, "", False)])
    add_message(api, "StartContainerResponse", [])
    add_message(api, "ExecSyncRequest", [
        ("container_id", 1, STRING, "", False),
        ("cmd", 2, STRING, "", True),
        ("timeout", 3, INT64, "", False),
    ])  # fmt: skip
    add_message(api, "ExecSyncResponse", [
        ("stdout", 1, BYTES, "", False), ("stderr", 2, BYTES, "", False),
        ("exit_code", 3, INT32, "", False),
    ])  # fmt: skip
    add_message(api, "StopContainerRequest", [
        ("container_id", 1, STRING, "", False), ("timeout", 2, INT64, "", False),
    ])  # fmt: skip
    add_message(api, "StopContainerResponse", [])
    add_message(api, "RemoveContainerRequest", [("container_id", 1, STRING, "", False)])
    add_message(api, "RemoveContainerResponse", [])
    add_message(api, "StopPodSandboxRequest", [("pod_sandbox_id", 1, STRING, "", False)])
    add_message(api, "StopPodSandboxResponse", [])
    add_message(api, "RemovePodSandboxRequest", [("pod_sandbox_id", 1, STRING, "", False)])
    add_message(api, "RemovePodSandboxResponse", [])
    return build_classes([api])


CRI = _classes()

_SERVICES = {
    "PullImage": "ImageService",
    "RemoveImage": "ImageService",
    "RunPodSandbox": "RuntimeService",
    "StopPodSandbox": "RuntimeService",
    "RemovePodSandbox": "RuntimeService",
    "CreateContainer": "RuntimeService",
    "StartContainer": "RuntimeService",
    "ExecSync": "RuntimeService",
    "StopContainer": "RuntimeService",
    "RemoveContainer": "RuntimeService",
}


class CriClient:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, **fields: Any) -> Any:
        request, response = CRI[f"{method}Request"], CRI[f"{method}Response"]
        stub = self.channel.unary_unary(
            f"/runtime.v1.{_SERVICES[method]}/{method}",
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )
        return stub(request(**fields), timeout=300)


def host_network_pod(name: str, log_directory: str) -> Any:
    """A pod sandbox on the host's network, pid and ipc namespaces: no CNI needed."""
    host = CRI["NamespaceOption"](network=NODE, pid=NODE, ipc=NODE)
    return CRI["PodSandboxConfig"](
        metadata=CRI["PodSandboxMetadata"](name=name, uid=f"{name}-uid", namespace="default"),
        log_directory=log_directory,
        linux=CRI["LinuxPodSandboxConfig"](
            security_context=CRI["LinuxSandboxSecurityContext"](namespace_options=host)
        ),
    )
