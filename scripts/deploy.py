"""Ship model versions through TorchServe's management API, behind a promotion gate.

    python -m scripts.deploy register model_store/my_model_v2.0.mar --golden runs/v2/golden --promote
    python -m scripts.deploy register model_store/my_model_v2.0.mar --golden runs/v2/golden --dry-run
    python -m scripts.deploy list
    python -m scripts.deploy rollback
    python -m scripts.deploy unregister 2.0

register: checks the archive (SHA-256 sidecar, zip integrity, manifest), registers it as
a new version, waits for its workers, and, with --promote, sends the golden set
(validation images with known labels, written by training) to the new version and to
the current default. It sets the new version default only when its accuracy is no more
than --max-accuracy-drop points below the default's; otherwise the default keeps
serving, the rejected version is unregistered, and the exit code is 3.
Promotions are appended to state/deployments.jsonl, which `rollback` reads.
"""

import argparse
import json
import os
import statistics
import sys
import time
import zipfile
import zlib

from scripts.archive import verify_checksum
from scripts.server import ServerError, TorchServe

EXIT_REJECTED = 3


class DeployError(RuntimeError):
    pass


# --- archive checks -----------------------------------------------------------------------


def read_manifest(path: str) -> dict:
    """Validate a .mar before TorchServe sees it: a readable zip whose CRCs match, with a manifest."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad:
                raise DeployError(f"{os.path.basename(path)} is corrupt: {bad} fails its CRC check")
            return json.loads(z.read("MAR-INF/MANIFEST.json"))
    except (zipfile.BadZipFile, zlib.error) as e:  # testzip() lets a broken deflate stream's zlib.error through
        raise DeployError(f"{os.path.basename(path)} is not a valid .mar (truncated or corrupt zip: {e})") from None
    except KeyError:
        raise DeployError(f"{os.path.basename(path)} has no MAR-INF/MANIFEST.json: not a TorchServe archive") from None


def check_archive(ts: TorchServe, archive: str) -> dict:
    path = os.path.abspath(archive)
    store = os.path.abspath(ts.model_store)
    if os.path.dirname(path) != store:
        raise DeployError(
            f"{archive} is not in the model store {store}: only archives there can be registered "
            "(allowed_urls blocks everything else). Build it with scripts/archive.sh"
        )
    if not os.path.isfile(path):
        raise DeployError(f"{archive} does not exist")
    try:
        verify_checksum(path)
    except ValueError as e:
        raise DeployError(str(e)) from None
    return read_manifest(path)["model"]


# --- management API -----------------------------------------------------------------------


def api(ts: TorchServe, method: str, path: str, ok=(200,), **kw):
    resp = ts.request(method, "management", path, **kw)
    if resp.status_code not in ok:
        try:
            message = resp.json().get("message", resp.text)
        except ValueError:
            message = resp.text
        raise DeployError(f"{method} {path.split('?')[0]} answered {resp.status_code}: {message.strip()}")
    return resp.json() if resp.text.strip() else {}


def versions(ts: TorchServe, model: str) -> list[dict]:
    resp = ts.request("GET", "management", f"/models/{model}/all")
    return resp.json() if resp.status_code == 200 else []


def default_version(ts: TorchServe, model: str) -> str | None:
    # /models/{name} describes the default version (0.12's /all listing does not flag it).
    resp = ts.request("GET", "management", f"/models/{model}")
    return resp.json()[0]["modelVersion"] if resp.status_code == 200 else None


def register(ts: TorchServe, archive: str, workers: int = 1) -> tuple[str, str]:
    manifest = check_archive(ts, archive)
    model, version = manifest["modelName"], manifest["modelVersion"]
    if any(v["modelVersion"] == version for v in versions(ts, model)):
        raise DeployError(f"{model} {version} is already registered; archive a new version instead")
    api(ts, "POST", f"/models?url={os.path.basename(archive)}&initial_workers={workers}&synchronous=true", timeout=300)
    try:
        wait_ready(ts, model, version)
    except BaseException:
        withdraw(ts, model, version)
        raise
    return model, version


def withdraw(ts: TorchServe, model: str, version: str):
    """Unregister a version whose registration or gate did not finish, so that a retry can register it again."""
    try:
        if default_version(ts, model) == version and len(versions(ts, model)) > 1:
            return  # set-default went through after all: it is promoted, not half-registered
        unregister(ts, model, version)
        print(f"{model} {version} unregistered again: its registration or gate did not finish", file=sys.stderr)
    except Exception as e:
        print(
            f"warning: could not unregister {model} {version} ({e}); "
            f"remove it with scripts/register_version.sh unregister {version}",
            file=sys.stderr,
        )


def wait_ready(ts: TorchServe, model: str, version: str, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        desc = ts.request("GET", "management", f"/models/{model}/{version}")
        if desc.status_code == 200 and any(w["status"] == "READY" for w in desc.json()[0]["workers"]):
            return
        time.sleep(0.5)
    raise DeployError(f"{model} {version} has no READY worker after {timeout:.0f}s; see logs/model_log.log")


def unregister(ts: TorchServe, model: str, version: str):
    listed = versions(ts, model)
    if not any(v["modelVersion"] == version for v in listed):
        raise DeployError(f"{model} {version} is not registered")
    if default_version(ts, model) == version and len(listed) > 1:
        raise DeployError(
            f"{model} {version} is the default version; set another default first "
            "(scripts/register_version.sh rollback, or promote another version)"
        )
    api(ts, "DELETE", f"/models/{model}/{version}")


def set_default(ts: TorchServe, model: str, version: str, reason: str):
    previous = default_version(ts, model)
    api(ts, "PUT", f"/models/{model}/{version}/set-default")
    record(ts, {"model": model, "version": version, "previous": previous, "reason": reason})


# --- history (for rollback) -------------------------------------------------------------------


def history_path(ts: TorchServe) -> str:
    return os.path.join(ts.workdir, "state", "deployments.jsonl")


def record(ts: TorchServe, entry: dict):
    path = history_path(ts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}) + "\n")


def rollback(ts: TorchServe, model: str) -> tuple[str, str]:
    current = default_version(ts, model)
    if current is None:
        raise DeployError(f"{model} is not registered")
    registered = {v["modelVersion"] for v in versions(ts, model)}
    entries = []
    if os.path.exists(history_path(ts)):
        with open(history_path(ts)) as f:
            entries = [json.loads(line) for line in f if line.strip()]
    for e in reversed(entries):
        if e["model"] == model and e["version"] == current and e.get("previous") in registered - {current}:
            set_default(ts, model, e["previous"], reason=f"rollback from {current}")
            return current, e["previous"]
    raise DeployError(f"no earlier default of {model} to roll back to from {current} (history: {history_path(ts)})")


# --- the gate -------------------------------------------------------------------------------


def load_golden(golden_dir: str) -> list[tuple[bytes, str]]:
    path = os.path.join(golden_dir, "golden.json")
    if not os.path.isfile(path):
        raise DeployError(f"no golden set at {path}: training writes one into <run>/golden/")
    with open(path) as f:
        entries = json.load(f)
    out = []
    for e in entries:
        with open(os.path.join(golden_dir, e["file"]), "rb") as img:
            out.append((img.read(), e["label"]))
    return out


def score(ts: TorchServe, model: str, version: str, golden) -> dict:
    preds, latencies, errors = [], [], 0
    for data, _ in golden:
        t0 = time.perf_counter()
        resp = ts.request(
            "POST",
            "inference",
            f"/predictions/{model}/{version}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        latencies.append((time.perf_counter() - t0) * 1000)
        if resp.status_code == 200:
            preds.append(next(iter(resp.json())))
        else:
            preds.append(None)
            errors += 1
    correct = sum(p == label for p, (_, label) in zip(preds, golden))
    latencies.sort()
    return {
        "version": version,
        "correct": correct,
        "accuracy": correct / len(golden),
        "errors": errors,
        "predictions": preds,
        "latency_ms_p50": statistics.median(latencies),
        "latency_ms_p90": latencies[int(0.9 * (len(latencies) - 1))],
    }


def accuracy_drop(old_correct: int, new_correct: int, images: int, max_drop: float) -> tuple[float, bool]:
    """Points of accuracy lost, and whether that is within max_drop. Counted in whole images: on 100 images,
    97 -> 96 correct is a drop of exactly 1.0 point, where 0.97 - 0.96 in floats is 1.0000000000000009."""
    drop = (old_correct - new_correct) * 100 / images
    return drop, drop <= max_drop + 1e-9


def gate(ts: TorchServe, model: str, candidate: str, baseline: str | None, golden, max_drop: float) -> dict:
    new = score(ts, model, candidate, golden)
    old = score(ts, model, baseline, golden) if baseline else None
    report = {
        "model": model,
        "images": len(golden),
        "candidate": new,
        "baseline": old,
        "max_accuracy_drop_points": max_drop,
    }
    if old:
        report["agreement"] = sum(a == b for a, b in zip(new["predictions"], old["predictions"])) / len(golden)
        drop, within = accuracy_drop(old["correct"], new["correct"], len(golden), max_drop)
        report["passed"] = within and new["errors"] == 0
        change = (
            f"drop of {drop:.2f} points ({'within' if within else 'over'} the allowed {max_drop:.2f})"
            if drop > 0
            else f"gain of {-drop:.2f} points"
        )
        report["reason"] = f"accuracy {new['accuracy']:.4f} vs default {old['accuracy']:.4f}: {change}"
        if new["errors"]:
            report["reason"] += f"; {new['errors']} golden requests failed"
    else:
        report["passed"] = new["errors"] == 0
        report["reason"] = "no default version to compare with"
    return report


def print_report(r: dict):
    new, old = r["candidate"], r["baseline"]
    print(f"\npromotion gate for {r['model']} on {r['images']} golden images")
    print(f"  {'':22s}{'candidate ' + new['version']:>18s}" + (f"{'default ' + old['version']:>18s}" if old else ""))
    rows = [
        ("accuracy", "accuracy", "{:.4f}"),
        ("failed requests", "errors", "{:d}"),
        ("latency p50 (ms)", "latency_ms_p50", "{:.1f}"),
        ("latency p90 (ms)", "latency_ms_p90", "{:.1f}"),
    ]
    for label, key, fmt in rows:
        print(f"  {label:22s}{fmt.format(new[key]):>18s}" + (f"{fmt.format(old[key]):>18s}" if old else ""))
    if old:
        print(f"  {'agreement':22s}{r['agreement'] * 100:>17.1f}%")
    print(f"  verdict: {'PASS' if r['passed'] else 'REJECT'} - {r['reason']}")


def cmd_register(ts: TorchServe, args) -> int:
    gated = args.promote or args.dry_run
    golden = load_golden(args.golden) if gated else None  # before registering: a missing set changes nothing
    model, version = register(ts, args.archive, args.workers)
    print(f"registered {model} {version} from {os.path.basename(args.archive)}")
    if not gated:
        print(
            f"not promoted: {model} {default_version(ts, model)} stays default "
            f"(/predictions/{model}/{version} serves the new one)"
        )
        return 0
    # Until the verdict is carried out, any failure (a request error, Ctrl-C...) unregisters the candidate
    # again: left registered but not default, it would make a retry fail with "already registered".
    try:
        return run_gate(ts, model, version, golden, args)
    except BaseException:
        withdraw(ts, model, version)
        raise


def run_gate(ts: TorchServe, model: str, version: str, golden, args) -> int:
    """Gate a registered candidate against the default and carry out the verdict (promote, or unregister)."""
    baseline = default_version(ts, model)
    if baseline == version:  # the first version of a model is default by itself
        print(f"{model} {version} is the only version and already default")
        return 0
    report = gate(ts, model, version, baseline, golden, args.max_accuracy_drop)
    print_report(report)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    if args.dry_run:
        unregister(ts, model, version)
        print(f"dry run: {model} {version} unregistered again; {baseline} stays default")
        return 0 if report["passed"] else EXIT_REJECTED
    if not report["passed"]:
        unregister(ts, model, version)
        print(f"rejected: {model} {version} unregistered; {baseline} stays default", flush=True)
        return EXIT_REJECTED
    set_default(ts, model, version, reason="gate passed: " + report["reason"])
    print(f"promoted: {model} {version} is now default (was {baseline})")
    return 0


def cmd_list(ts: TorchServe, args) -> int:
    listed = versions(ts, args.model)
    if not listed:
        print(f"{args.model} is not registered")
        return 1
    default = default_version(ts, args.model)
    for v in listed:
        ready = sum(w["status"] == "READY" for w in v["workers"])
        print(
            f"{args.model} {v['modelVersion']:8s} {'default' if v['modelVersion'] == default else '       '} "
            f"{v['modelUrl']:28s} {ready}/{len(v['workers'])} workers ready"
        )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="my_model")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("register", help="register an archive from model_store/ as a new version")
    r.add_argument("archive")
    r.add_argument("--promote", action="store_true", help="run the gate and set default if it passes")
    r.add_argument("--dry-run", action="store_true", help="run the gate, report, promote nothing")
    r.add_argument("--golden", default=os.path.join("runs", "v1", "golden"), help="golden set folder (from training)")
    r.add_argument("--max-accuracy-drop", type=float, default=1.0, help="points of accuracy the candidate may lose")
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--report", default=None, help="also write the gate report as JSON here")
    sub.add_parser("list", help="versions, and which is default")
    sub.add_parser("rollback", help="make the previous default the default again")
    u = sub.add_parser("unregister", help="remove a version (never the default while others exist)")
    u.add_argument("version")
    args = p.parse_args(argv)
    ts = TorchServe()
    if not ts.is_running():
        print("error: TorchServe is not running; start it with scripts/serve.sh start", file=sys.stderr)
        return 1
    try:
        if args.command == "register":
            return cmd_register(ts, args)
        if args.command == "list":
            return cmd_list(ts, args)
        if args.command == "rollback":
            old, new = rollback(ts, args.model)
            print(f"rolled back {args.model}: {new} is default again (was {old})")
            return 0
        if args.command == "unregister":
            unregister(ts, args.model, args.version)
            print(f"unregistered {args.model} {args.version}")
            return 0
    except (DeployError, ServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
