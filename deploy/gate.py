"""The promotion gate: a candidate version and the current default answer the same golden set (validation
images with known labels, written by training); the candidate passes when it loses no more than
`max_drop` points of accuracy, counted in whole images, and no golden request fails."""

import json
import os
import time

from deploy.latency import percentile
from deploy.management import DeployError
from deploy.predict import post, read_bytes, top1
from deploy.server import TorchServe


def load_golden(golden_dir: str) -> list[tuple[bytes, str]]:
    path = os.path.join(golden_dir, "golden.json")
    if not os.path.isfile(path):
        raise DeployError(f"no golden set at {path}: training writes one into <run>/golden/")
    with open(path) as f:
        entries = json.load(f)
    return [(read_bytes(os.path.join(golden_dir, e["file"])), e["label"]) for e in entries]


def score(ts: TorchServe, model: str, version: str, golden) -> dict:
    preds, latencies, errors = [], [], 0
    for data, _ in golden:
        t0 = time.perf_counter()
        resp = post(ts, data, model, version)
        latencies.append((time.perf_counter() - t0) * 1000)
        preds.append(top1(resp.json()) if resp.status_code == 200 else None)
        errors += resp.status_code != 200
    correct = sum(p == label for p, (_, label) in zip(preds, golden))
    latencies.sort()
    return {
        "version": version,
        "correct": correct,
        "accuracy": correct / len(golden),
        "errors": errors,
        "predictions": preds,
        "latency_ms_p50": percentile(latencies, 0.5),
        "latency_ms_p90": percentile(latencies, 0.9),
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
