"""Explanations beside predictions: imagenet predictions' latency while 8 clients ask for explanations through
the front door, with its explanation lane off (explanations share the predictions' slots, as before issue 25)
and on (FrontDoor's defaults: one explanation inside TorchServe at once, its own queue and rate).

    python -m bench.explain_lane                  # 30 s per phase
    python -m bench.explain_lane --seconds 10 --explainers 4

One TorchServe (EfficientNet-Lite0 with its published weights, ONNX, as scripts/import_pretrained.sh builds
it) on free ports; per phase one front door before it, `--predictors` clients sending one photo each to
/predictions/imagenet in a loop and `--explainers` clients sending 4 photos each to /explanations/imagenet.
Phases: predictions alone, lane off, lane on. Writes bench_results/explain_lane.json.
"""

import argparse
import base64
import json
import os
import tempfile
import threading
import time
from collections import Counter

import requests
import yaml

from bench.targets import imagenet_target
from bundle import settings
from deploy.archive import archive_checkpoint
from deploy.client import read_bytes
from deploy.frontdoor import FrontDoor, FrontDoorError, for_server
from deploy.latency import summary
from deploy.server import Ports, TorchServe

LANE_OFF = {"explain_maxconn": FrontDoor.maxconn, "explain_queue": FrontDoor.queue, "explain_rate": 0}


def get_args_parser():
    """The command line of `python -m bench.explain_lane`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=30, help="per phase")
    p.add_argument(
        "--explainers", type=int, default=8, help="clients asking for explanations (4 photos each)"
    )
    p.add_argument("--predictors", type=int, default=2, help="clients asking for predictions (1 photo each)")
    p.add_argument("--phases", default="alone,lane off,lane on", help="which phases, in order")
    p.add_argument(
        "--batch-size", type=int, default=0, help="the archive's batchSize (0: model-config.yaml's)"
    )
    p.add_argument("--out", default=settings.BENCH_RESULTS, help="folder for explain_lane.json")
    return p


def client(url: str, door, headers: dict, body: bytes, deadline: float, out: list):
    """Send `body` to `url` in a loop until the deadline (waiting Retry-After when told); append (status,
    ms)."""
    with requests.Session() as s:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                resp = s.post(url, data=body, headers=headers, verify=door.ca, timeout=120)
                status, wait = resp.status_code, float(resp.headers.get("Retry-After", 0))
            except requests.RequestException:
                status, wait = "error", 1.0
            out.append((status, (time.perf_counter() - t0) * 1000))
            # a polite client honours Retry-After
            time.sleep(max(0.0, min(wait, deadline - time.monotonic())))


def phase(args, ts, door, photo: bytes, four: bytes, explainers: int) -> dict:
    """One phase: the prediction and explanation clients against `door` for --seconds; their status
    counts and latency summaries."""
    key = {"Authorization": f"Bearer {ts.keys()['inference']['key']}"}
    deadline = time.monotonic() + args.seconds
    predictions, explanations = [], []
    predict = (
        f"{door.url()}/predictions/imagenet",
        {**key, "Content-Type": "application/octet-stream"},
        photo,
    )
    explain = (f"{door.url()}/explanations/imagenet", {**key, "Content-Type": "application/json"}, four)
    jobs = [(*predict, predictions)] * args.predictors + [(*explain, explanations)] * explainers
    threads = [threading.Thread(target=client, args=(u, door, h, b, deadline, out)) for u, h, b, out in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [ms for status, ms in predictions if status == 200]
    return {
        "explainers": explainers,
        "predictions": dict(Counter(str(s) for s, _ in predictions)),
        "prediction_ms": {**summary(ok), "max_ms": round(max(ok), 1)} if ok else None,
        "explanations": dict(Counter(str(s) for s, _ in explanations)),
        "explanation_ms": summary([ms for s, ms in explanations if s == 200]) if explanations else None,
    }


def model_config(work: str, batch_size: int) -> str:
    """model-config.yaml, or a copy of it with another batchSize."""
    if not batch_size:
        return settings.MODEL_CONFIG
    with open(settings.MODEL_CONFIG) as f:
        config = {**yaml.safe_load(f), "batchSize": batch_size}
    path = os.path.join(work, "model-config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def start_door(ts, folder: str, lanes: dict, tries: int = 3):
    """A front door on a free loopback port (another process may take the port first: then another one)."""
    for attempt in range(tries):
        door = for_server(ts, port=Ports.free().inference, folder=folder, names=["localhost"], **lanes)
        door.bind = "127.0.0.1"
        try:
            return door.start()
        except FrontDoorError:
            if attempt == tries - 1:
                raise


def main(args):
    """Run the phases asked for, each behind its own front door; print each row and write
    explain_lane.json; returns the result."""
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        target = imagenet_target(work)
        store = os.path.join(work, "store")
        config = model_config(work, args.batch_size)
        archive_checkpoint(target["checkpoint"], "1.0", "onnx", model_name="imagenet",
                           output=f"{store}/imagenet.mar", config_file=config)  # fmt: skip
        photos = [read_bytes(p) for p in target["images"][:4]]
        four = json.dumps({"data": [base64.b64encode(p).decode() for p in photos]}).encode()
        ts = TorchServe(workdir=work, model_store=store, ports=Ports.free(), user=None)
        ts.start(models="imagenet=imagenet.mar", restore=False)
        try:
            phases = {
                "alone": ({}, 0),
                "lane off": (LANE_OFF, args.explainers),
                "lane on": ({}, args.explainers),
            }
            for name in args.phases.split(","):
                lanes, explainers = phases[name]
                door = start_door(ts, os.path.join(work, f"door-{len(rows)}"), lanes)
                try:
                    rows.append({"phase": name, **phase(args, ts, door, photos[0], four, explainers)})
                finally:
                    door.stop()
                print(json.dumps(rows[-1]), flush=True)
        finally:
            ts.stop()
    result = {
        "cores": os.cpu_count(),
        "seconds_per_phase": args.seconds,
        "batch_size": args.batch_size,
        "rows": rows,
    }
    with open(os.path.join(args.out, "explain_lane.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
