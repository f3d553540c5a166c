"""The ``zonemesh policy apply|get|delete`` verbs (kubectl habits: multi-document YAML, dry-run diffs)."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from policy.client import ApiBackend, EtcdBackend
from policy.models import KINDS
from policy.parse import PolicyError, validate, yaml_problem
from registry.keys import NAME_RE

Backend = ApiBackend | EtcdBackend
KIND_ALIASES = {
    "route": "Route", "routes": "Route", "service": "Service", "services": "Service", "mesh": "Mesh",
}  # fmt: skip


class CommandError(Exception):
    """Printed as one line (or a few, one per problem) and exit status 2."""


@dataclass
class Doc:
    source: str
    kind: str
    name: str
    spec: dict[str, Any]


def load_docs(paths: list[str]) -> list[Doc]:
    """Read and validate every document in the files (directories: their *.yaml, *.yml, *.json)."""
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if f.suffix in (".yaml", ".yml", ".json"))
        elif path.exists():
            files.append(path)
        else:
            raise CommandError(f"-f: {p!r} does not exist")
    if not files:
        raise CommandError("-f: no .yaml, .yml or .json files found")
    docs: list[Doc] = []
    problems: list[str] = []
    for f in files:
        try:
            raw_docs = list(yaml.safe_load_all(f.read_text()))
        except yaml.YAMLError as exc:
            problems.append(f"{f}: not valid YAML{yaml_problem(exc)}")
            continue
        for n, raw in enumerate(d for d in raw_docs if d is not None):
            where = f"{f} (document {n + 1})"
            if not isinstance(raw, dict):
                problems.append(f"{where}: expected a mapping with kind, name and spec")
                continue
            kind = raw.get("kind")
            if kind not in KINDS:
                problems.append(f"{where}: kind: must be one of {', '.join(KINDS)} (got {kind!r})")
                continue
            name = "mesh" if kind == "Mesh" else raw.get("name")
            if not isinstance(name, str) or not NAME_RE.match(name):
                problems.append(f"{where}: name: {name!r} must be a DNS label (a-z, 0-9, '-')")
                continue
            unknown = set(raw) - {"kind", "name", "spec", "revision"}
            if unknown:
                problems.append(f"{where}: unknown top-level field(s) {', '.join(sorted(unknown))}")
                continue
            try:
                model = validate(kind, raw.get("spec") or {})
            except PolicyError as exc:
                problems += [
                    f"{where} {kind}/{name}: {e['field'] or 'spec'}: {e['message']}" for e in exc.errors
                ]
                continue
            docs.append(Doc(where, kind, name, model.model_dump(mode="json", exclude_unset=True)))
    if problems:
        raise CommandError("\n".join(problems))
    return docs


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False)


async def apply(backend: Backend, docs: list[Doc], dry_run: bool) -> list[str]:
    out = []
    for doc in docs:
        label = f"{doc.kind.lower()}/{doc.name}"
        current = await backend.get(doc.kind, doc.name)
        if current is not None and current.spec == doc.spec:
            out.append(f"{label} unchanged")
            continue
        if dry_run:
            before = _yaml(current.spec).splitlines(keepends=True) if current is not None else []
            diff = difflib.unified_diff(before, _yaml(doc.spec).splitlines(keepends=True), f"{label} (etcd)",
                                        f"{label} ({doc.source})")  # fmt: skip
            out.append(f"{label} {'configured' if current else 'created'} (dry run)")
            out += [line.rstrip("\n") for line in diff]
            continue
        await backend.put(doc.kind, doc.name, doc.spec, if_match=current.revision if current else None)
        out.append(f"{label} {'configured' if current else 'created'}")
    return out


async def get(backend: Backend, kind: str | None, name: str | None, fmt: str) -> str:
    kinds = [KIND_ALIASES[kind]] if kind else ["Mesh", "Service", "Route"]
    items = []
    for k in kinds:
        if name is not None:
            item = await backend.get(k, name if k != "Mesh" else "mesh")
            if item is None:
                raise CommandError(f"{k.lower()} {name!r} not found")
            items.append(item)
        else:
            items += await backend.list(k)
    docs = [{"kind": i.kind, "name": i.name, "revision": i.revision, "spec": i.spec} for i in items]
    if fmt == "json":
        return json.dumps(docs[0] if name is not None else {"items": docs}, indent=2, sort_keys=True)
    return "---\n".join(_yaml(d) for d in docs) if docs else "# no policy documents"


async def delete(backend: Backend, kind: str, name: str | None) -> str:
    k = KIND_ALIASES[kind]
    name = "mesh" if k == "Mesh" else name
    if name is None:
        raise CommandError(f"NAME: required to delete a {k.lower()}")
    if not await backend.delete(k, name):
        raise CommandError(f"{k.lower()} {name!r} not found")
    return f"{k.lower()}/{name} deleted"
