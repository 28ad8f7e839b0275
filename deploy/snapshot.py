"""Restarts keep the deployment: TorchServe writes a snapshot of the registered versions (and which one is
default) after every management call, but ignores it when --ts-config is given, so the server copies the
newest one into the config it starts with."""

import glob
import json
import os
import sys

from deploy.properties import read_properties


def latest_snapshot(log_dir: str, model_store: str) -> dict | None:
    """The model_snapshot of the newest TorchServe snapshot, with versions whose archive is gone dropped."""
    files = sorted(glob.glob(os.path.join(log_dir, "config", "*.cfg")), key=os.path.getmtime)
    for path in reversed(files):
        raw = read_properties(path).get("model_snapshot")
        if not raw:
            continue
        snap = json.loads(raw)
        for name, versions in list(snap.get("models", {}).items()):
            for version, entry in list(versions.items()):
                if not os.path.exists(os.path.join(model_store, entry["marName"])):
                    print(
                        f"warning: {name} {version}: {entry['marName']} is no longer in the model store; "
                        "not restoring it",
                        file=sys.stderr,
                    )
                    del versions[version]
            if not versions:
                del snap["models"][name]
            elif not any(v.get("defaultVersion") for v in versions.values()):
                next(iter(versions.values()))["defaultVersion"] = True
        snap["modelCount"] = len(snap.get("models", {}))
        return snap if snap["modelCount"] else None
    return None
