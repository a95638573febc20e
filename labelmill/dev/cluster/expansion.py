"""A container's environment and command line, resolved as the kubelet does.

- ``$(VAR)`` expansion: third_party/forked/golang/expansion/expand.go,
  ``Expand`` / ``MappingFuncFor`` / ``tryReadVariableName``: ``$$`` is an
  escaped ``$``, an undefined reference and an unclosed ``$(`` stay verbatim.
- The environment: pkg/kubelet/kubelet_pods.go ``makeEnvironmentVariables``:
  ``envFrom`` first, then ``env`` in order, each value expanded against the
  variables defined before it and the Service variables; Service variables
  not overridden are added last. A missing non-optional Secret, ConfigMap or
  key is an error (the container is not started: CreateContainerConfigError).
- Command and args: pkg/kubelet/container/helpers.go
  ``ExpandContainerCommandAndArgs`` against the container's final env; exec
  probes: ``ExpandContainerCommandOnlyStatic`` (only ``value:`` entries).
- Service variables: pkg/kubelet/envvars/envvars.go ``FromServices`` for every
  Service with a cluster IP in the pod's namespace (``enableServiceLinks``,
  default true; headless Services are skipped).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from typing import Any

_OPERATOR = "$"
_OPENER = "("
_CLOSER = ")"


def expand(text: str, mapping: Callable[[str], str]) -> str:
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == _OPERATOR and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            read, is_var, advance = _try_read_variable_name(text[cursor + 1 :])
            out.append(mapping(read) if is_var else read)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


def _try_read_variable_name(text: str) -> tuple[str, bool, int]:
    if text[0] == _OPERATOR:
        return "$", False, 1  # escaped operator
    if text[0] == _OPENER:
        for i in range(1, len(text)):
            if text[i] == _CLOSER:
                return text[1:i], True, i + 1
        return _OPERATOR + _OPENER, False, 1  # incomplete reference: "$(" verbatim
    return _OPERATOR + text[0], False, 1  # "$" not starting a reference: "$x" verbatim


def mapping_for(*contexts: Mapping[str, str]) -> Callable[[str], str]:
    def mapping(name: str) -> str:
        for ctx in contexts:
            if name in ctx:
                return ctx[name]
        return f"{_OPERATOR}{_OPENER}{name}{_CLOSER}"

    return mapping


class EnvError(Exception):
    """CreateContainerConfigError: a referenced Secret, ConfigMap or key is missing."""


def object_data(doc: Mapping[str, Any]) -> dict[str, str]:
    """A Secret's or ConfigMap's keys: ``data`` (base64 for Secrets) and ``stringData``."""
    data: dict[str, str] = {}
    raw = doc.get("data") or {}
    for key, value in raw.items():
        if doc.get("kind") == "Secret":
            data[key] = base64.b64decode(value).decode()
        else:
            data[key] = str(value)
    for key, value in (doc.get("stringData") or {}).items():
        data[key] = str(value)
    for key, value in (doc.get("binaryData") or {}).items():
        data[key] = base64.b64decode(value).decode(errors="replace")
    return data


def _field(pod: Mapping[str, Any], path: str) -> str:
    meta = pod.get("metadata", {})
    if path == "metadata.name":
        return str(meta.get("name", ""))
    if path == "metadata.namespace":
        return str(meta.get("namespace", "default"))
    if path == "metadata.uid":
        return str(meta.get("uid", ""))
    if path.startswith("metadata.labels['") and path.endswith("']"):
        return str(meta.get("labels", {}).get(path[17:-2], ""))
    if path.startswith("metadata.annotations['") and path.endswith("']"):
        return str(meta.get("annotations", {}).get(path[22:-2], ""))
    status = pod.get("status", {})
    spec = pod.get("spec", {})
    values = {
        "status.podIP": status.get("podIP", ""),
        "status.podIPs": status.get("podIP", ""),
        "status.hostIP": status.get("hostIP", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
    }
    if path not in values:
        raise EnvError(f"fieldRef {path!r} is not supported")
    return str(values[path])


def _ref(
    kind: str,
    ref: Mapping[str, Any],
    objects: Mapping[str, Mapping[str, str]],
) -> str | None:
    """A secretKeyRef / configMapKeyRef value; None when optional and missing."""
    optional = bool(ref.get("optional", False))
    name, key = ref.get("name", ""), ref.get("key", "")
    if name not in objects:
        if optional:
            return None
        raise EnvError(f'{kind} "{name}" not found')
    if key not in objects[name]:
        if optional:
            return None
        raise EnvError(f"couldn't find key {key} in {kind} {name}")
    return objects[name][key]


def make_environment(
    container: Mapping[str, Any],
    pod: Mapping[str, Any],
    *,
    secrets: Mapping[str, Mapping[str, str]],
    config_maps: Mapping[str, Mapping[str, str]],
    service_env: Mapping[str, str],
) -> dict[str, str]:
    """The container's environment, in kubelet order (without image or node env)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, objects in (("configMapRef", config_maps), ("secretRef", secrets)):
            if kind in source:
                ref = source[kind]
                if ref.get("name") not in objects:
                    if ref.get("optional"):
                        continue
                    raise EnvError(f'{kind} "{ref.get("name")}" not found')
                for key, item in objects[ref["name"]].items():
                    env[prefix + key] = item
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(str(var.get("value", "")), mapping_for(env, service_env))
            continue
        source = var["valueFrom"]
        value: str | None
        if "fieldRef" in source:
            value = _field(pod, source["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in source:
            value = _ref("secret", source["secretKeyRef"], secrets)
        elif "configMapKeyRef" in source:
            value = _ref("configmap", source["configMapKeyRef"], config_maps)
        else:
            raise EnvError(f"env {name}: valueFrom {sorted(source)} is not supported")
        if value is not None:
            env[name] = value
    for name, value in service_env.items():
        env.setdefault(name, value)
    return env


def expand_command(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    mapping = mapping_for(env)
    return [expand(arg, mapping) for arg in argv]


def expand_command_static(argv: Sequence[str], container: Mapping[str, Any]) -> list[str]:
    """An exec probe's command, as the kubelet expands it.

    pkg/kubelet/container/helpers.go ``ExpandContainerCommandOnlyStatic``:
    its map (``v1EnvVarsToMap``) has every ``env`` entry under its name with
    its ``value`` as written: unexpanded, and empty for a ``valueFrom`` entry
    (which is thus referenced as the empty string, not left verbatim).
    ``envFrom`` and Service variables are not in it.
    """
    static = {v["name"]: str(v.get("value", "")) for v in container.get("env") or []}
    return expand_command(argv, static)


def service_env(services: Sequence[tuple[str, str, Sequence[tuple[str, int]]]]) -> dict[str, str]:
    """Docker-links-style variables for ``(name, cluster_ip, [(port_name, port)])``."""
    env: dict[str, str] = {}
    for name, ip, ports in services:
        if not ports:
            continue
        base = name.upper().replace("-", "_")
        env[f"{base}_SERVICE_HOST"] = ip
        env[f"{base}_SERVICE_PORT"] = str(ports[0][1])
        for port_name, port in ports:
            if port_name:
                env[f"{base}_SERVICE_PORT_{port_name.upper().replace('-', '_')}"] = str(port)
        first = ports[0][1]
        env[f"{base}_PORT"] = f"tcp://{ip}:{first}"
        for _port_name, port in ports:
            pre = f"{base}_PORT_{port}_TCP"
            env[pre] = f"tcp://{ip}:{port}"
            env[f"{pre}_PROTO"] = "tcp"
            env[f"{pre}_PORT"] = str(port)
            env[f"{pre}_ADDR"] = ip
    return env
