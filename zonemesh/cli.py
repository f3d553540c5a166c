"""The ``zonemesh`` command line.

Every option can also come from the environment (``ZONEMESH_<OPTION>``, e.g. ``ZONEMESH_ZONE``) or from a
YAML file given with ``--config`` (keys are option names, e.g. ``zone: a``); flags win over both.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from registry.etcd import EtcdSettings
from registry.keys import check_id, check_name


class CliError(Exception):
    """A user error: printed as one line naming the flag, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}: not a number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: must be 1-65535")
    return port


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {value!r}: not a number") from None
        if number <= 0:
            raise argparse.ArgumentTypeError(f"invalid value {value!r}: must be > 0")
        return number

    return parse


def _name(kind: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        try:
            return check_name(kind, value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _instance_id(value: str) -> str:
    try:
        return check_id("instance id", value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tag(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"invalid tag {value!r}: expected key=value")
    return key.strip(), val.strip()


def _etcd_options() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("etcd")
    g.add_argument(
        "--etcd",
        metavar="HOST:PORT[,HOST:PORT]",
        action="append",
        help="etcd endpoints (repeat or comma-separate; env ZONEMESH_ETCD_ENDPOINTS)",
    )
    g.add_argument("--etcd-ca", metavar="FILE", help="CA bundle for etcd TLS")
    g.add_argument("--etcd-cert", metavar="FILE", help="client certificate for etcd mTLS")
    g.add_argument("--etcd-key", metavar="FILE", help="client key for etcd mTLS")
    g.add_argument("--etcd-user", metavar="NAME", help="etcd username")
    g.add_argument(
        "--etcd-password", metavar="SECRET", help="etcd password (prefer env ZONEMESH_ETCD_PASSWORD)"
    )
    g.add_argument("--prefix", help="key prefix in etcd (default /zonemesh)")
    return p


def etcd_settings(args: argparse.Namespace) -> EtcdSettings:
    """EtcdSettings from parsed flags over ``ZONEMESH_ETCD_*`` env; CliError naming the flag when invalid."""
    endpoints = None
    if args.etcd:
        endpoints = tuple(e for item in args.etcd for e in str(item).split(",") if e.strip())
    for flag, path in (
        ("--etcd-ca", args.etcd_ca),
        ("--etcd-cert", args.etcd_cert),
        ("--etcd-key", args.etcd_key),
    ):
        if path and not os.path.isfile(path):
            raise CliError(f"{flag}: file {path!r} does not exist")
    try:
        return EtcdSettings.from_env(
            endpoints=endpoints,
            ca_file=args.etcd_ca,
            cert_file=args.etcd_cert,
            key_file=args.etcd_key,
            username=args.etcd_user,
            password=args.etcd_password,
            prefix=args.prefix,
        )
    except ValueError as exc:
        raise CliError(f"--etcd: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zonemesh", description="zonemesh: a gateway-centric service mesh on etcd")
    parser.add_argument("--config", metavar="FILE", help="YAML file with option defaults")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    etcd = _etcd_options()

    p = sub.add_parser("status", parents=[etcd], help="show registered services, instances and gateways")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "register", parents=[etcd], help="register an unmodified app while its health check passes"
    )
    p.add_argument("--service", required=True, type=_name("service"))
    p.add_argument("--zone", required=True, type=_name("zone"))
    p.add_argument("--address", required=True, help="IP or host name gateways dial")
    p.add_argument("--port", required=True, type=_port)
    p.add_argument("--health-url", help="URL polled by the agent; 2xx/3xx = healthy")
    p.add_argument(
        "--health-path", help="path gateways use for active checks (default: the health URL's path)"
    )
    p.add_argument("--tag", action="append", type=_tag, default=[], metavar="KEY=VALUE")
    p.add_argument("--id", type=_instance_id, help="instance id (default: unique per start)")
    p.add_argument("--weight", type=_positive(int), default=100)
    p.add_argument("--version", default="")
    p.add_argument("--ttl", type=_positive(int), default=10, help="lease TTL in seconds")
    p.add_argument("--interval", type=_positive(float), default=2.0, help="health check interval (s)")
    p.add_argument("--timeout", type=_positive(float), default=1.0, help="health check timeout (s)")
    p.add_argument("--rise", type=_positive(int), default=2, help="passes needed to register again")
    p.add_argument("--fall", type=_positive(int), default=3, help="failures before deregistering")
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("gateway", parents=[etcd], help="run a zone gateway (the data plane)")
    p.add_argument("--zone", required=True, type=_name("zone"))
    p.add_argument("--listen", default="127.0.0.1:8080", help="proxy HOST:PORT")
    p.add_argument("--admin", default="127.0.0.1:9901", help="admin HOST:PORT (health, metrics, views)")
    p.add_argument("--advertise", help="address peers dial (default: the listen host)")
    p.add_argument("--id", type=_instance_id, help="gateway id (default: unique per start)")
    p.add_argument("--workers", type=_positive(int), default=1)
    p.add_argument("--host-suffix", default=".mesh", help="Host: <service><suffix> routes to the service")
    p.add_argument(
        "--no-path-routing", dest="path_routing", action="store_false", help="disable /<service>/ routing"
    )
    p.add_argument(
        "--no-strip-prefix", dest="strip_prefix", action="store_false", help="keep /<service> in the path"
    )
    p.add_argument(
        "--balancer", choices=["least_request", "round_robin", "ring_hash"], default="least_request"
    )
    p.add_argument("--hash-header", default="x-session-id", help="header ring_hash hashes on")
    p.add_argument("--connect-timeout", type=_positive(float), default=2.0)
    p.add_argument(
        "--request-timeout", type=_positive(float), default=15.0, help="until the response head (s)"
    )
    p.add_argument(
        "--body-timeout", type=_positive(float), default=60.0, help="max body stall either way (s)"
    )
    p.add_argument(
        "--header-timeout", type=_positive(float), default=10.0, help="to receive a request head (s)"
    )
    p.add_argument("--keepalive-timeout", type=_positive(int), default=75, help="client keep-alive idle (s)")
    p.add_argument("--drain-timeout", type=_positive(float), default=20.0,
                   help="on SIGTERM, how long in-flight requests may finish before they are cut (s)")  # fmt: skip
    p.add_argument("--pool-idle-timeout", type=_positive(float), default=60.0)
    p.add_argument("--max-connections", type=_positive(int), default=1024, help="per upstream endpoint")
    p.add_argument("--max-pending", type=_positive(int), default=1024, help="queued requests per endpoint")
    p.add_argument(
        "--connect-retries", type=int, default=1, help="tries on another endpoint after connect failure"
    )
    p.add_argument("--max-header-bytes", type=_positive(int), default=64 * 1024)
    p.add_argument("--max-body-bytes", type=_positive(int), help="request body limit (default: none)")
    p.add_argument("--hc-interval", type=_positive(float), default=5.0)
    p.add_argument("--hc-timeout", type=_positive(float), default=1.0)
    p.add_argument("--hc-healthy", type=_positive(int), default=2)
    p.add_argument("--hc-unhealthy", type=_positive(int), default=3)
    p.add_argument("--outlier-consecutive", type=_positive(int), default=5)
    p.add_argument("--outlier-base-ejection", type=_positive(float), default=30.0)
    p.add_argument("--lease-ttl", type=_positive(int), default=10)
    p.add_argument("--no-access-log", dest="access_log", action="store_false")
    p.add_argument(
        "--snapshot-dir", help="save the last catalog and policy here; serve them if etcd is down at start"
    )
    p.set_defaults(func=_cmd_gateway)

    p = sub.add_parser("control", parents=[etcd], help="run the control plane (policy API)")
    p.add_argument("--listen", default="127.0.0.1:9900", help="API HOST:PORT")
    p.add_argument(
        "--token-file", help="file holding the bearer token for writes (or env ZONEMESH_CONTROL_TOKEN)"
    )
    p.add_argument("--no-auth", action="store_true", help="accept writes without a token (development only)")
    p.set_defaults(func=_cmd_control)

    p = sub.add_parser("policy", parents=[etcd], help="apply, get or delete routes and traffic policy")
    p.add_argument("--server", help="control plane URL (default: write straight to etcd)")
    p.add_argument("--token", help="bearer token for the control plane (or env ZONEMESH_CONTROL_TOKEN)")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser, required=True)
    v = verbs.add_parser("apply", help="create or update from YAML/JSON files (multi-document)")
    v.add_argument("-f", "--filename", action="append", required=True, help="file or directory (repeatable)")
    v.add_argument("--dry-run", action="store_true", help="validate and show a diff; change nothing")
    v = verbs.add_parser("get", help="show policy documents")
    v.add_argument("kind", nargs="?", choices=["routes", "route", "services", "service", "mesh"])
    v.add_argument("name", nargs="?")
    v.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    v = verbs.add_parser("delete", help="delete a policy document")
    v.add_argument("kind", choices=["routes", "route", "services", "service", "mesh"])
    v.add_argument("name", nargs="?")
    p.set_defaults(func=_cmd_policy)

    p = sub.add_parser("up", help="run a whole local mesh: etcd, control plane, gateways, example services")
    p.add_argument("mesh", nargs="?", help="mesh file (default: examples/shop/mesh.yaml if present)")
    p.add_argument("--data-dir", default=".zonemesh", help="etcd data, logs, token and state")
    p.add_argument(
        "--port-base",
        type=_port,
        default=8080,
        help="gateways on BASE+i, control plane on BASE+1820, admins on BASE+1821+i (free ones if taken)",
    )
    p.add_argument("--free-ports", action="store_true", help="use free ports for everything (scripts, tests)")
    p.add_argument("--detach", action="store_true", help="start in the background; stop with 'zonemesh down'")
    p.add_argument("--supervise", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("down", help="stop a mesh started with 'zonemesh up --detach'")
    p.add_argument("--data-dir", default=".zonemesh")
    p.set_defaults(func=_cmd_down)

    p = sub.add_parser("demo-service", parents=[etcd], help="run a demo HTTP service that self-registers")
    p.add_argument("--service", required=True, type=_name("service"))
    p.add_argument("--zone", required=True, type=_name("zone"))
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to serve on (port 0 = any free)")
    p.add_argument("--ttl", type=_positive(int), default=10)
    p.set_defaults(func=_cmd_demo_service)
    return parser


def _apply_defaults(parser: argparse.ArgumentParser, config: dict[str, Any]) -> None:
    """Defaults for every subcommand option from ``ZONEMESH_<DEST>`` env and the YAML config."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _apply_defaults(sub, config)
            continue
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        env = os.environ.get(f"ZONEMESH_{action.dest.upper()}")
        value = config.get(action.dest.replace("_", "-"), config.get(action.dest, env))
        if value is None:
            continue
        if (
            isinstance(value, str)
            and action.type is not None
            and not isinstance(action, argparse._AppendAction)
        ):
            try:
                value = action.type(value)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise CliError(f"{action.option_strings[-1]} (from env/config): {exc}") from None
        if isinstance(action, argparse._AppendAction) and not isinstance(value, list):
            value = [value]
        action.default = value
        action.required = False


def _load_config(argv: Sequence[str]) -> dict[str, Any]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    path = known.config or os.environ.get("ZONEMESH_CONFIG")
    if not path:
        return {}
    from policy.parse import read_yaml_mapping

    try:
        return read_yaml_mapping(path)
    except ValueError as exc:
        raise CliError(f"--config: {path!r}: {exc} (option names to values)") from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        _apply_defaults(parser, _load_config(argv))
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        logging.basicConfig(
            level=args.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        return int(args.func(args) or 0)
    except CliError as exc:
        prog = (
            f"zonemesh {args.command}"
            if "args" in locals() and getattr(args, "command", None)
            else "zonemesh"
        )
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run_until_signal(coro_fn: Callable[[asyncio.Event], Any]) -> Any:
    """Run ``coro_fn(stop)`` on uvloop; SIGINT/SIGTERM set ``stop`` so it can shut down cleanly."""
    import uvloop

    async def runner() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await coro_fn(stop)

    return uvloop.run(runner())


def _cmd_status(args: argparse.Namespace) -> int:
    from registry.etcd import ETCD_ERRORS
    from zonemesh.status import collect, render

    settings = etcd_settings(args)
    try:
        data = asyncio.run(asyncio.wait_for(collect(settings), settings.timeout * 3))
    except ETCD_ERRORS as exc:
        print(
            f"zonemesh status: error: etcd at {','.join(settings.endpoints)} unreachable: {exc}",
            file=sys.stderr,
        )
        return 1
    print(render(data, args.output))
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from registry.agent import RegistrationAgent
    from registry.model import Instance, new_instance_id

    settings = etcd_settings(args)
    health_path = args.health_path
    if args.health_url:
        parts = urlsplit(args.health_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CliError(f"--health-url: {args.health_url!r} is not an http(s) URL")
        health_path = health_path or (parts.path or "/")
    try:
        instance = Instance(
            id=args.id or new_instance_id(args.service),
            service=args.service,
            zone=args.zone,
            address=args.address,
            port=args.port,
            tags=dict(args.tag),
            weight=args.weight,
            version=args.version,
            health_path=health_path,
        )
    except ValueError as exc:
        raise CliError(_pydantic_flag_error(exc)) from None
    agent = RegistrationAgent(
        instance, settings, ttl=args.ttl, health_url=args.health_url, interval=args.interval,
        timeout=args.timeout, rise=args.rise, fall=args.fall,
    )  # fmt: skip
    run_until_signal(agent.run)
    return 0


def _pydantic_flag_error(exc: ValueError) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        field = str(err["loc"][0]).replace("_", "-") if err["loc"] else "value"
        return f"--{field}: {err['msg'].removeprefix('Value error, ')}"
    return str(exc)


def _cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.config import GatewayConfig, parse_hostport
    from gateway.server import configure_logging, serve

    try:
        listen = parse_hostport(args.listen, "--listen")
        admin = parse_hostport(args.admin, "--admin")
        config = GatewayConfig(
            zone=args.zone, listen=listen, admin=admin, advertise=args.advertise, etcd=etcd_settings(args),
            workers=args.workers, host_suffix=args.host_suffix, path_routing=args.path_routing,
            strip_prefix=args.strip_prefix, balancer=args.balancer, hash_header=args.hash_header,
            connect_timeout=args.connect_timeout, request_timeout=args.request_timeout,
            body_timeout=args.body_timeout, header_timeout=args.header_timeout,
            keepalive_timeout=args.keepalive_timeout, drain_timeout=args.drain_timeout,
            pool_idle_timeout=args.pool_idle_timeout,
            max_connections=args.max_connections, max_pending=args.max_pending,
            connect_retries=args.connect_retries, max_header_bytes=args.max_header_bytes,
            max_body_bytes=args.max_body_bytes, hc_interval=args.hc_interval, hc_timeout=args.hc_timeout,
            hc_healthy=args.hc_healthy, hc_unhealthy=args.hc_unhealthy,
            outlier_consecutive=args.outlier_consecutive, outlier_base_ejection=args.outlier_base_ejection,
            lease_ttl=args.lease_ttl, access_log=args.access_log, snapshot_dir=args.snapshot_dir,
        )  # fmt: skip
        if args.id:
            config.gateway_id = args.id
        config.advertised_address  # noqa: B018 - validates --advertise against --listen
    except ValueError as exc:
        raise CliError(str(exc)) from None
    configure_logging(args.log_level, args.access_log)
    try:
        serve(config)
    except OSError as exc:
        raise CliError(f"--listen/--admin: cannot bind: {exc.strerror or exc}") from None
    return 0


def _cmd_control(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.config import parse_hostport
    from gateway.listen import bind
    from policy.api import make_control_app
    from policy.store import PolicyStore

    try:
        host, port = parse_hostport(args.listen, "--listen")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    token = os.environ.get("ZONEMESH_CONTROL_TOKEN") or None
    if args.token_file:
        try:
            with open(args.token_file) as fh:
                token = fh.read().strip() or None
        except OSError as exc:
            raise CliError(f"--token-file: cannot read {args.token_file!r}: {exc.strerror}") from None
    if token is None and not args.no_auth:
        raise CliError(
            "--token-file: a token is required for writes (or ZONEMESH_CONTROL_TOKEN, or --no-auth)"
        )
    settings = etcd_settings(args)
    try:
        sock = bind(host, port)
    except OSError as exc:
        raise CliError(f"--listen: cannot bind {args.listen}: {exc.strerror or exc}") from None
    app = make_control_app(PolicyStore(settings), None if args.no_auth else token)
    logging.getLogger("zonemesh.control").info("control plane on %s:%d", host, sock.getsockname()[1])
    config = uvicorn.Config(app, loop="uvloop", http="httptools", log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _cmd_policy(args: argparse.Namespace) -> int:
    from policy import commands
    from policy.client import ApiBackend, BackendError, EtcdBackend
    from policy.parse import PolicyError
    from policy.store import RevisionMismatch
    from registry.etcd import ETCD_ERRORS

    prog = f"zonemesh policy {args.verb}"
    try:
        docs = commands.load_docs(args.filename) if args.verb == "apply" else None
    except commands.CommandError as exc:
        raise CliError(str(exc)) from None

    async def run() -> str:
        if args.server:
            backend: Any = ApiBackend(args.server, args.token or os.environ.get("ZONEMESH_CONTROL_TOKEN"))
        else:
            backend = EtcdBackend(etcd_settings(args))
        try:
            if args.verb == "apply":
                return "\n".join(await commands.apply(backend, docs or [], args.dry_run))
            if args.verb == "get":
                return await commands.get(backend, args.kind, args.name, args.output)
            return await commands.delete(backend, args.kind, args.name)
        finally:
            await backend.close()

    try:
        print(asyncio.run(run()))
    except commands.CommandError as exc:
        raise CliError(str(exc)) from None
    except PolicyError as exc:
        raise CliError(f"rejected: {exc}") from None
    except RevisionMismatch as exc:
        print(f"{prog}: error: conflict: {exc} (someone changed it meanwhile; re-run)", file=sys.stderr)
        return 1
    except BackendError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except ETCD_ERRORS as exc:
        print(f"{prog}: error: cannot reach {args.server or 'etcd'}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{prog}: error: cannot reach {args.server}: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from zonemesh.up import UpError, run_up

    try:
        return run_up(args)
    except UpError as exc:
        raise CliError(str(exc)) from None


def _cmd_down(args: argparse.Namespace) -> int:
    from zonemesh.up import run_down

    return run_down(args)


def _cmd_demo_service(args: argparse.Namespace) -> int:
    from zonemesh.demo_service import serve

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise CliError(f"--listen: {args.listen!r} is not HOST:PORT")
    serve(args.service, args.zone, host.strip("[]"), int(port), etcd_settings(args), args.ttl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
