"""Policy access for the CLI: through the control plane's API, or straight to etcd. Same verbs either way."""

from __future__ import annotations

from typing import Any

import aiohttp

from policy.parse import PolicyError
from policy.store import Item, PolicyStore, RevisionMismatch
from registry.etcd import EtcdSettings

SECTION = {"Route": "routes", "Service": "services", "Mesh": "mesh"}


class BackendError(Exception):
    """A request the backend refused; ``message`` is ready for the user."""


class ApiBackend:
    """Talks to ``zonemesh control`` over HTTP."""

    def __init__(self, server: str, token: str | None) -> None:
        self.server = server.rstrip("/")
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    def _url(self, kind: str, name: str | None) -> str:
        if kind == "Mesh":
            return f"{self.server}/v1/mesh"
        return f"{self.server}/v1/{SECTION[kind]}" + (f"/{name}" if name else "")

    async def _json(self, resp: aiohttp.ClientResponse) -> Any:
        try:
            return await resp.json(content_type=None)
        except ValueError:
            raise BackendError(f"{resp.method} {resp.url}: HTTP {resp.status} with a non-JSON body") from None

    async def list(self, kind: str) -> list[Item]:
        if kind == "Mesh":
            item = await self.get("Mesh", "mesh")
            return [item] if item else []
        async with self.session.get(self._url(kind, None)) as r:
            data = await self._json(r)
            if r.status != 200:
                raise BackendError(data.get("message", f"HTTP {r.status}"))
        return [Item(d["kind"], d["name"], d["spec"], d["revision"]) for d in data["items"]]

    async def get(self, kind: str, name: str) -> Item | None:
        async with self.session.get(self._url(kind, name)) as r:
            data = await self._json(r)
            if r.status == 404:
                return None
            if r.status != 200:
                raise BackendError(data.get("message", f"HTTP {r.status}"))
        return Item(data["kind"], data["name"], data["spec"], data["revision"])

    async def put(self, kind: str, name: str, spec: Any, if_match: int | None = None) -> int:
        headers = dict(self.headers)
        if if_match is not None:
            headers["if-match"] = f'"{if_match}"'
        async with self.session.put(self._url(kind, name), json=spec, headers=headers) as r:
            data = await self._json(r)
            if r.status == 400 and "errors" in data:
                raise PolicyError(data["errors"])
            if r.status == 412:
                raise RevisionMismatch(name, data.get("current_revision", 0))
            if r.status != 200:
                raise BackendError(data.get("message", f"HTTP {r.status}"))
        return int(data["revision"])

    async def delete(self, kind: str, name: str) -> bool:
        async with self.session.delete(self._url(kind, name), headers=self.headers) as r:
            if r.status == 204:
                return True
            data = await self._json(r)
            if r.status == 404:
                return False
            raise BackendError(data.get("message", f"HTTP {r.status}"))

    async def close(self) -> None:
        await self.session.close()


class EtcdBackend:
    """Writes straight to etcd (validated the same way as the API)."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.store = PolicyStore(settings)

    async def list(self, kind: str) -> list[Item]:
        return await self.store.list(kind)

    async def get(self, kind: str, name: str) -> Item | None:
        return await self.store.get(kind, name)

    async def put(self, kind: str, name: str, spec: Any, if_match: int | None = None) -> int:
        _, revision = await self.store.put(kind, name, spec, if_match=if_match)
        return revision

    async def delete(self, kind: str, name: str) -> bool:
        return await self.store.delete(kind, name)

    async def close(self) -> None:
        await self.store.close()
