"""Versions of a model on a running TorchServe: register a checked archive, promote behind the gate,
unregister, roll back. Each change is written to the journal of deployment intent (deploy/journal.py) before
it is applied and after, under the deployment lock; `rollback` and restarts read that journal.
The command line for this is deploy/register_version.py (scripts/register_version.sh)."""

import json
import logging
import os
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import requests

from deploy import journal, management
from deploy.gate import MIN_AGREEMENT, gate
from deploy.management import DeployError
from deploy.server import TorchServe

log = logging.getLogger(__name__)  # the CLIs' stderr (Python's last-resort handler)

EXIT_REJECTED = 3
EXIT_INCONCLUSIVE = 4  # the default itself failed golden requests: no verdict, nothing promoted


def state_dir(ts: TorchServe) -> str:
    """The server's state/ folder: the deployment journal, its lock and the models' golden sets."""
    return ts.path("state")


def locked(ts: TorchServe, what: str):
    """The deployment lock (re-entrant within a thread): every change below holds it."""
    return journal.locked(state_dir(ts), what)


def archive_version(ts: TorchServe, archive: str, model: str | None = None) -> tuple[str, str]:
    """(model, version) of an archive in the model store, from its manifest. `model`, when given, must be its
    own name. The archive is neither hashed nor zip-tested here: the guard does both when it is registered
    (the security boundary, and one hash per registration); this only says early what is plainly wrong."""
    path, store = os.path.abspath(archive), os.path.abspath(ts.model_store)
    if os.path.dirname(path) != store:
        raise DeployError(
            f"{archive} is not in the model store {store}: only archives there can be registered "
            "(allowed_urls blocks everything else). Build it with scripts/archive.sh"
        )
    if not os.path.isfile(path):
        raise DeployError(f"{archive} does not exist")
    try:
        with zipfile.ZipFile(path) as z:
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
        name, version = manifest["modelName"], manifest["modelVersion"]
    except (OSError, zipfile.BadZipFile, zlib.error, KeyError, TypeError, ValueError) as e:
        raise DeployError(
            f"{os.path.basename(path)} is not a valid .mar (truncated or corrupt zip: {e})"
        ) from None
    if model and model != name:
        raise DeployError(f"{os.path.basename(archive)} holds model {name!r}, not {model!r}")
    return name, version


def register(ts: TorchServe, archive: str, workers: int = 1, model: str | None = None) -> tuple[str, str]:
    """Register an archive from the model store as a new version; returns (model, version) once it has a
    READY worker. `model`, when given, must be the archive's own model name."""
    name, version = archive_version(ts, archive, model)
    with locked(ts, f"register {name} {version}"):
        if any(v["modelVersion"] == version for v in management.versions(ts, name)):
            if not stray(ts, name, version):
                raise DeployError(f"{name} {version} is already registered; archive a new version instead")
            withdraw(ts, name, version)  # left over by a registration that never finished: retry it
        entry = journal.begin(
            state_dir(ts), "register", model=name, version=version, archive=os.path.basename(archive)
        )
        try:
            management.register(ts, os.path.basename(archive), workers)
            management.wait_ready(ts, name, version)
        except BaseException:
            withdraw(ts, name, version, entry)
            raise
        journal.finish(state_dir(ts), entry, default=management.default_version(ts, name))
    return name, version


def stray(ts: TorchServe, model: str, version: str) -> bool:
    """A registered version, not default, whose last register or gate in the journal never finished: what a
    killed or cut-off registration leaves behind."""
    entries = [
        e for e in journal.read(state_dir(ts)) if (e.get("model"), e.get("version")) == (model, version)
    ]
    ours = [e for e in entries if e["op"] in ("register", "gate")]
    if not ours or ours[-1]["state"] == "done" and ours[-1]["op"] == "register":
        return False
    return management.default_version(ts, model) != version


def withdraw(ts: TorchServe, model: str, version: str, entry: dict | None = None, why="it did not finish"):
    """Unregister a version whose registration or gate did not finish, so that a retry can register it again.
    `entry`, the journal's pending entry of that registration or gate, is marked failed once it is gone."""
    try:
        if management.default_version(ts, model) == version and len(management.versions(ts, model)) > 1:
            return  # set-default went through after all: it is promoted, not half-registered
        if any(v["modelVersion"] == version for v in management.versions(ts, model)):
            unregister(ts, model, version)
            if why:
                log.warning(f"{model} {version} unregistered again: {why}")
        if entry:
            journal.finish(state_dir(ts), entry, "failed")
    except Exception as e:  # the journal keeps it pending: the next start withdraws it
        log.warning(
            f"warning: could not unregister {model} {version} ({e}); the next start withdraws it, or remove "
            f"it with scripts/register_version.sh unregister {version} --model {model}"
        )


def unregister(ts: TorchServe, model: str, version: str):
    """Remove a version; never the default while other versions exist (clients of the default would break)."""
    with locked(ts, f"unregister {model} {version}"):
        listed = management.versions(ts, model)
        if not any(v["modelVersion"] == version for v in listed):
            raise DeployError(f"{model} {version} is not registered")
        if management.default_version(ts, model) == version and len(listed) > 1:
            raise DeployError(
                f"{model} {version} is the default version; set another default first "
                "(scripts/register_version.sh rollback, or promote another version)"
            )
        entry = journal.begin(state_dir(ts), "unregister", model=model, version=version)
        apply(
            ts,
            entry,
            lambda: management.unregister(ts, model, version),
            lambda: all(v["modelVersion"] != version for v in management.versions(ts, model)),
        )


def set_default(
    ts: TorchServe, model: str, version: str, reason: str, expected: str | None = None
) -> str | None:
    """Make `version` the default; returns the previous default. With `expected`, a compare-and-set: refused
    when the default is no longer the one the caller decided against (another operator changed it)."""
    with locked(ts, f"set-default {model} {version}"):
        previous = management.default_version(ts, model)
        if expected is not None and previous != expected:
            raise DeployError(
                f"the default of {model} changed from {expected} to {previous} while {version} was being "
                "gated; not promoting it (gate it again against the new default)"
            )
        entry = journal.begin(
            state_dir(ts), "default", model=model, version=version, previous=previous, reason=reason
        )
        apply(
            ts,
            entry,
            lambda: management.set_default(ts, model, version),
            lambda: management.default_version(ts, model) == version,
        )
    return previous


def apply(ts: TorchServe, entry: dict, change, applied):
    """Carry out a journaled change. When its answer is lost (the connection dropped after TorchServe acted),
    ask the server what happened and record and report that, rather than guessing."""
    try:
        change()
    except (DeployError, requests.RequestException, OSError) as e:
        try:
            done = applied()
        except (DeployError, requests.RequestException, OSError):
            raise DeployError(
                f"{entry['op']} {entry['model']} {entry['version']}: {e}; whether it was applied is unknown "
                "(the journal keeps it pending; check with scripts/register_version.sh list)"
            ) from None
        if not done:
            journal.finish(state_dir(ts), entry, "failed")
            raise
        log.warning(
            f"{entry['op']} {entry['model']} {entry['version']}: the answer was lost ({e}), but it "
            "was applied"
        )
    journal.finish(state_dir(ts), entry)


# --- history (for rollback) -------------------------------------------------------------------


def history_path(ts: TorchServe) -> str:
    """The deployment journal's file, for messages."""
    return os.path.join(state_dir(ts), journal.JOURNAL)


def history(ts: TorchServe) -> list[dict]:
    """The defaults set, oldest first (done ones; a pending one may or may not have been applied)."""
    return [e for e in journal.read(state_dir(ts)) if e["op"] == "default" and e["state"] == "done"]


def rollback(ts: TorchServe, model: str) -> tuple[str, str]:
    """Make the default before the current one the default again. Reads the journal, where a set-default that
    was applied but never marked done still counts: it names the current default."""
    with locked(ts, f"rollback {model}"):
        current = management.default_version(ts, model)
        if current is None:
            raise DeployError(f"{model} is not registered")
        registered = {v["modelVersion"] for v in management.versions(ts, model)}
        entries = journal.read(state_dir(ts))
        gated = journal.in_doubt(journal.replay(entries)[1], model)  # never a version whose gate never ended
        for e in reversed(entries):
            if (
                e["op"] != "default"
                or e["model"] != model
                or e["state"] == "failed"
                or e["version"] != current
            ):
                continue
            if e.get("previous") in registered - {current} - set(gated):
                set_default(ts, model, e["previous"], reason=f"rollback from {current}", expected=current)
                return current, e["previous"]
        raise DeployError(
            f"no earlier default of {model} to roll back to from {current} (history: {history_path(ts)})"
        )


def check_restore(ts: TorchServe, plan: dict | None, baseline: bool = False) -> list[str]:
    """After a start: what the journal says should be served and is not (versions, defaults), as messages.
    Versions whose registration or gate never finished were left out: the journal says so now. With
    `baseline` (a fresh start, an accepted loss), or when the journal is empty, what is served becomes the
    journal's new state."""
    served: dict[str, dict] = {
        name: {"versions": {v["modelVersion"]: os.path.basename(v["modelUrl"]) for v in entries}}
        for name, entries in management.models(ts).items()
    }
    for name, s in served.items():
        s["default"] = management.default_version(ts, name)
    missing = []
    for model, want in (plan or {}).get("expected", {}).items():
        have: dict = served.get(model, {"versions": {}, "default": None})
        lost = sorted(set(want["versions"]) - set(have["versions"]))
        if lost:
            missing.append(f"{model} {', '.join(lost)} not served")
        if (
            want["default"]
            and have["default"] != want["default"]
            and have["default"] not in (want["either"] or [])
        ):
            missing.append(f"{model}: default is {have['default']}, not {want['default']}")
    for entry in (plan or {}).get("withdrawn", []):
        if entry["version"] not in served.get(entry["model"], {}).get("versions", {}):
            journal.finish(state_dir(ts), entry, "failed", note="withdrawn at start: it never finished")
            log.warning(f"{entry['model']} {entry['version']} withdrawn: its {entry['op']} never finished")
    if baseline or not journal.read(state_dir(ts), warn=False):
        try:
            journal.baseline(state_dir(ts), served, "accepted at start" if missing else "start")
        except journal.JournalError as e:
            log.warning(f"warning: {e}")
    return missing


# --- the gate, carried out ------------------------------------------------------------------------


@dataclass
class GatePolicy:
    """What the gate lets through (register_version.py's options)."""

    max_accuracy_drop: float = 1.0  # points
    min_agreement: float = MIN_AGREEMENT
    allow_disagreement: bool = False
    allow_new_classes: bool = False
    dry_run: bool = False  # gate and report, promote nothing


@dataclass
class GateOutcome:
    """What run_gate did: `verdict` is "default" (the model's only version: nothing to gate), "promoted",
    "dry-run", "rejected" or "inconclusive"; `report` is the gate's (None for "default")."""

    verdict: str
    model: str
    version: str
    baseline: str | None
    report: dict | None = None

    @property
    def exit_code(self) -> int:
        """The register command's exit code: 0 when promoted, already default or a passing dry run;
        EXIT_REJECTED or EXIT_INCONCLUSIVE otherwise."""
        if self.verdict == "dry-run":
            return 0 if self.report and self.report["passed"] else EXIT_REJECTED
        return {"rejected": EXIT_REJECTED, "inconclusive": EXIT_INCONCLUSIVE}.get(self.verdict, 0)


def run_gate(
    ts: TorchServe,
    model: str,
    version: str,
    golden,
    policy: GatePolicy,
    golden_info: dict | None = None,
    on_report: Callable[[dict], None] | None = None,
) -> GateOutcome:
    """Gate a registered candidate against the default and carry out the verdict (promote, or unregister).
    `on_report` sees the gate's report before the verdict is carried out. Any failure before the verdict is
    carried out (a request error, Ctrl-C, SIGHUP, SIGTERM) withdraws the candidate; a process killed outright
    leaves the gate pending in the journal and the next start withdraws it."""
    with locked(ts, f"gate {model} {version}"):
        baseline = management.default_version(ts, model)
        if baseline == version:  # the first version of a model is default by itself
            return GateOutcome("default", model, version, baseline)
        entry = journal.begin(state_dir(ts), "gate", model=model, version=version, baseline=baseline)
        try:
            outcome = GateOutcome("", model, version, baseline)
            outcome.report = gate(
                ts,
                model,
                version,
                baseline,
                golden,
                policy.max_accuracy_drop,
                policy.allow_new_classes,
                policy.min_agreement,
                policy.allow_disagreement,
                golden_info,
            )
            if on_report:
                on_report(outcome.report)
            outcome.verdict = carry_out(ts, outcome, policy.dry_run, entry)
            return outcome
        except BaseException:
            withdraw(ts, model, version, entry)
            raise


def carry_out(ts: TorchServe, outcome: GateOutcome, dry_run: bool, entry: dict) -> str:
    """Promote the candidate the gate passed, or unregister it; returns the verdict."""
    report, model, version = outcome.report or {}, outcome.model, outcome.version
    if dry_run or not report["passed"]:
        withdraw(ts, model, version, entry, why=None)
        if dry_run:
            return "dry-run"
        return "inconclusive" if report.get("inconclusive") else "rejected"
    # compare-and-set: promote only over the default the candidate was compared with
    set_default(ts, model, version, reason="gate passed: " + report["reason"], expected=outcome.baseline)
    journal.finish(state_dir(ts), entry)
    return "promoted"
