"""PolicyStore: read and write policy in etcd, validated, with optimistic concurrency on mod revisions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from policy.models import Strict
from policy.parse import PolicyError, key_for, kind_of_key, load_document, validate
from registry.etcd import EtcdClient, EtcdSettings
from registry.keys import Keys

SECTIONS = {"routes": "Route", "services": "Service", "mesh": "Mesh"}


class RevisionMismatch(Exception):
    """The key changed since the revision the writer read (or exists when it should not)."""

    def __init__(self, key: str, current: int) -> None:
        super().__init__(f"{key} is at revision {current}")
        self.key, self.current = key, current


@dataclass
class Item:
    kind: str
    name: str
    spec: Any  # parsed JSON/YAML as stored (None if unreadable)
    revision: int
    error: str | None = None

    def document(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "revision": self.revision, "spec": self.spec}


class PolicyStore:
    """Validated access to ``<prefix>/policy/`` (and the gateways' status reports)."""

    def __init__(self, settings: EtcdSettings, client: EtcdClient | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.client = client or settings.client()

    async def close(self) -> None:
        await self.client.close()

    async def list(self, kind: str | None = None) -> list[Item]:
        resp = await self.client.get_prefix(self.keys.policy.encode())
        items = []
        for kv in resp:
            key = kv.key.decode()
            kn = kind_of_key(self.keys, key)
            if kn is None or (kind is not None and kn[0] != kind):
                continue
            items.append(_item(kn[0], kn[1], kv.value, kv.mod_revision))
        return sorted(items, key=lambda i: (i.kind, i.name))

    async def get(self, kind: str, name: str) -> Item | None:
        kv = await self.client.get(key_for(self.keys, kind, name).encode())
        if kv is None:
            return None
        return _item(kind, name, kv.value, kv.mod_revision)

    async def put(
        self, kind: str, name: str, spec: Any, if_match: int | None = None, if_absent: bool = False
    ) -> tuple[Strict, int]:
        """Validate and store; returns the model and the new mod revision. RevisionMismatch on a lost race."""
        model = validate(kind, spec)
        key = key_for(self.keys, kind, name)
        value = json.dumps(model.model_dump(mode="json", exclude_unset=True), sort_keys=True).encode()
        t = self.client.transactions
        compare = []
        if if_match is not None:
            compare.append(t.mod(key.encode()) == if_match)
        elif if_absent:
            compare.append(t.version(key.encode()) == 0)
        ok, responses = await self.client.transaction(
            compare=compare, success=[t.put(key.encode(), value)], failure=[t.get(key.encode())]
        )
        if not ok:
            current = responses[0][0][1].mod_revision if responses and responses[0] else 0
            raise RevisionMismatch(key, current)
        return model, responses[0].response_put.header.revision

    async def delete(self, kind: str, name: str, if_match: int | None = None) -> bool:
        """Delete; False when it did not exist. RevisionMismatch when ``if_match`` is stale."""
        key = key_for(self.keys, kind, name).encode()
        t = self.client.transactions
        compare = [t.mod(key) == if_match] if if_match is not None else [t.version(key) > 0]
        ok, responses = await self.client.transaction(
            compare=compare, success=[t.delete(key)], failure=[t.get(key)]
        )
        if ok:
            return True
        if if_match is not None:
            current = responses[0][0][1].mod_revision if responses and responses[0] else 0
            if current:
                raise RevisionMismatch(key.decode(), current)
        return False

    async def gateway_status(self) -> list[dict[str, Any]]:
        resp = await self.client.get_prefix(self.keys.status.encode())
        out = []
        for kv in resp:
            try:
                out.append(json.loads(kv.value))
            except ValueError:
                out.append({"key": kv.key.decode(), "error": "unreadable status value"})
        return sorted(out, key=lambda s: (s.get("zone", ""), s.get("gateway_id", "")))


def _item(kind: str, name: str, raw: bytes, revision: int) -> Item:
    try:
        return Item(kind, name, load_document(raw), revision)
    except PolicyError as exc:
        return Item(kind, name, None, revision, str(exc))
