"""Shop catalog (zones a and b): a plain WSGI app (stdlib wsgiref, threaded) that registers itself with the
thread-backed SyncHeartbeatClient, as a Flask or Django app would."""

from __future__ import annotations

import json
import os
import signal
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from registry import EtcdSettings, Instance, SyncHeartbeatClient, new_instance_id

ZONE = os.environ.get("ZONEMESH_ZONE", "a")
ITEMS = [{"sku": "teapot", "price": 24.0}, {"sku": "kettle", "price": 39.5}, {"sku": "mug", "price": 6.0}]


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/health":
        body, status = {"ok": True}, "200 OK"
    elif path in ("/items", "/"):
        body, status = {"items": ITEMS, "served_by": f"catalog in zone {ZONE}"}, "200 OK"
    else:
        body, status = {"error": "not_found"}, "404 Not Found"
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def main() -> None:
    server = make_server(
        "127.0.0.1", int(os.environ.get("PORT", "0") or 0), app, ThreadingWSGIServer, QuietHandler
    )
    port = server.server_address[1]
    instance = Instance(
        id=new_instance_id("catalog"),
        service="catalog",
        zone=ZONE,
        address="127.0.0.1",
        port=port,
        health_path="/health",
        version="v1",
    )
    heartbeat = SyncHeartbeatClient(instance, EtcdSettings.from_env())
    heartbeat.start()

    def stop(signum, frame):
        heartbeat.stop()  # deregister first, so gateways stop sending
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
