"""Ship model versions through TorchServe's management API, behind a promotion gate.

    python -m deploy.register_version register model_store/my_model_v2.0.mar --golden runs/v2/golden --promote
    python -m deploy.register_version register model_store/my_model_v3.0.mar --promote  # the model's
                                                                                        # golden set
    python -m deploy.register_version register model_store/my_model_v2.0.mar --golden runs/v2/golden --dry-run
    python -m deploy.register_version register model_store/textures.mar   # another model: its own name
    python -m deploy.register_version list [--model NAME]
    python -m deploy.register_version rollback [--model NAME]
    python -m deploy.register_version unregister 2.0 [--model NAME]

register: checks the archive (SHA-256 sidecar, zip integrity, manifest), registers it as
a new version, waits for its workers, and, with --promote, sends the model's golden set
(validation images with known labels) to the new version and to the current default.
The golden set belongs to the model: the first --golden DIR given for a model is copied,
with SHA-256 checksums, to server/state/golden/<model>/, and later gates use that copy;
a --golden DIR that differs from it is refused unless --golden-from-candidate (this gate
only) or --replace-golden (it becomes the model's set) says which one is meant.
It sets the new version default only when its accuracy is no more than
--max-accuracy-drop points below the default's and it gives the default's top-1 answer
on at least --min-agreement of the images (--allow-disagreement overrides that);
otherwise the default keeps serving, the rejected version is unregistered, and the exit
code is 3. Overrides are written into the report and the journal. Golden requests
that fail for the server's sake are retried; if the default still fails one, the verdict is
inconclusive: nothing is promoted, the candidate is unregistered, and the exit code is 4. Before any
scoring, the gate compares the classes in both versions' archives (index_to_name.json):
a candidate that answers other classes is refused the same way (exit code 3), since a
model that answers other classes is a new model name, not a new version (archive it
with --model-name NAME); --allow-new-classes overrides that check.

The model name comes from the archive (its manifest) for register, and from --model
(default my_model) for list, rollback and unregister.
"""

import argparse
import json
import os
import signal
import sys
import threading

import requests

from bundle import settings
from deploy import canary, frontdoor, management, shadow
from deploy.gate import MIN_AGREEMENT
from deploy.golden import choose
from deploy.journal import JournalError
from deploy.server import ServerError, TorchServe
from deploy.versions import (
    EXIT_REJECTED,
    GatePolicy,
    archive_version,
    locked,
    register,
    rollback,
    run_gate,
    state_dir,
    unregister,
)


def cmd_register(ts: TorchServe, args) -> int:
    """`register`: register the archive and, with --promote or --dry-run, gate it against the default (with
    --canary, canary it through the front door instead) and carry out the verdict; the exit code."""
    gated = args.promote or args.dry_run
    if args.shadow and (args.canary or gated):
        print("error: --shadow goes alone (not with --canary, --promote or --dry-run)", file=sys.stderr)
        return 2
    # One lock from registering to the verdict: no other promotion, rollback or unregister interleaves.
    with locked(ts, f"register {os.path.basename(args.archive)}"):
        golden, golden_info = None, None
        if gated or args.golden:  # before registering: a missing or refused set changes nothing
            name, _ = archive_version(ts, args.archive, args.model)
            golden, golden_info = choose(
                state_dir(ts), name, args.golden, args.golden_from_candidate, args.replace_golden
            )
            if golden_info["source"] in ("fixed", "replaced"):
                print(f"the golden set of {name} is now {golden_info['dir']} (from {golden_info['from']})")
        model, version = register(ts, args.archive, args.workers, args.model)
        print(f"registered {model} {version} from {os.path.basename(args.archive)}")
        if args.canary:
            return cmd_canary(ts, model, version, args)
        if args.shadow:
            return cmd_shadow(ts, model, version, args)
        if not gated:
            default = management.default_version(ts, model)
            if default == version:  # TorchServe makes a model's first version its default
                print(f"{model} {version} is the first version of {model}, and its default")
            else:
                print(
                    f"not promoted: {model} {default} stays default "
                    f"(/predictions/{model}/{version} serves the new one)"
                )
            return 0
        # Until the verdict is carried out, any failure (a request error, Ctrl-C, SIGHUP...) unregisters the
        # candidate again: left registered but not default, it would make a retry fail with "already
        # registered".
        policy = GatePolicy(
            max_accuracy_drop=args.max_accuracy_drop,
            min_agreement=args.min_agreement,
            allow_disagreement=args.allow_disagreement,
            allow_new_classes=args.allow_new_classes,
            dry_run=args.dry_run,
        )
        outcome = run_gate(
            ts, model, version, golden, policy, golden_info, lambda report: show_report(report, args)
        )
        print(VERDICTS[outcome.verdict].format(o=outcome), flush=True)
        return outcome.exit_code


VERDICTS = {  # what register --promote says about each GateOutcome.verdict
    "default": "{o.model} {o.version} is the only version and already default",
    "promoted": "promoted: {o.model} {o.version} is now default (was {o.baseline})",
    "dry-run": "dry run: {o.model} {o.version} unregistered again; {o.baseline} stays default",
    "rejected": "rejected: {o.model} {o.version} unregistered; {o.baseline} stays default",
    "inconclusive": "inconclusive: {o.model} {o.version} unregistered; {o.baseline} stays default",
}


def show_report(report: dict, args):
    """The gate's report, before its verdict is carried out: the table, what to do about a refusal,
    --report."""
    print_report(report)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    if report.get("classes", {}).get("same") is False and not args.allow_new_classes:
        print(
            "  to serve it beside this model, archive it under its own name (scripts/archive.sh VERSION "
            "CHECKPOINT --model-name NAME); to replace this model's classes anyway, pass --allow-new-classes"
        )
    check = report.get("agreement_check") or {}
    if check.get("passed") is False and not check["overridden"]:
        print(
            "  a candidate that answers differently on many golden images may have mislabelled training data "
            "(two class folders swapped, say); to promote it anyway, pass --allow-disagreement"
        )


def print_report(r: dict):
    """Print the gate's report as a table: the golden set, both versions' accuracy, failed requests, latencies
    and agreement, then the verdict."""
    new, old = r["candidate"], r["baseline"]
    print(f"\npromotion gate for {r['model']} on {r['images']} golden images")
    print(
        f"  {'':22s}{'candidate ' + new['version']:>18s}"
        + (f"{'default ' + old['version']:>18s}" if old else "")
    )
    classes = r.get("classes", {})
    if "candidate" in classes:
        print(f"  {'classes':22s}{len(classes['candidate']):>18d}{len(classes['baseline']):>18d}")
    if r.get("golden"):
        g = r["golden"]
        where = g["dir"] if g["source"] == "candidate" else f"{g['dir']}, from {g['from']}"
        print(f"  golden set: {'the candidate' if g['source'] == 'candidate' else 'the model'}'s ({where})")
    if "accuracy" not in new:  # refused before scoring
        print(f"  verdict: REJECT - {r['reason']}")
        return
    rows = [
        ("accuracy", "accuracy", "{:.4f}"),
        ("failed requests", "errors", "{:d}"),
        ("latency p50 (ms)", "latency_ms_p50", "{:.1f}"),
        ("latency p90 (ms)", "latency_ms_p90", "{:.1f}"),
    ]
    for label, key, fmt in rows:
        print(f"  {label:22s}{fmt.format(new[key]):>18s}" + (f"{fmt.format(old[key]):>18s}" if old else ""))
    if old and r["agreement"] is not None:
        print(f"  {'agreement':22s}{r['agreement'] * 100:>17.1f}%")
    verdict = "INCONCLUSIVE" if r.get("inconclusive") else "PASS" if r["passed"] else "REJECT"
    print(f"  verdict: {verdict} - {r['reason']}")


def cmd_canary(ts: TorchServe, model: str, version: str, args) -> int:
    """Canary through the front door (deploy/canary.py); 0 when promoted, 3 when rolled back."""
    th = canary.Thresholds(min_answers=args.step_requests or canary.Thresholds.min_answers)
    steps = [int(s) for s in args.canary.split(",")]
    try:
        report = canary.run(
            ts, frontdoor.for_server(ts), model, version, steps, args.step_seconds, th, args.prometheus,
            keep=args.keep_candidate, say=print,
        )  # fmt: skip
    except canary.CanaryError as e:  # refused before any traffic moved
        unregister(ts, model, version)
        print(f"error: {e}; {model} {version} unregistered", file=sys.stderr)
        return 1
    for step in report["steps"]:
        c, d = step["candidate"], step["default"]
        print(
            f"  {step['share']:3d} %  {step['seconds']:5.1f} s  candidate {c['answers']} answers, "
            f"{c['errors']} 5xx, p99 {c['p99_ms']} ms | default {d['answers']} answers, {d['errors']} 5xx, "
            f"p99 {d['p99_ms']} ms  {step['verdict']} {'; '.join(step['why'])}"
        )
    print(report["verdict"])
    print(f"report: {' '.join(report['files'])}")
    return 0 if report["verdict"].startswith("promoted") else EXIT_REJECTED


def cmd_shadow(ts: TorchServe, model: str, version: str, args) -> int:
    """Shadow through the front door (deploy/shadow.py): the candidate stays registered, not default; 0 with
    a report, 1 when it could not start."""
    pairs = args.step_requests or None
    try:
        report = shadow.run(
            ts, frontdoor.for_server(ts), model, version, args.shadow,
            seconds=None if pairs else args.step_seconds, pairs=pairs, say=print,
        )  # fmt: skip
    except canary.CanaryError as e:
        print(f"error: {e}; {model} {version} stays registered, not default", file=sys.stderr)
        return 1
    agreement = "-" if report["agreement"] is None else f"{report['agreement'] * 100:.1f} %"
    ratio = "-" if report["answer_time_ratio"] is None else f"{report['answer_time_ratio']:.2f}"
    print(
        f"  {report['pairs']} pairs in {report['seconds']} s ({report['ended_by']}): top-1 agreement "
        f"{agreement}, candidate errors {report['candidate_errors']}, dropped copies {report['dropped']}, "
        f"answer time p50 candidate/default {ratio}"
    )
    print(f"{model} {version} stays registered, not default; users got {report['default']}'s answers")
    print(f"report: {' '.join(report['files'])}")
    return 0


def cmd_list(ts: TorchServe, model: str) -> int:
    """`list`: print each version of `model`, whether it is default, its archive and its READY workers; 1 when
    the model is not registered."""
    listed = management.versions(ts, model)
    if not listed:
        print(f"{model} is not registered")
        return 1
    default = management.default_version(ts, model)
    for v in listed:
        print(
            f"{model} {v['modelVersion']:8s} {'default' if v['modelVersion'] == default else '       '} "
            f"{v['modelUrl']:28s} {management.ready_workers(v)}/{len(v['workers'])} workers ready"
        )
    return 0


def get_args_parser():
    """The parser of `python -m deploy.register_version`: the register, list, rollback and unregister commands
    and their options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = argparse.ArgumentParser(add_help=False)  # --model is accepted after the command too
    model.add_argument(
        "--model", default=None, help=f"model name (default: the archive's own, else {settings.MODEL_NAME})"
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "register", parents=[model], help="register an archive from model_store/ as a new version"
    )
    r.add_argument("archive")
    r.add_argument("--promote", action="store_true", help="run the gate and set default if it passes")
    r.add_argument("--dry-run", action="store_true", help="run the gate, report, promote nothing")
    r.add_argument(
        "--golden",
        default=None,
        help="golden set folder (<run>/golden); the model's first one becomes its set, later ones must "
        "match it "
        "(default: the model's set)",
    )
    r.add_argument(
        "--golden-from-candidate",
        action="store_true",
        help="gate on --golden DIR this once although it differs from the model's set (the report "
        "records it)",
    )
    r.add_argument(
        "--replace-golden",
        action="store_true",
        help="make --golden DIR the model's set (the report records it)",
    )
    r.add_argument(
        "--max-accuracy-drop", type=float, default=1.0, help="points of accuracy the candidate may lose"
    )
    r.add_argument(
        "--min-agreement",
        type=float,
        default=MIN_AGREEMENT,
        help="share of golden images on which the candidate must give the default's top-1 answer",
    )
    r.add_argument(
        "--allow-disagreement",
        action="store_true",
        help="promote below --min-agreement (the report records it)",
    )
    r.add_argument(
        "--allow-new-classes",
        action="store_true",
        help="gate a candidate whose classes differ from the default's (refused otherwise: use a new "
        "model name)",
    )
    r.add_argument(
        "--workers",
        type=int,
        default=1,
        help="workers for an archive whose model-config.yaml sets no minWorkers/maxWorkers (when it does, as "
        "archive.sh's do, those win; scale a registered version with PUT /models/NAME/VERSION?min_worker=N)",
    )
    r.add_argument("--report", default=None, help="also write the gate report as JSON here")
    c = r.add_argument_group("canary through the front door (docs/deployment.md#canary)")
    c.add_argument(
        "--canary", default=None, metavar="STEPS", help="shares in percent, e.g. 5,25,50,100; then default"
    )
    c.add_argument(
        "--shadow",
        type=int,
        default=None,
        metavar="PERCENT",
        help="mirror PERCENT of the model's live predictions to it (users get the default's answers), for "
        "--step-seconds or --step-requests pairs; report its agreement; never promotes (docs/deployment.md)",
    )
    c.add_argument(
        "--step-seconds", type=float, default=60.0, help="least time per step, or a shadow's (default 60)"
    )
    c.add_argument(
        "--step-requests",
        type=int,
        default=0,
        help="least candidate answers per step (default: analysis.Thresholds), or a shadow's pairs",
    )
    c.add_argument(
        "--prometheus", default=None, help="Prometheus URL scraping the door's metrics_port (errors)"
    )
    c.add_argument(
        "--keep-candidate", action="store_true", help="after a rollback, keep the candidate registered"
    )
    sub.add_parser("list", parents=[model], help="versions, and which is default")
    sub.add_parser("rollback", parents=[model], help="make the previous default the default again")
    u = sub.add_parser(
        "unregister", parents=[model], help="remove a version (never the default while others exist)"
    )
    u.add_argument("version")
    return p


def interrupted(signum, frame):
    """SIGHUP (a dropped SSH session) and SIGTERM unwind like Ctrl-C, so a gate withdraws its candidate."""
    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # a second one must not cut the cleanup short
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    """Run the command `argv` names against the running TorchServe (SIGHUP and SIGTERM unwind like Ctrl-C);
    the exit code: 1 with the error printed, 3 or 4 for a rejected or inconclusive gate."""
    args = get_args_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGHUP, signal.SIGTERM):
            signal.signal(sig, interrupted)
    ts = TorchServe()
    if not ts.is_running():
        print("error: TorchServe is not running; start it with scripts/serve.sh start", file=sys.stderr)
        return 1
    model = args.model or settings.MODEL_NAME
    try:
        if args.command == "register":
            return cmd_register(ts, args)
        if args.command == "list":
            return cmd_list(ts, model)
        if args.command == "rollback":
            old, new = rollback(ts, model)
            print(f"rolled back {model}: {new} is default again (was {old})")
        elif args.command == "unregister":
            unregister(ts, model, args.version)
            print(f"unregistered {model} {args.version}")
    except (ServerError, JournalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except requests.RequestException as e:  # the guard or TorchServe went away mid-call
        print(
            f"error: lost the management API ({e.__class__.__name__}); is TorchServe running? "
            "(scripts/serve.sh status); `list` shows what was applied",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
