"""The control plane's REST API (Starlette): policy CRUD with validation, ETags and bearer auth on writes.

It never touches requests: gateways read etcd directly, so the mesh keeps routing while this is down.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from policy.models import MeshPolicy, ServicePolicy
from policy.models import Route as RouteModel
from policy.parse import PolicyError, load_document
from policy.store import Item, PolicyStore, RevisionMismatch
from registry.etcd import ETCD_ERRORS

MAX_BODY = 1024 * 1024
SECTION_KIND = {"routes": "Route", "services": "Service", "mesh": "Mesh"}


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status)


def _doc(item: Item) -> JSONResponse:
    return JSONResponse(item.document(), headers={"etag": f'"{item.revision}"'})


def make_control_app(store: PolicyStore, token: str | None) -> Starlette:
    """``token=None`` disables write auth (only with an explicit --no-auth)."""

    def guarded(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            if request.method in ("PUT", "DELETE", "POST") and token is not None:
                auth = request.headers.get("authorization", "")
                given = auth[7:] if auth.lower().startswith("bearer ") else ""
                if not given or not hmac.compare_digest(given.encode(), token.encode()):
                    return _error(401, "unauthenticated", "writes need 'Authorization: Bearer <token>'")
            try:
                return await fn(request)
            except ETCD_ERRORS as exc:
                return _error(503, "etcd_unavailable", f"etcd unavailable: {exc}")

        return handler

    def target(request: Request) -> tuple[str, str]:
        section = request.url.path.split("/")[2]
        kind = SECTION_KIND[section]
        return kind, request.path_params.get("name", "mesh")

    async def list_items(request: Request) -> Response:
        kind, _ = target(request)
        return JSONResponse({"items": [i.document() for i in await store.list(kind)]})

    async def get_item(request: Request) -> Response:
        kind, name = target(request)
        try:
            item = await store.get(kind, name)
        except PolicyError as exc:
            return _error(400, "invalid_name", str(exc), errors=exc.errors)
        if item is None:
            return _error(404, "not_found", f"{kind.lower()} {name!r} does not exist")
        return _doc(item)

    async def put_item(request: Request) -> Response:
        kind, name = target(request)
        body = await request.body()
        if len(body) > MAX_BODY:
            return _error(413, "payload_too_large", f"policy documents are limited to {MAX_BODY} bytes")
        try:
            spec = load_document(body)
            if isinstance(spec, dict) and "spec" in spec and "kind" in spec:
                spec = spec["spec"]  # a whole document ({kind, name, spec}) is accepted too
            if_match = _revision(request.headers.get("if-match"))
            if_absent = request.headers.get("if-none-match", "").strip() == "*"
            model, revision = await store.put(kind, name, spec, if_match=if_match, if_absent=if_absent)
        except PolicyError as exc:
            return _error(400, "invalid_policy", str(exc), errors=exc.errors)
        except _BadHeader as exc:
            return _error(400, "invalid_header", str(exc))
        except RevisionMismatch as exc:
            return _error(412, "precondition_failed",
                          f"{kind.lower()} {name!r} changed: it is at revision {exc.current}",
                          current_revision=exc.current)  # fmt: skip
        item = Item(kind, name, model.model_dump(mode="json", exclude_unset=True), revision)
        return _doc(item)

    async def delete_item(request: Request) -> Response:
        kind, name = target(request)
        try:
            deleted = await store.delete(kind, name, if_match=_revision(request.headers.get("if-match")))
        except _BadHeader as exc:
            return _error(400, "invalid_header", str(exc))
        except PolicyError as exc:
            return _error(400, "invalid_name", str(exc), errors=exc.errors)
        except RevisionMismatch as exc:
            return _error(412, "precondition_failed", f"{kind.lower()} {name!r} is at revision {exc.current}",
                          current_revision=exc.current)  # fmt: skip
        if not deleted:
            return _error(404, "not_found", f"{kind.lower()} {name!r} does not exist")
        return Response(status_code=204)

    async def status(request: Request) -> Response:
        return JSONResponse({"gateways": await store.gateway_status()})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_schema())

    routes = [
        Route("/healthz", healthz),
        Route("/openapi.json", openapi),
        Route("/v1/status", guarded(status)),
    ]
    for section in ("routes", "services"):
        routes += [
            Route(f"/v1/{section}", guarded(list_items), methods=["GET"]),
            Route(f"/v1/{section}/{{name}}", guarded(get_item), methods=["GET"]),
            Route(f"/v1/{section}/{{name}}", guarded(put_item), methods=["PUT"]),
            Route(f"/v1/{section}/{{name}}", guarded(delete_item), methods=["DELETE"]),
        ]
    routes += [
        Route("/v1/mesh", guarded(get_item), methods=["GET"]),
        Route("/v1/mesh", guarded(put_item), methods=["PUT"]),
        Route("/v1/mesh", guarded(delete_item), methods=["DELETE"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, "not_found", f"no such endpoint: {request.method} {request.url.path}")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return _error(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}")

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})


class _BadHeader(ValueError):
    pass


def _revision(value: str | None) -> int | None:
    if value is None:
        return None
    v = value.strip().removeprefix("W/").strip('"')
    if not v.isdigit():
        raise _BadHeader(f'If-Match {value!r}: expected an ETag such as "42"')
    return int(v)


def openapi_schema() -> dict[str, Any]:
    """OpenAPI 3.1 description of the API, with the policy models' JSON schemas."""
    components: dict[str, Any] = {}
    for name, model in (("Route", RouteModel), ("ServicePolicy", ServicePolicy), ("MeshPolicy", MeshPolicy)):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[name] = schema
    components["Error"] = {
        "type": "object",
        "properties": {
            "error": {"type": "string"},
            "message": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "object"}},
        },  # fmt: skip
        "required": ["error", "message"],
    }
    err = {
        "description": "error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }

    def crud(schema: str, named: bool) -> dict[str, Any]:
        params = (
            [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}] if named else []
        )
        body = {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}},
                            "application/yaml": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}  # fmt: skip
        hdr = [{"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}]
        return {
            "parameters": params,
            "get": {
                "responses": {"200": {"description": "the document, ETag = etcd mod revision"}, "404": err}
            },
            "put": {
                "security": [{"bearer": []}],
                "parameters": [*hdr, {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}}],
                "requestBody": body,
                "responses": {"200": {"description": "stored"}, "400": err, "401": err, "412": err},
            },
            "delete": {
                "security": [{"bearer": []}],
                "parameters": hdr,
                "responses": {"204": {"description": "deleted"}, "401": err, "404": err, "412": err},
            },
        }

    list_op = {"get": {"responses": {"200": {"description": "all documents of this kind"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "zonemesh control plane", "version": "1"},
        "paths": {
            "/v1/routes": list_op,
            "/v1/routes/{name}": crud("Route", True),
            "/v1/services": list_op,
            "/v1/services/{name}": crud("ServicePolicy", True),
            "/v1/mesh": crud("MeshPolicy", False),
            "/v1/status": {"get": {"responses": {"200": {"description": "each gateway's applied revision"}}}},
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
