"""Versions of a model on a running TorchServe: register a checked archive, promote behind the gate,
unregister, roll back. Promotions are appended to state/deployments.jsonl, which `rollback` reads.
The command line for this is deploy/register_version.py (scripts/register_version.sh)."""

import json
import os
import sys
import time

from deploy import management
from deploy.archive import check_archive
from deploy.gate import gate, print_report
from deploy.management import DeployError
from deploy.privileges import private_files
from deploy.server import TorchServe

EXIT_REJECTED = 3


def register(ts: TorchServe, archive: str, workers: int = 1, model: str | None = None) -> tuple[str, str]:
    """Register an archive from the model store as a new version; returns (model, version) once it has a
    READY worker. `model`, when given, must be the archive's own model name."""
    try:
        manifest = check_archive(archive, ts.model_store)
    except ValueError as e:
        raise DeployError(str(e)) from None
    name, version = manifest["modelName"], manifest["modelVersion"]
    if model and model != name:
        raise DeployError(f"{os.path.basename(archive)} holds model {name!r}, not {model!r}")
    if any(v["modelVersion"] == version for v in management.versions(ts, name)):
        raise DeployError(f"{name} {version} is already registered; archive a new version instead")
    management.register(ts, os.path.basename(archive), workers)
    try:
        management.wait_ready(ts, name, version)
    except BaseException:
        withdraw(ts, name, version)
        raise
    return name, version


def withdraw(ts: TorchServe, model: str, version: str):
    """Unregister a version whose registration or gate did not finish, so that a retry can register it again."""
    try:
        if management.default_version(ts, model) == version and len(management.versions(ts, model)) > 1:
            return  # set-default went through after all: it is promoted, not half-registered
        unregister(ts, model, version)
        print(f"{model} {version} unregistered again: its registration or gate did not finish", file=sys.stderr)
    except Exception as e:
        print(
            f"warning: could not unregister {model} {version} ({e}); "
            f"remove it with scripts/register_version.sh unregister {version} --model {model}",
            file=sys.stderr,
        )


def unregister(ts: TorchServe, model: str, version: str):
    """Remove a version; never the default while other versions exist (clients of the default would break)."""
    listed = management.versions(ts, model)
    if not any(v["modelVersion"] == version for v in listed):
        raise DeployError(f"{model} {version} is not registered")
    if management.default_version(ts, model) == version and len(listed) > 1:
        raise DeployError(
            f"{model} {version} is the default version; set another default first "
            "(scripts/register_version.sh rollback, or promote another version)"
        )
    management.unregister(ts, model, version)


def set_default(ts: TorchServe, model: str, version: str, reason: str):
    previous = management.default_version(ts, model)
    management.set_default(ts, model, version)
    record(ts, {"model": model, "version": version, "previous": previous, "reason": reason})


# --- history (for rollback) -------------------------------------------------------------------


def history_path(ts: TorchServe) -> str:
    return ts.path("state", "deployments.jsonl")


def record(ts: TorchServe, entry: dict):
    path = history_path(ts)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with private_files(), open(path, "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}) + "\n")


def history(ts: TorchServe) -> list[dict]:
    if not os.path.exists(history_path(ts)):
        return []
    with open(history_path(ts)) as f:
        return [json.loads(line) for line in f if line.strip()]


def rollback(ts: TorchServe, model: str) -> tuple[str, str]:
    current = management.default_version(ts, model)
    if current is None:
        raise DeployError(f"{model} is not registered")
    registered = {v["modelVersion"] for v in management.versions(ts, model)}
    for e in reversed(history(ts)):
        if e["model"] == model and e["version"] == current and e.get("previous") in registered - {current}:
            set_default(ts, model, e["previous"], reason=f"rollback from {current}")
            return current, e["previous"]
    raise DeployError(f"no earlier default of {model} to roll back to from {current} (history: {history_path(ts)})")


# --- the gate, carried out ------------------------------------------------------------------------


def run_gate(ts: TorchServe, model: str, version: str, golden, args) -> int:
    """Gate a registered candidate against the default and carry out the verdict (promote, or unregister)."""
    baseline = management.default_version(ts, model)
    if baseline == version:  # the first version of a model is default by itself
        print(f"{model} {version} is the only version and already default")
        return 0
    report = gate(ts, model, version, baseline, golden, args.max_accuracy_drop, args.allow_new_classes)
    print_report(report)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    if report.get("classes", {}).get("same") is False and not args.allow_new_classes:
        print(
            "  to serve it beside this model, archive it under its own name (scripts/archive.sh VERSION CHECKPOINT "
            "--model-name NAME); to replace this model's classes anyway, pass --allow-new-classes"
        )
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
