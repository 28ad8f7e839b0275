"""Start, stop and inspect the bundle's TorchServe; the Python behind scripts/serve.sh.

python -m deploy.serve start [--fresh | --accept-loss] [--expose-inference | --front-door [--cert PEM]]
[--no-tokens] python -m deploy.serve stop | status | restart
"""

import argparse
import os
import sys
import time

import requests

from bundle import settings
from deploy import frontdoor, guard, management
from deploy.client import target
from deploy.errors import ServerError, UsageError
from deploy.server import DEFAULT_MODELS, TorchServe
from deploy.versions import check_restore

GUARD_STATES = {
    "down": "DOWN: the management port does not answer (inference still does); `scripts/serve.sh start` "
    "relaunches it",
    "frozen": "FROZEN (stopped by a signal): management requests hang; `scripts/serve.sh start` "
    "relaunches it",
    "restarting": "restarting (its supervisor brings it back within seconds)",
    "unsupervised": "running, but nothing restarts it if it dies; `scripts/serve.sh start` "
    "relaunches it supervised",
}


def exposure_warning(ts: TorchServe, why: str) -> str:
    """The warning that every local user can reach the gRPC management port, and how to close it."""
    return (
        f"WARNING: TorchServe's gRPC management port {ts.ports.grpc_management} registers any model "
        f"directory for a management-key holder and every local user can connect to it ({why}): start as "
        "root with nftables installed (scripts/setup.sh) so that only root and the server's user can "
        "(docs/security.md)"
    )


def print_status(ts: TorchServe):
    """Print whether TorchServe runs, its URLs, its guard's state, the gRPC port's exposure and each
    model version's workers."""
    guard_state = guard.state(ts) if ts.guard else "running"
    if not ts.is_running():
        print("TorchServe is not running")
        if guard_state not in ("down", "restarting"):
            print(f"  its management guard is still {guard_state}: scripts/serve.sh stop ends it")
        return
    print(f"TorchServe is running (pid {ts.pid()})")
    key_hint = lambda kind: (
        f"(key: .{kind}.key in {os.path.relpath(ts.key_file)})" if ts.tokens_enabled else ""
    )
    print(f"  inference   {ts.url('inference')}   {key_hint('inference') or '(tokens off)'}")
    print(f"  management  {ts.url('management')}   {key_hint('management')}")
    if guard_state != "running":
        print(f"  management guard: {GUARD_STATES[guard_state]}")
    print(f"  metrics     {ts.url('metrics')}/metrics")
    why = ts.exposure()
    if why:
        print(f"  {exposure_warning(ts, why)}")
    else:
        print(f"  gRPC management :{ts.ports.grpc_management}: root and the server's user only (nftables)")
    if guard_state in ("down", "frozen"):  # a frozen guard would hold the question until it times out
        print("  models: unknown while the management guard is down")
        return
    try:
        models = management.models(ts)
    except (requests.RequestException, ServerError) as e:
        print(f"  models: unknown, the management API did not answer ({e.__class__.__name__})")
        return
    for name, versions in models.items():
        default = management.default_version(ts, name)
        for v in versions:
            print(
                f"  model {name} {v['modelVersion']}{' (default)' if v['modelVersion'] == default else ''}: "
                f"{management.ready_workers(v)}/{len(v['workers'])} workers ready, batch {v['batchSize']}"
            )


def print_header(ts: TorchServe, kind: str):
    """Print `Authorization: Bearer <key>` for curl to read from stdin (`| curl -H @- ...`), so that the key
    never stands on a command line, where `ps` shows it to every user. An expired key is refreshed first;
    raises ServerError when there is no key to print."""
    probe = ("inference", "/ping") if kind == "inference" else ("management", "/models?limit=1")
    try:
        ts.request("GET", *probe, timeout=30)  # refreshes the key when TorchServe says it expired
        header = ts.auth(kind)
    except (ServerError, OSError) as e:
        raise ServerError(f"no {kind} key ({e}); is TorchServe running? (scripts/serve.sh start)") from None
    for name, value in header.items():
        print(f"{name}: {value}")


def get_args_parser() -> argparse.ArgumentParser:
    """The options of scripts/serve.sh (start, stop, status, restart, header)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["start", "stop", "status", "restart", "header"])
    p.add_argument(
        "kind", nargs="?", default="inference", choices=["inference", "management"], help="for header"
    )
    p.add_argument(
        "--models", default=DEFAULT_MODELS, help="loaded at start when there is no saved deployment"
    )
    p.add_argument("--fresh", action="store_true", help="ignore the saved deployment (registered versions)")
    p.add_argument(
        "--accept-loss",
        action="store_true",
        help="start even when versions or defaults of the saved deployment cannot be restored, and make "
        "what is "
        "served the saved deployment (otherwise start exits 1 naming them, and a later start tries again)",
    )
    p.add_argument(
        "--expose-inference",
        action="store_true",
        help="bind inference to 0.0.0.0 (management and metrics stay on loopback)",
    )
    p.add_argument(
        "--no-tokens",
        action="store_true",
        help="DEVELOPMENT ONLY: token authorization off; the registration API is then disabled too",
    )
    p.add_argument(
        "--front-door",
        action="store_true",
        help=f"also start the HTTPS front door on 0.0.0.0:{settings.FRONT_DOOR_PORT} (docs/frontdoor.md)",
    )
    p.add_argument(
        "--cert",
        metavar="PEM",
        help="with --front-door: a real certificate (one PEM file: the chain, then the key) instead of "
        "the local CA",
    )
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace):
    """Exit with a usage error when the options contradict each other or --cert names no file."""
    if args.cert and not args.front_door:
        p.error("--cert is the front door's certificate: add --front-door")
    if args.cert and not os.path.isfile(args.cert):
        p.error(f"--cert {args.cert}: no such file")
    if args.front_door and args.expose_inference:
        p.error("--front-door keeps TorchServe on loopback: drop --expose-inference")


def server_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The config.properties values the options change: the inference address, token authorization."""
    overrides = {}
    if args.expose_inference:
        overrides["inference_address"] = f"http://0.0.0.0:{settings.ports().inference}"
    if args.no_tokens:
        # Without tokens anyone on this host could register code: keep the model API closed.
        overrides.update({"disable_token_authorization": "true", "enable_model_api": "false"})
    return overrides


def stop_serving(ts: TorchServe):
    """Stop the front door and TorchServe, saying which were running."""
    if frontdoor.for_server(ts).stop():
        print("front door stopped")
    print("TorchServe stopped" if ts.stop() else "TorchServe was not running")


def start_serving(ts: TorchServe, args: argparse.Namespace) -> list[str]:
    """Start TorchServe (or relaunch its missing helpers) and, with --front-door, the door; returns what of
    the saved deployment was not restored (empty when all was, or on a relaunch)."""
    missing = []
    t0 = time.time()
    info = ts.start(models=args.models, restore=not args.fresh)
    if info.get("relaunched"):
        print(f"TorchServe was running; relaunched its {' and '.join(info['relaunched'])}")
    else:
        missing = check_restore(ts, info["plan"], baseline=args.fresh or args.accept_loss)
        print(
            f"TorchServe started in {time.time() - t0:.1f}s"
            f"{' (restored the saved deployment)' if info['restored'] and not missing else ''}"
        )
    if info["exposed"]:
        print(exposure_warning(ts, info["exposed"]), file=sys.stderr)
    if args.front_door:
        door = frontdoor.for_server(ts, cert=os.path.abspath(args.cert) if args.cert else None)
        if not (info.get("relaunched") and door.is_running()):
            door.start()
    if args.no_tokens:
        print("WARNING: token authorization is OFF and the registration API is disabled (development mode)")
    return missing


def main(argv=None):
    """Run one action of scripts/serve.sh; a failure exits with `error: ...` and status 1."""
    p = get_args_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    ts = TorchServe(overrides=server_overrides(args))
    try:
        if args.action == "header":  # the demo server's key, or TS_KEY_FILE's
            return print_header(target(), args.kind)
        if args.action in ("stop", "restart"):
            stop_serving(ts)
        missing = start_serving(ts, args) if args.action in ("start", "restart") else []
        if args.action in ("start", "restart", "status"):
            print_status(ts)
            frontdoor.print_status(frontdoor.for_server(ts))
    except (ServerError, UsageError, frontdoor.FrontDoorError) as e:
        raise SystemExit(f"error: {e}") from None
    if missing:
        lost = "; ".join(missing)
        if not args.accept_loss:
            raise SystemExit(
                f"error: the saved deployment was not fully restored: {lost} (warnings above say why). "
                "TorchServe serves the rest. Repair and `scripts/serve.sh restart`, or accept what is "
                "served with `scripts/serve.sh restart --accept-loss`"
            )
        print(f"warning: accepted the loss of the saved deployment: {lost}", file=sys.stderr)


if __name__ == "__main__":
    main()
