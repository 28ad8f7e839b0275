"""Shadow through the front door: a share of a model's live predictions also goes to a candidate version,
whose answers are compared with the default's on the same requests and never reach a user.

    scripts/register_version.sh model_store/my_model_v2.0.mar --shadow 10 --step-requests 200

HAProxy 2.6 cannot mirror a request, so a tee of our own does (deploy/shadow_tee.py): the door's `canary`
backend (deploy/haproxy_config.py) has a third server, `shadow` (a Unix socket in a folder only the door's
owner writes: deploy/haproxy_config.py's tee_socket), at weight 0 in every config it renders; a shadow run
gives it PERCENT of the model's path (the canary's map and lane: only bodies the door held whole). The tee
answers users from the default and compares the candidate's answers off their path.

A tee that is gone refuses connections, and the door retries those on the default (`retry-on conn-failure`);
a restarted door has weight 0 on the tee and an empty map. The run never promotes: the candidate stays
registered, not default; it holds the canary's lease meanwhile (deploy/canary_lease.py). Its report (JSON)
goes to server/state/shadow/. Library code: returns a report or raises CanaryError; deploy/register_version.py
prints."""

import contextlib
import json
import os
import statistics
import time
from collections import Counter

from deploy import canary, canary_lease
from deploy.canary import check_candidate, route
from deploy.canary_readings import CanaryError, admin
from deploy.frontdoor import FrontDoor
from deploy.haproxy_config import CANARY_MAP, CANARY_WEIGHT
from deploy.privileges import private_files
from deploy.server import TorchServe
from deploy.shadow_tee import Tee
from deploy.versions import state_dir

# --- the door, live ----------------------------------------------------------------------------------------


def open_split(door: FrontDoor, model: str, version: str, percent: int):
    """Send `percent` of the model's path to the tee (at door.tee_socket), the rest to the default (candidate
    at 0)."""
    canary.weigh(door, "shadow", 0)
    canary.open_split(door, model, version)  # the route, the candidate at weight 0
    canary.weigh(door, "default", CANARY_WEIGHT - percent)
    canary.weigh(door, "shadow", percent)


def in_place(door: FrontDoor, model: str, percent: int) -> bool:
    """Whether the door still sends `percent` of the model's path to the tee (a restarted one does not)."""
    return canary.split_in_place(door, model, percent, "shadow")


def close_split(door: FrontDoor):
    """Everything back on the default: the tee's weight first, then the canary's close (weights, route)."""
    with contextlib.suppress(OSError, CanaryError):
        canary.weigh(door, "shadow", 0)  # a door that is gone sends nothing to the tee (0 at its start)
    canary.close_split(door)


# --- the run ----------------------------------------------------------------------------------------------


def run(
    ts: TorchServe,
    door: FrontDoor,
    model: str,
    version: str,
    percent: int,
    seconds: float | None = None,
    pairs: int | None = None,
    max_seconds: float = 600,
    say=lambda line: None,
) -> dict:
    """Mirror `percent` of `model`'s live predictions to `version` (registered, not default) until `pairs`
    pairs or `seconds` s (whichever comes first; at most `max_seconds`); the report (also written to
    server/state/shadow/). Users get the default's answers; nothing is promoted."""
    if not 0 < percent < CANARY_WEIGHT:
        raise CanaryError(f"a shadow share is within 1..{CANARY_WEIGHT - 1} %: {percent}")
    if not seconds and not pairs:
        raise CanaryError("a shadow run needs seconds or pairs to wait for")
    default = check_request(ts, door, model, version)
    # the wait, then the tee's stop (its answers in flight, the copies queued, the worker: 3 hops), a margin
    longest = min(seconds or max_seconds, max_seconds) + 3 * (door.server_timeout + 1) + 60
    try:  # as for a canary: the guard refuses others' set-default/unregister of both versions until the end
        canary_lease.hold(ts, model, default, version, longest)
    except canary_lease.Busy as e:
        raise CanaryError(str(e)) from None
    report: dict = {"model": model, "candidate": version, "default": default, "percent": percent}
    report["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0, tee = time.time(), None
    try:
        limit = min(door.buffer, door.max_body)
        tee = Tee(ts.ports.inference, model, version, limit, door.server_timeout, door.tee_socket).start()
        open_split(door, model, version, percent)
        say(f"shadow {model} {version}: {percent} % of {route(model)} mirrored (users get {default})")
        report["ended_by"] = wait(door, model, percent, tee, seconds, pairs, max_seconds)
    finally:
        try:
            close_split(door)  # the lease kept any other split from starting since check_request saw none
            if tee:
                tee.stop()
        finally:
            canary_lease.release(ts)
    report["seconds"] = round(time.time() - t0, 1)
    report.update(summary(tee.pairs, tee.dropped))
    report["candidate_state"] = "registered, not default (a shadow never promotes)"
    report["files"] = write_report(ts, report)
    return report


def check_request(ts: TorchServe, door: FrontDoor, model: str, version: str) -> str:
    """The model's default version, when `version` can be shadowed beside it through `door`; raises why
    not."""
    default = check_candidate(ts, door, model, version, "shadow")
    if admin(door, f"show map {door.path(CANARY_MAP)}").strip():  # its split is not ours to close
        raise CanaryError("a canary or shadow is already splitting at the front door")
    return default


def wait(door: FrontDoor, model: str, percent: int, tee: Tee, seconds, pairs, max_seconds) -> str:
    """Wait for `pairs` pairs or `seconds` s, at most `max_seconds`, or until the door loses the split; why it
    ended."""
    t0 = time.time()
    while True:
        time.sleep(0.5)
        elapsed = time.time() - t0
        if pairs and len(tee.pairs) >= pairs:
            return f"{pairs} pairs"
        if seconds and elapsed >= seconds:
            return f"{seconds} s"
        if elapsed >= max_seconds:
            return f"at most {max_seconds} s (only {len(tee.pairs)} pairs)"
        if not in_place(door, model, percent):
            return "the front door lost the split (restarted?): all traffic is on the default"


def summary(pairs: list[dict], dropped: int) -> dict:
    """pairs, top-1 agreement (over the pairs where both 200 answers are label maps; `unjudged`: the other
    200 answers), candidate errors, dropped copies and the answer-time ratio (candidate p50 / default p50)."""
    answered = [p for p in pairs if p["candidate_status"] == 200]
    statuses = Counter(str(p["candidate_status"]) for p in pairs)
    out: dict = {"pairs": len(pairs), "agreement": None, "candidate_errors": len(pairs) - len(answered)}
    labelled = [p for p in answered if p["default_top1"] is not None and p["candidate_top1"] is not None]
    out["unjudged"] = len(answered) - len(labelled)  # 200 answers that are no label map (KServe's forms)
    out.update(candidate_statuses=dict(statuses), dropped=dropped, default_p50_ms=None, candidate_p50_ms=None)
    out["answer_time_ratio"] = None
    if answered:
        if labelled:
            out["agreement"] = sum(p["candidate_top1"] == p["default_top1"] for p in labelled) / len(labelled)
        out["default_p50_ms"] = statistics.median(p["default_ms"] for p in answered)
        out["candidate_p50_ms"] = statistics.median(p["candidate_ms"] for p in answered)
        out["answer_time_ratio"] = out["candidate_p50_ms"] / out["default_p50_ms"]
    return out


def write_report(ts: TorchServe, report: dict) -> list[str]:
    """server/state/shadow/<model>-<version>-<time>.json (root's state folder, 0700)."""
    folder = os.path.join(state_dir(ts), "shadow")
    path = os.path.join(
        folder, f"{report['model']}-{report['candidate']}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    )
    with private_files():
        os.makedirs(folder, mode=0o700, exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    return [path]
