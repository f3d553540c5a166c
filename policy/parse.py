"""Parse and validate policy values (JSON or YAML) with errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from policy.models import KINDS, MeshPolicy, ServicePolicy, Strict
from registry.keys import NAME_RE, Keys


class PolicyError(ValueError):
    """A policy value is invalid; ``errors`` lists ``{"field": "a.b", "message": "..."}``."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__(
            "; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors)
        )


def load_document(raw: bytes | str) -> Any:
    """JSON or YAML text -> Python data; PolicyError on a syntax error."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError([{"field": "", "message": f"not valid JSON or YAML{yaml_problem(exc)}"}]) from None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty one); ValueError says what is wrong."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML{yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping, got {type(data).__name__}")
    return data


def yaml_problem(exc: yaml.YAMLError) -> str:
    """`` at line L column C: problem`` for a YAML error, one line."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
    return f"{where}: {getattr(exc, 'problem', None) or exc}"


def validate(kind: str, data: Any) -> Strict:
    """Validate parsed data as ``kind`` (Route, Service, Mesh)."""
    model = KINDS[kind]
    if data is None:
        raise PolicyError([{"field": "", "message": "empty value"}])
    if not isinstance(data, dict):
        raise PolicyError([{"field": "", "message": f"expected a mapping, got {type(data).__name__}"}])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(
            [
                {
                    "field": ".".join(str(p) for p in err["loc"]),
                    "message": err["msg"].removeprefix("Value error, "),
                }
                for err in exc.errors()
            ]
        ) from None


def parse(kind: str, raw: bytes | str) -> Strict:
    return validate(kind, load_document(raw))


def kind_of_key(keys: Keys, key: str) -> tuple[str, str] | None:
    """``(kind, name)`` for a policy key, or None when the key is not one we know."""
    rest = key[len(keys.policy) :] if key.startswith(keys.policy) else None
    if rest is None:
        return None
    if rest == "mesh":
        return "Mesh", "mesh"
    section, _, name = rest.partition("/")
    if section == "routes" and name and "/" not in name and NAME_RE.match(name):
        return "Route", name
    if section == "services" and name and "/" not in name and NAME_RE.match(name):
        return "Service", name
    return None


def key_for(keys: Keys, kind: str, name: str) -> str:
    if kind == "Mesh":
        return keys.policy + "mesh"
    if not NAME_RE.match(name or ""):
        raise PolicyError([{"field": "name", "message": f"{name!r} must be a DNS label (a-z, 0-9, '-')"}])
    return keys.policy + ("routes/" if kind == "Route" else "services/") + name


def effective_service_policy(
    mesh: MeshPolicy | None, service: ServicePolicy | None, base: dict | None = None
) -> ServicePolicy:
    """Built-in defaults <- ``base`` (gateway flags) <- mesh defaults <- the service's own, merged field by field."""
    merged: dict[str, Any] = dict(base or {})
    for layer in (mesh.defaults if mesh else None, service):
        if layer is not None:
            merged = _deep_merge(merged, layer.model_dump(exclude_unset=True))
    return ServicePolicy.model_validate(merged)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
