"""Restarts keep the deployment. TorchServe writes a snapshot of the registered versions (and which one is
default) after every management call, but ignores it when --ts-config is given, so the server builds the
`model_snapshot` it starts with here, from two sources:

- the journal of deployment intent (deploy/journal.py): which versions should be served and which is default;
  it wins wherever it knows a model, since TorchServe's snapshots can be empty (a full disk), truncated, or
  written by a start that lost models;
- TorchServe's snapshots, newest first: each version's workers and batching, and the models the journal never
  saw (registered before it existed, or by hand).

Every archive is checked before it is restored: a bare `.mar` name in the model store, its .sha256, a sound
zip, and a manifest naming that model and version. A version that fails is left out with a warning and never
takes the others down with it; versions whose registration or gate never finished are withdrawn."""

import glob
import json
import logging
import os

from bundle.properties import parse_properties, read_properties
from deploy import journal
from deploy.kserve import SNAPSHOT_KEYS, archive_config
from deploy.mar import NAME, check_archive

log = logging.getLogger(__name__)  # the CLIs' stderr (Python's last-resort handler)


def warn(message: str):
    """Tell the operator (stderr, from a CLI) that a snapshot or version is left out of a restore."""
    log.warning(f"warning: {message}")


def read_snapshots(log_dir: str, opener=None) -> list[dict]:
    """The model_snapshot of every readable TorchServe snapshot, newest first; unreadable or empty ones are
    skipped with a warning naming the file. `opener(path)` opens a file for reading in bytes: the server's
    TorchServe.open, which neither follows links nor waits on a FIFO that its user planted (root reads
    these)."""
    files = sorted(glob.glob(os.path.join(log_dir, "config", "*.cfg")), key=os.path.getmtime, reverse=True)
    found = []
    for path in files:
        try:
            if opener is None:
                props = read_properties(path)
            else:
                with opener(path) as f:
                    props = parse_properties(f.read().decode("latin-1").splitlines(keepends=True))
            raw = props.get("model_snapshot")
            if not raw:
                raise ValueError("it is empty or has no model_snapshot")
            snap = json.loads(raw)
            if not isinstance(snap.get("models"), dict):
                raise ValueError("its model_snapshot has no models")
        except (OSError, ValueError, UnicodeError, AttributeError) as e:
            warn(f"TorchServe snapshot {path} is unreadable ({e}); skipped")
            continue
        found.append(snap)
    return found


def refusal(model_store: str, model: str, version: str, mar) -> str | None:
    """Why an archive may not be restored as `model` `version`, or None."""
    if not isinstance(mar, str) or not mar.endswith(".mar") or not NAME.fullmatch(mar):
        return f"{mar!r} is not the file name of a .mar in the model store"  # absolute paths, folders, URLs
    path = os.path.join(model_store, mar)
    if not os.path.exists(path):
        return f"{mar} is no longer in the model store"
    try:
        manifest = check_archive(path, model_store)
    except ValueError as e:
        return str(e)
    if (manifest.get("modelName"), manifest.get("modelVersion")) != (model, version):
        return (
            f"{mar} holds {manifest.get('modelName')} {manifest.get('modelVersion')}, not {model} {version}"
        )
    return None


def entry_for(snaps: list[dict], model_store: str, model: str, version: str, mar: str) -> dict:
    """A version's model_snapshot entry: from the newest snapshot that has it with this archive, else from the
    archive's own model-config.yaml."""
    for snap in snaps:
        entry = snap["models"].get(model, {}).get(version)
        if isinstance(entry, dict) and entry.get("marName") == mar:
            return dict(entry)
    config = archive_config(os.path.join(model_store, mar))
    return {
        "marName": mar,
        **{key: config.get(name, fallback) for key, (name, fallback) in SNAPSHOT_KEYS.items()},
    }


def wanted(snaps: list[dict], entries: list[dict]) -> dict:
    """{model: {"versions": {version: archive}, "default": version, "either": [old, new] or None}}: what
    should be served. `either` names a set-default that may or may not have been applied: both outcomes are
    right."""
    state, doubts = journal.replay(entries)
    tracked = {(e["model"], e["version"]) for e in entries if e["op"] in ("register", "unregister", "gate")}
    newest = snaps[0]["models"] if snaps else {}
    want = {
        m: {"versions": dict(s["versions"]), "default": s["default"], "either": None}
        for m, s in state.items()
    }
    for model, versions in newest.items():  # what the journal never saw
        for version, entry in versions.items():
            if (model, version) in tracked or not isinstance(entry, dict):
                continue
            w = want.setdefault(model, {"versions": {}, "default": None, "either": None})
            w["versions"][version] = entry.get("marName")
            if entry.get("defaultVersion") and (w["default"] is None or model not in state):
                w["default"] = version
    for model, w in want.items():
        served_default = next((v for v, e in newest.get(model, {}).items() if e.get("defaultVersion")), None)
        pending = journal.pending_default(doubts, model)
        if pending:  # the snapshot says whether TorchServe applied it
            w["either"] = [pending["previous"], pending["version"]]
            if served_default in w["either"]:
                w["default"] = served_default
        for version in journal.in_doubt(doubts, model):
            if version != w["default"]:
                w["versions"].pop(version, None)
    return {m: w for m, w in want.items() if w["versions"]}


def restore_plan(log_dir: str, model_store: str, state_dir: str, opener=None) -> dict:
    """{"snapshot": the model_snapshot to start with (None: nothing to restore), "expected": what should be
    served (see wanted()), "withdrawn": pending journal entries whose versions are left out}."""
    snaps = read_snapshots(log_dir, opener)
    entries = journal.read(state_dir)
    expected = wanted(snaps, entries)
    models = {}
    for model, w in expected.items():
        restorable = {}
        for version, mar in w["versions"].items():
            why = refusal(model_store, model, version, mar)
            if why:
                warn(f"{model} {version}: {why}; not restoring it")
                continue
            restorable[version] = entry_for(snaps, model_store, model, version, mar)
        if not restorable:
            continue
        default = w["default"] if w["default"] in restorable else next(iter(restorable))
        for version, entry in restorable.items():
            entry["defaultVersion"] = version == default
        models[model] = restorable
    _, doubts = journal.replay(entries)
    kept = lambda d: d["version"] in expected.get(d["model"], {}).get("versions", {})  # noqa: E731
    withdrawn = [d for d in doubts if d["op"] in ("register", "gate") and not kept(d)]
    snapshot = {"name": "restore.cfg", "modelCount": len(models), "models": models} if models else None
    return {"snapshot": snapshot, "expected": expected, "withdrawn": withdrawn}
