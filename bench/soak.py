"""Reliability under load and faults, against a real TorchServe on free loopback ports.

    python -m bench.soak                     # all scenarios, full size; writes soak_results/soak.json
    python -m bench.soak --scenarios load --requests 2000

Scenarios (each bounded in requests and time):
  load          N requests at concurrency C mixing good digits with 6 kinds of bad body:
                no 5xx, every good answer right, every bad one a 4xx with a message, and the
                server's resident memory (frontend + workers) after the run vs after warm-up;
  worker_death  SIGKILL the serving worker mid-load: failed requests, time until TorchServe's
                replacement worker answers, and a clean run afterwards;
  restart       stop + start with two versions registered and 2.0 default: the same after;
  bad_register  a corrupt archive and a disallowed URL registered during load: refused, and
                the serving version answers every request meanwhile;
  kserve        the same images as KServe v2 JSON, v2 binary (tritonclient's default form) and KServe v1
                bodies, with bad bodies of each form: no 5xx, every answer right, every bad one a 4xx.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time

import psutil

from bench.bodies import bad_bodies, kserve_bad_bodies, kserve_bodies
from bench.loadgen import LoadgenError, spawn
from bench.loadgen import run as run_load
from bundle import settings
from deploy import management, versions
from deploy.archive import archive_checkpoint
from deploy.client import post, read_bytes
from deploy.server import Ports, TorchServe

MODEL = settings.MODEL_NAME


class Soak:
    """The soak scenarios against one private TorchServe, the checkpoint archived as versions 1.0 (eager)
    and 2.0 (onnx); the good bodies' expected labels are computed offline."""

    def __init__(self, checkpoint: str, work: str, data: str = settings.DIGITS_DIR):
        self.work = work
        store = os.path.join(work, "store")
        os.makedirs(store)
        archive_checkpoint(checkpoint, "1.0", "eager", output=os.path.join(store, f"{MODEL}.mar"))
        archive_checkpoint(checkpoint, "2.0", "onnx", output=os.path.join(store, f"{MODEL}_v2.0.mar"))
        # The operator's own temporary server in a private temp dir: run as the caller (no service user).
        workdir = os.path.join(work, "ts")
        self.ts = TorchServe(workdir=workdir, model_store=store, ports=Ports.free(), user=None)
        self.base_url = None  # where load goes: TorchServe itself, or its front door (https://...)
        val = os.path.join(data, "val")
        good = [
            (os.path.join(val, c, f), c)
            for c in sorted(os.listdir(val))
            for f in sorted(os.listdir(os.path.join(val, c)))[:6]
        ]
        self.good = [(read_bytes(p), label) for p, label in good]
        self.bad = bad_bodies()
        self.expected_labels = self.offline_labels(checkpoint)

    def offline_labels(self, checkpoint):
        """The labels the eager model gives the good bodies, in process: what the server must answer."""
        import torch

        from model_src.manifest import Manifest
        from model_src.net import load_model
        from model_src.preprocessing import Preprocessing

        model, ckpt = load_model(checkpoint)
        known = Manifest.from_checkpoint(ckpt)
        prep = Preprocessing.from_dict(known.preprocessing)
        with torch.inference_mode():
            batch = torch.stack([prep(prep.decode(b)) for b, _ in self.good])
            return [known.class_names[i] for i in model(batch).argmax(1).tolist()]

    def mix(self, bad_every: int = 4):
        """Bodies and expectations: one bad body after every `bad_every` good ones."""
        bodies, expect, b = [], [], 0
        for i, (body, _) in enumerate(self.good):
            bodies.append(body)
            expect.append(self.expected_labels[i])
            if i % bad_every == bad_every - 1:
                bodies.append(self.bad[b % len(self.bad)])
                expect.append(None)
                b += 1
        return bodies, expect

    def headers(self):
        """Request headers for a raw image body with the inference token."""
        return {"Content-Type": "application/octet-stream", **self.ts.auth("inference")}

    def url(self, version=None):
        """The model's predictions URL (of `version` if given), through the front door when one is set."""
        return f"{self.base_url or self.ts.url()}/predictions/{MODEL}" + (f"/{version}" if version else "")

    def rss_mb(self) -> float:
        """Resident memory of TorchServe and all its child processes, in MiB."""
        proc = psutil.Process(self.ts.pid())
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20

    def ready_pids(self, version: str = "1.0") -> list[int]:
        """The pids of the model version's READY workers."""
        return management.ready_pids(self.ts, MODEL, version)

    def start(self):
        """Start TorchServe serving version 1.0 alone, from no saved snapshot."""
        self.ts.start(models=f"{MODEL}={MODEL}.mar", restore=False)

    # --- scenarios ----------------------------------------------------------------------------

    def load(self, requests: int = 10000, concurrency: int = 32, warmup: int = 1000) -> dict:
        """The load scenario: a warm-up, then `requests` of the good and bad mix; passes with no error,
        no wrong label and resident memory grown at most 20 % since the warm-up."""
        bodies, expect = self.mix()
        run_load(self.url(), bodies, concurrency, warmup, self.headers(), expect)
        rss_warm = self.rss_mb()
        stats = run_load(self.url(), bodies, concurrency, requests, self.headers(), expect)
        rss_end = self.rss_mb()
        bad_share = sum(e is None for e in expect) / len(expect)
        return {
            **stats,
            "bad_body_share": round(bad_share, 3),
            "bad_kinds": len(self.bad),
            "rss_mb_after_warmup": round(rss_warm, 1),
            "rss_mb_end": round(rss_end, 1),
            "rss_growth": round(rss_end / rss_warm - 1, 4),
            "passed": stats["errors"] == 0
            and stats["wrong_labels"] == 0
            and rss_end <= 1.2 * rss_warm
            and stats["requests"] == requests,
        }

    def worker_death(self, requests: int = 3000, concurrency: int = 8) -> dict:
        """The worker-death scenario: SIGKILL a READY worker mid-load, time its replacement until it answers,
        then a clean run; passes when it recovers and the run after has no error."""
        bodies = [b for b, _ in self.good]
        expect = list(self.expected_labels)
        paths = []
        for i, body in enumerate(bodies):
            paths.append(os.path.join(self.work, f"good_{i}.png"))
            with open(paths[-1], "wb") as f:
                f.write(body)
        proc = spawn(self.url(), self.ts.key_file, concurrency, requests, paths, expect)
        time.sleep(2.0)  # mid-load
        before = self.ready_pids()
        if not before:  # nothing to kill: say so rather than fail with an IndexError
            proc.kill()
            proc.communicate()
            return {"passed": False, "error": "no READY worker to kill", "workers_before": before}
        victim = before[0]
        killed_at = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        recovered = None
        # Recovered = TorchServe's replacement worker is READY (as many workers as before, victim gone)
        # and a request succeeds. Other workers keep serving meanwhile.
        while time.perf_counter() - killed_at < 120:
            pids = self.ready_pids()
            resp = post(self.ts, bodies[0])
            if victim not in pids and len(pids) >= len(before) and resp.status_code == 200:
                recovered = time.perf_counter() - killed_at
                break
            time.sleep(0.05)
        during = json.loads(proc.communicate(timeout=600)[0])
        after = run_load(self.url(), bodies, concurrency, 500, self.headers(), expect)
        return {
            "killed_pid": victim,
            "workers_before": before,
            "workers_after": self.ready_pids(),
            "recovery_s": recovered,
            "during": during,
            "failed_during": during["errors"],
            "after": after,
            "passed": recovered is not None and after["errors"] == 0 and after["wrong_labels"] == 0,
        }

    def kserve(self, requests: int = 2000, concurrency: int = 16, url: str | None = None) -> dict:
        """The KServe scenario: the good images in the three KServe forms, a bad body of each form after
        every 4 good ones, to `url` (else where the load goes); passes with no error and no wrong answer."""
        bodies, expect, bad = [], [], kserve_bad_bodies(MODEL)
        for i, (image, _) in enumerate(self.good):
            for req in kserve_bodies(image, MODEL):
                bodies.append(req)
                expect.append(self.expected_labels[i])
                if len(bodies) % 5 == 4:
                    bodies.append(bad[len(bodies) // 5 % len(bad)])
                    expect.append(None)
        headers = self.ts.auth("inference")
        stats = run_load(
            url or self.base_url or self.ts.url(), bodies, concurrency, requests, headers, expect
        )
        return {
            **stats,
            "bad_body_share": round(sum(e is None for e in expect) / len(expect), 3),
            "passed": stats["errors"] == 0 and stats["wrong_labels"] == 0 and stats["requests"] == requests,
        }

    def deployment(self) -> dict:
        """The model's registered versions and its default version."""
        listed = management.versions(self.ts, MODEL)
        return {
            "versions": sorted(v["modelVersion"] for v in listed),
            "default": management.default_version(self.ts, MODEL),
        }

    def restart(self) -> dict:
        """The restart scenario: with 2.0 registered and default, stop and start TorchServe; passes when the
        versions and default come back the same and every version answers 200."""
        if "2.0" not in self.deployment()["versions"]:
            versions.register(self.ts, os.path.join(self.ts.model_store, f"{MODEL}_v2.0.mar"))
        versions.set_default(self.ts, MODEL, "2.0", reason="soak restart scenario")
        before = self.deployment()
        t0 = time.perf_counter()
        self.ts.stop()
        info = self.ts.start(models=None)
        seconds = time.perf_counter() - t0
        after = self.deployment()
        answers = [post(self.ts, self.good[0][0], MODEL, v).status_code for v in after["versions"]]
        return {
            "before": before,
            "after": after,
            "restored": info["restored"],
            "restart_s": round(seconds, 1),
            "answers": answers,
            "passed": before == after and all(a == 200 for a in answers),
        }

    def bad_register(self, requests: int = 2000, concurrency: int = 16) -> dict:
        """The bad-registration scenario: register a corrupt archive and two disallowed URLs during load;
        passes when each is refused, the deployment is unchanged and the load has no error."""
        import threading

        store = self.ts.model_store
        data = read_bytes(os.path.join(store, f"{MODEL}.mar"))
        with open(os.path.join(store, "corrupt.mar"), "wb") as f:
            f.write(data[: len(data) // 2])
        bodies, expect = self.mix()
        before = self.deployment()
        result = {}
        load = threading.Thread(
            target=lambda: result.update(
                run_load(self.url(), bodies, concurrency, requests, self.headers(), expect)
            )
        )
        load.start()
        time.sleep(1.0)
        attempts = {
            url: self.ts.request("POST", "management", f"/models?url={url}&synchronous=true").status_code
            for url in ("corrupt.mar", "http://127.0.0.1:9/evil.mar", "file:///etc/passwd")
        }
        load.join(600)
        after = self.deployment()
        models = sorted(management.model_names(self.ts))
        return {
            "registration_status": attempts,
            "load": result,
            "deployment_before": before,
            "deployment": after,
            "models": models,
            "passed": all(400 <= s < 600 for s in attempts.values())
            and after == before
            and models == [MODEL]
            and result.get("errors") == 0
            and result.get("wrong_labels") == 0,
        }


def summarize(name: str, r: dict) -> str:
    """One scenario's result in one line, ending in PASS or FAIL."""
    verdict = "PASS" if r["passed"] else "FAIL"
    if name == "load":
        return (
            f"load: {r['requests']} requests at c={r['concurrency']} "
            f"({r['bad_body_share'] * 100:.0f}% bad bodies of "
            f"{r['bad_kinds']} kinds) in {r['seconds']:.0f}s = {r['throughput_rps']:.0f} req/s; statuses "
            f"{r['statuses']}; 5xx/errors {r['errors']}; wrong answers {r['wrong_labels']}; RSS "
            f"{r['rss_mb_after_warmup']:.0f} -> {r['rss_mb_end']:.0f} MB "
            f"({r['rss_growth'] * 100:+.1f}%) {verdict}"
        )
    if name == "worker_death":
        return (
            f"worker death: SIGKILL pid {r['killed_pid']} of {r['workers_before']} mid-load; workers "
            f"{r['workers_after']} ready and answering after {r['recovery_s']:.2f}s; {r['failed_during']} "
            f"of {r['during']['requests']} requests failed during; {r['after']['errors']} errors in "
            f"{r['after']['requests']} after {verdict}"
        )
    if name == "restart":
        return (
            f"restart: {r['before']} -> {r['after']} in {r['restart_s']}s (restored={r['restored']}), "
            f"answers {r['answers']} {verdict}"
        )
    if name == "kserve":
        return (
            f"kserve: {r['requests']} requests at c={r['concurrency']} (v2 JSON, v2 binary, v1; "
            f"{r['bad_body_share'] * 100:.0f}% bad bodies) in {r['seconds']:.0f}s = "
            f"{r['throughput_rps']:.0f} req/s; statuses {r['statuses']}; 5xx/errors {r['errors']}; "
            f"wrong answers {r['wrong_labels']} "
            f"{verdict}"
        )
    return (
        f"bad registration during load: {r['registration_status']}; load "
        f"{r['load'].get('requests')} requests, "
        f"errors {r['load'].get('errors')}, wrong {r['load'].get('wrong_labels')}; "
        f"deployment {r['deployment']} {verdict}"
    )


SCENARIOS = {
    "load": Soak.load,
    "worker_death": Soak.worker_death,
    "restart": Soak.restart,
    "bad_register": Soak.bad_register,
    "kserve": Soak.kserve,
}


def through_front_door(soak: Soak, folder: str):
    """Start a front door (deploy/frontdoor.py) before the soak's TorchServe and send the load through it;
    requests trusts its CA through REQUESTS_CA_BUNDLE (the load generator's sessions read it too)."""
    from deploy.frontdoor import for_server

    door = for_server(soak.ts, port=Ports.free().inference, folder=folder, names=["localhost"]).start()
    soak.base_url = door.url()
    os.environ["REQUESTS_CA_BUNDLE"] = door.ca
    return door


def main(argv=None) -> int:
    """Run the chosen scenarios, print each summary and write soak.json; 0 if all passed, else 1."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        default=os.path.join(settings.RUNS_DIR, "v1", "checkpoint_best.pt"),
        help="model to serve (quickstart's 1.0)",
    )
    p.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of: {', '.join(SCENARIOS)}"
    )
    p.add_argument("--requests", type=int, default=10000, help="load scenario size")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--out", default=settings.SOAK_RESULTS)
    p.add_argument("--front-door", action="store_true", help="send the load through an HTTPS front door")
    args = p.parse_args(argv)
    names = args.scenarios.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    if not os.path.exists(args.checkpoint):
        raise SystemExit(
            f"{args.checkpoint} not found: run scripts/quickstart.sh first, or pass --checkpoint"
        )
    from train.data import write_digits

    write_digits()
    results = {}
    with tempfile.TemporaryDirectory(prefix="soak-") as work:
        soak, door = Soak(args.checkpoint, work), None
        try:  # start() inside: the workdir is deleted below, so the server must never outlive this block
            soak.start()
            if args.front_door:
                door = through_front_door(soak, os.path.join(work, "door"))
            for name in names:
                kwargs = (
                    {"requests": args.requests, "concurrency": args.concurrency} if name == "load" else {}
                )
                try:
                    results[name] = SCENARIOS[name](soak, **kwargs)
                except LoadgenError as e:
                    raise SystemExit(str(e)) from None
                print(summarize(name, results[name]), flush=True)
        finally:
            if door:
                door.stop()
            soak.ts.stop()
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump({"cores": os.cpu_count(), "results": results}, f, indent=1)
    print(f"wrote {args.out}/soak.json")
    return 0 if all(r["passed"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
