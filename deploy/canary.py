"""Canary through the front door: a candidate version gets a growing share of its model's live traffic, each
step judged against the default over the same window, promoted after the last step, rolled back by itself on a
fail.

    scripts/register_version.sh model_store/my_model_v2.0.mar --canary 5,25,50,100 --step-seconds 60 \
        --prometheus http://127.0.0.1:9090

The door (deploy/haproxy_config.py, `canary_sections`) has a `canary` backend with two weighted round-robin
servers, `default` and `candidate`; this module drives it live through HAProxy's admin socket (no reload, no
connection dropped): `canary.map` names the model's path and the candidate's version (validated here: HAProxy
builds the candidate's path `/predictions/<model>/<version>` from it), and the weights are the shares. Each
step reads per side its 5xx (Prometheus or the door's counters), p99 (the door's access log) and top-1 labels
(the door's `canary` table); docs/deployment.md#canary-through-the-front-door says why each comes from
where. deploy/analysis.py judges them. Pass: the next step; after the last, set-default. Fail: the candidate's
weight goes to 0 at once, it is unregistered (or kept, not default, with keep=True) once its requests are
answered, and a report (JSON + PNG) is written to server/state/canary/. The canary is in the journal (op
`canary`) from start to verdict; a restarted door starts with an empty map, so it sends everything to the
default, and the controller, finding its split gone, stops and says so. Library code: returns a report or
raises; deploy/register_version.py prints."""

import json
import os
import re
import time

from deploy import canary_lease, journal, management
from deploy.analysis import Thresholds, measures, p99, plot, reasons
from deploy.canary_readings import (
    SIDES,
    CanaryError,
    admin,
    answers,
    door_errors,
    drain,
    fresh_responses,
    latencies,
    log_size,
    served_by_version,
)
from deploy.frontdoor import FrontDoor
from deploy.haproxy_config import CANARY_MAP, CANARY_WEIGHT
from deploy.privileges import private_files
from deploy.server import TorchServe
from deploy.versions import set_default, state_dir, unregister

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a model name or version HAProxy may put into a path


# --- the door, live -----------------------------------------------------------------------------------------


def route(model: str) -> str:
    """The model's prediction path, for the door's map; CanaryError for a name HAProxy could not carry."""
    if not NAME.fullmatch(model):
        raise CanaryError(f"model name {model!r} cannot go into a route")
    return f"/predictions/{model}"


def open_split(door: FrontDoor, model: str, version: str):
    """Route the model's path through the canary backend, the candidate at weight 0."""
    if not NAME.fullmatch(version):
        raise CanaryError(f"version {version!r} cannot go into a route")
    path = route(model)
    set_share(door, 0)
    admin(door, f"clear map {door.path(CANARY_MAP)}")
    admin(door, f"add map {door.path(CANARY_MAP)} {path} {version}")


def set_share(door: FrontDoor, share: int):
    """The candidate's share in percent; when it shrinks, the candidate's weight drops first."""
    weights = [("candidate", share), ("default", CANARY_WEIGHT - share)]
    for server, weight in weights if share < current_share(door) else reversed(weights):
        weigh(door, server, weight)


def weigh(door: FrontDoor, server: str, weight: int):
    """Set one server's weight in the canary backend (a weight is a share in percent); CanaryError when
    HAProxy refuses."""
    out = admin(door, f"set weight canary/{server} {weight}")
    if out.strip():
        raise CanaryError(f"HAProxy refused the weight of {server}: {out.strip()[:200]}")


def current_share(door: FrontDoor, server: str = "candidate") -> int:
    """The server's weight now (`get weight` answers `25 (initial 0)`); 0 when the door does not answer."""
    try:
        return int(admin(door, f"get weight canary/{server}").split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def split_in_place(door: FrontDoor, model: str, share: int, server: str = "candidate") -> bool:
    """Whether the door still sends `share` % of the model's path to `server` (the candidate, or a shadow's
    tee) as the run set it (a restarted door has an empty map and weight 0)."""
    try:
        mapped = admin(door, f"show map {door.path(CANARY_MAP)}")
    except OSError:
        return False
    return f" {route(model)} " in mapped and current_share(door, server) == share


def close_split(door: FrontDoor):
    """Everything back on the default: weight first (at once), then the route."""
    try:
        set_share(door, 0)
    except (OSError, CanaryError):
        pass  # a door that is gone splits nothing (it starts with an empty map); a refused weight: the route
    try:
        admin(door, f"clear map {door.path(CANARY_MAP)}")
    except OSError:
        pass


# --- one step -----------------------------------------------------------------------------------------------


def window(
    door: FrontDoor, prometheus: str | None, seconds: float, th: Thresholds, scrape: float, split
) -> dict:
    """Watch the split as it is for at least `seconds` and until the candidate has min_answers (at 0 % the
    default's count is what is waited for); {"default": side, "candidate": side, "seconds", "errors_from"}."""
    prom0 = fresh_responses(prometheus, time.time(), 5 * scrape)  # first: the candidate's traffic already
    answers(door, clear=True)  # flows, and what it does before the other baselines still counts as this step
    offset, t0 = log_size(door), time.time()
    stats0 = door_errors(door)
    share = current_share(door)
    waits_for = "candidate" if share else "default"
    while True:
        time.sleep(0.5)
        elapsed = time.time() - t0
        counted, gone = answers(door)
        if elapsed >= seconds and sum(counted[waits_for].values()) >= th.min_answers:
            break
        if not split():  # a restarted door splits nothing: no answer would come through the canary backend
            break
        now = door_errors(door).get("candidate", {})
        # failing (a TorchServe restarted without it answers 404): judge now, not after max_step_seconds
        # (only 5xx and 404: a client's 4xx, a missing key or a bad body, says nothing of the version)
        if now.get("5xx", 0) - stats0["candidate"]["5xx"] + gone["candidate"] >= th.min_answers:
            break
        if elapsed > th.max_step_seconds:
            raise CanaryError(f"only {sum(counted[waits_for].values())} answers in {elapsed:.0f} s")
    t1 = time.time()
    counted, gone = answers(door)
    times, _ = latencies(door, offset)
    stats1 = door_errors(door)
    time.sleep(scrape)  # answers in flight at t1 are counted by then
    prom1 = fresh_responses(prometheus, time.time(), 5 * scrape)  # a lagging Prometheus's last sample
    # could be from before the step's errors, or prom0 itself: the step would pass on nothing
    errors_from = "prometheus" if prom0 and prom1 else "door"
    sides = {}
    for side in SIDES:
        if errors_from == "prometheus":
            assert prom0 and prom1
            delta = {k: prom1[side].get(k, 0) - prom0[side].get(k, 0) for k in ("2xx", "4xx", "5xx")}
        else:
            delta = {k: stats1[side][k] - stats0[side][k] for k in ("2xx", "4xx", "5xx")}
        sides[side] = {
            "answers": int(delta["2xx"]),
            "errors": int(delta["5xx"]),
            "errors_at_door": stats1[side]["5xx"] - stats0[side]["5xx"],  # the same, from the door's counters
            "gone": gone[side],  # 404s: TorchServe no longer serves this version
            "client_errors": int(delta["4xx"]),  # reported, never judged: any client can cause them
            "p99_ms": p99(sorted(times[side])),
            "classes": counted[side],
        }
    return {**sides, "seconds": round(t1 - t0, 1), "errors_from": errors_from}


# --- the rollout --------------------------------------------------------------------------------------------


def run(
    ts: TorchServe,
    door: FrontDoor,
    model: str,
    version: str,
    steps: list[int],
    step_seconds: float = 60,
    th: Thresholds | None = None,
    prometheus: str | None = None,
    keep: bool = False,
    scrape: float = 1.0,
    say=lambda line: None,
) -> dict:
    """Canary `version` of `model` (registered, not default) through `door`; the report (also written to
    server/state/canary/). Whatever happens, the door sends everything to the default when this returns or
    raises, unless the candidate was promoted."""
    th = th or Thresholds()
    default = check_request(ts, door, model, version, steps)
    try:  # from here to the verdict, the guard refuses others' set-default/unregister of both versions
        canary_lease.hold(ts, model, default, version, lease_seconds(door, steps, th, scrape))
    except canary_lease.Busy as e:
        raise CanaryError(str(e)) from None
    report: dict = {"model": model, "candidate": version, "default": default, "steps": []}
    report.update(thresholds=th.as_dict(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    try:
        entry = journal.begin(
            state_dir(ts), "canary", model=model, version=version, default=default, steps=steps
        )
    except BaseException:  # a full disk: no canary, and no lease left to block the operator until it expires
        canary_lease.release(ts)
        raise
    t_start = time.time()
    try:
        open_split(door, model, version)
        baseline, pid = None, ts.pid()
        for share in steps:
            set_share(door, share)
            say(f"canary {model} {version}: {share} % of {route(model)}")
            step, baseline = judge_step(door, model, share, prometheus, step_seconds, th, scrape, baseline)
            # a TorchServe restarted since the step before (its versions restored): judged again all the same
            report["steps"].append({**step, "torchserve_restarted": ts.pid() != pid})
            pid = ts.pid()
            if step["why"]:
                close_split(door)  # first: the weight to 0 at once
                report["rolled_back_after_s"] = round(time.time() - t_start, 1)
                raise CanaryError(f"step {share} %: " + "; ".join(step["why"]))
        set_default(ts, model, version, reason=f"canary {','.join(map(str, steps))} passed")
        close_split(door)  # the model's path now reaches the new default directly
        report["verdict"] = f"promoted: {model} {version} is default (was {default})"
        report["traffic"] = f"all on {version}, the new default"
    except BaseException as e:  # a fail, an error, Ctrl-C: the candidate goes, whatever happened
        roll_back(ts, door, report, e, keep, prometheus)
        journal.finish(state_dir(ts), entry, "failed", why=report["verdict"])
        if not isinstance(e, CanaryError):
            raise
        return report
    finally:
        canary_lease.release(ts)
    report["served_by_version"] = served_by_version(prometheus, model)
    report["files"] = write_report(ts, report)
    journal.finish(state_dir(ts), entry, "done", why=report["verdict"])
    return report


def lease_seconds(door: FrontDoor, steps: list[int], th: Thresholds, scrape: float) -> float:
    """How long a canary may hold its lease: every step at its longest (max_step_seconds, then two waits for
    a fresh scrape), the drain, and 10 minutes for the management calls; a lease older than that blocks
    nothing."""
    return len(steps) * (th.max_step_seconds + 2 * 5 * scrape + 30) + door.canary_wait + 600


def check_request(ts: TorchServe, door: FrontDoor, model: str, version: str, steps: list[int]) -> str:
    """The model's default version, when `version` can be a canary beside it through `door`; raises why
    not."""
    if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(steps) or steps[-1] != 100:
        raise CanaryError(f"steps must rise within 1..100 and end at 100: {steps}")
    return check_candidate(ts, door, model, version, "canary")


def check_candidate(ts: TorchServe, door: FrontDoor, model: str, version: str, kind: str) -> str:
    """The model's default version, when `door` runs and `version` is registered beside it (a `kind`, canary
    or shadow, splits there); raises why not."""
    if not door.is_running():
        raise CanaryError(
            f"the front door is not running: a {kind} splits there (serve.sh start --front-door)"
        )
    default = management.default_version(ts, model)
    if all(v["modelVersion"] != version for v in management.versions(ts, model)):
        raise CanaryError(f"{model} {version} is not registered")
    if default in (None, version):
        raise CanaryError(f"{model} {version} is not a candidate beside a default (default: {default})")
    return default


def judge_step(
    door: FrontDoor, model: str, share: int, prometheus, step_seconds, th: Thresholds, scrape, baseline
) -> tuple[dict, dict | None]:
    """(the step's report entry, the default's side to judge later steps against) for the split at `share`;
    raises when the door lost the split meanwhile."""
    w = window(door, prometheus, step_seconds, th, scrape, lambda: split_in_place(door, model, share))
    if not split_in_place(door, model, share):
        raise CanaryError("the front door lost the split (restarted?): all traffic is on the default")
    if share < 100 and w["default"]["answers"] >= th.min_answers:
        # at 100 % the default's side holds only stragglers of the step before (p99 of a few: 10 ms vs 257)
        baseline = w["default"]
    elif baseline:
        # at 100 %: errors and classes against the last window that had the default; never latency across
        # windows (a busy neighbour moves both)
        baseline = {**baseline, "p99_ms": None}
    judged = measures(w["candidate"], baseline or w["default"], th)  # the figures beside their limits
    why = reasons(judged, th)
    return {"share": share, **w, "judged": judged, "verdict": "fail" if why else "pass", "why": why}, baseline


def roll_back(ts: TorchServe, door: FrontDoor, report: dict, e: BaseException, keep: bool, prometheus):
    """All traffic back on the default, the candidate withdrawn, and the report says so and is written."""
    close_split(door)
    # as long as the door itself would wait for the candidate's answer (queue + server time, and margin)
    report["in_flight_at_withdraw"] = drain(door, door.canary_wait)
    report["verdict"] = f"rolled back: {e or e.__class__.__name__}"
    report["traffic"] = "all on the default"
    report["candidate_state"] = withdraw(ts, report["model"], report["candidate"], keep)
    report["served_by_version"] = served_by_version(prometheus, report["model"])
    report["files"] = write_report(ts, report)


def withdraw(ts: TorchServe, model: str, version: str, keep: bool) -> str:
    """Unregister the rolled-back candidate (or keep it, not default); what became of it, for the report."""
    if keep:
        return "kept, not default (--keep-candidate)"
    try:
        if all(v["modelVersion"] != version for v in management.versions(ts, model)):
            return "not registered (TorchServe no longer serves it)"
        unregister(ts, model, version)
        return "unregistered"
    except Exception as e:  # noqa: BLE001 (the report says so; the next start withdraws a stray version)
        return f"left registered ({e})"


# --- the report ---------------------------------------------------------------------------------------------


def write_report(ts: TorchServe, report: dict) -> list[str]:
    """server/state/canary/<model>-<version>-<time>.json and .png (root's state folder, 0700)."""
    folder = os.path.join(state_dir(ts), "canary")
    stem = os.path.join(folder, f"{report['model']}-{report['candidate']}-{time.strftime('%Y%m%dT%H%M%S')}")
    with private_files():
        os.makedirs(folder, mode=0o700, exist_ok=True)
        with open(stem + ".json", "w") as f:
            json.dump(report, f, indent=1)
        plot(report, stem + ".png")
    return [stem + ".json", stem + ".png"]
