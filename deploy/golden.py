"""The golden set of a model: validation images with known labels (training writes one into <run>/golden/)
that every promotion gate of the model replays. It belongs to the model, not to a candidate: scored on its own
run's set, a candidate trained with the folders of 3 and 8 swapped is judged by its own labels and "gains"
20 points over a correct default (issue 28).

So the first time a model is gated or registered with `--golden DIR`, DIR is copied into root's state folder
(state/golden/<model>/) with a SHA-256 manifest. Later gates use that copy, checked against its manifest, and
refuse a `--golden DIR` whose files differ from it unless the operator says which they mean:
`--golden-from-candidate` (DIR for this gate only; the report records it) or `--replace-golden` (DIR becomes
the model's set; the old copy is kept beside it, renamed)."""

import hashlib
import json
import os
import shutil
import stat
import time

from deploy.management import DeployError
from deploy.mar import NAME
from deploy.privileges import private_files, write_new

INDEX = "golden.json"  # [{"file": name, "label": label}], as training writes it
MANIFEST = "manifest.json"  # in the model's copy only: where it came from, and each file's SHA-256


def model_dir(state_dir: str, model: str) -> str:
    """The folder of `model`'s golden set in `state_dir`; DeployError for a model name that is not a plain
    file name."""
    if not NAME.fullmatch(model):
        raise DeployError(f"model name {model!r}: use letters, digits, '.', '_' or '-'")
    return os.path.join(state_dir, "golden", model)


def read_file(folder: str, name: str) -> bytes:
    """A file that golden.json names: a plain name inside the folder, a regular file, no link followed."""
    if not NAME.fullmatch(name) or name == MANIFEST:
        raise DeployError(f"golden set {folder}: {name!r} is not a plain file name")
    try:
        # O_NONBLOCK: a FIFO planted under that name must not hang the gate before the type check below
        fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise DeployError(f"golden set {folder}: cannot read {name}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise DeployError(f"golden set {folder}: {name} is not a regular file")
        return f.read()


def read_set(folder: str) -> tuple[list[dict], dict[str, bytes]]:
    """(entries of golden.json, {file name: bytes}, golden.json included)."""
    if not os.path.isfile(os.path.join(folder, INDEX)):
        raise DeployError(
            f"no golden set at {os.path.join(folder, INDEX)}: training writes one into <run>/golden/"
        )
    index = read_file(folder, INDEX)
    try:
        entries = json.loads(index)
        if not entries or not all(
            isinstance(e.get("file"), str) and isinstance(e.get("label"), str) for e in entries
        ):
            raise ValueError("expected a list of {file, label}")
    except (ValueError, AttributeError, TypeError) as e:
        raise DeployError(f"golden set {folder}: unreadable {INDEX} ({e})") from None
    return entries, {INDEX: index, **{e["file"]: read_file(folder, e["file"]) for e in entries}}


def checksums(files: dict[str, bytes]) -> dict[str, str]:
    """{file name: SHA-256} of a set's files, sorted by name."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}


def digest(sums: dict[str, str]) -> str:
    """One SHA-256 for a whole set: two sets are the same when their files and labels are."""
    return hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()


def pairs(entries: list[dict], files: dict[str, bytes]) -> list[tuple[bytes, str]]:
    """What the gate sends: (image bytes, label) for each entry."""
    return [(files[e["file"]], e["label"]) for e in entries]


def load_golden(folder: str) -> list[tuple[bytes, str]]:
    """The (image bytes, label) pairs of the golden set in `folder`, as training wrote it (no manifest
    checked)."""
    return pairs(*read_set(folder))


def read_fixed(fixed: str) -> tuple[list[tuple[bytes, str]], dict]:
    """The model's own set, each file checked against the manifest written when it was fixed."""
    try:
        with open(os.path.join(fixed, MANIFEST)) as f:
            manifest = json.load(f)
        want = manifest["sha256"]
    except (OSError, ValueError, KeyError) as e:
        raise DeployError(f"the model's golden set {fixed} has no readable {MANIFEST} ({e})") from None
    entries, files = read_set(fixed)
    have = checksums(files)
    changed = sorted(n for n in set(have) | set(want) if have.get(n) != want.get(n))
    if changed:
        raise DeployError(
            f"the model's golden set {fixed} does not match its manifest "
            f"({', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}): not gating on it; name a set "
            "with --golden DIR --replace-golden"
        )
    info = {
        "source": "model",
        "dir": fixed,
        "from": manifest.get("from"),
        "fixed_at": manifest.get("fixed_at"),
    }
    return pairs(entries, files), {**info, "sha256": digest(want), "overridden": False}


def fix(state_dir: str, model: str, source: str, files: dict[str, bytes]) -> str:
    """Copy a set into root's state folder as the model's, whole or not at all (written aside, then renamed).
    A set it replaces is kept beside it, renamed with the time."""
    fixed = model_dir(state_dir, model)
    os.makedirs(os.path.dirname(fixed), mode=0o700, exist_ok=True)
    tmp = f"{fixed}.{os.getpid()}.new"
    if os.path.lexists(tmp):  # left by a killed writer
        shutil.rmtree(tmp)
    manifest = {
        "model": model,
        "from": os.path.abspath(source),
        "fixed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sha256": checksums(files),
    }
    with private_files():
        os.mkdir(tmp, 0o700)
        for name, data in files.items():
            write_new(os.path.join(tmp, name), data)
        write_new(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1).encode())
    if os.path.lexists(fixed):
        os.rename(fixed, f"{fixed}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
    os.rename(tmp, fixed)
    return fixed


def choose(
    state_dir: str, model: str, folder: str | None, from_candidate: bool = False, replace: bool = False
) -> tuple[list[tuple[bytes, str]], dict]:
    """The golden set a gate of `model` uses, and how it was chosen (for the report): the model's own set;
    `folder`, fixed as the model's set when it has none yet (or with `replace`); or `folder` for this gate
    only (`from_candidate`). A `folder` that differs from the model's set is refused otherwise."""
    fixed = model_dir(state_dir, model)
    if folder is None:
        if from_candidate or replace:
            raise DeployError("--golden-from-candidate and --replace-golden need --golden DIR")
        if not os.path.isdir(fixed):
            raise DeployError(
                f"{model} has no golden set yet: its first gate needs --golden DIR, which becomes the "
                f"model's set (copied to {fixed})"
            )
        return read_fixed(fixed)
    entries, files = read_set(folder)
    named = {"from": os.path.abspath(folder), "sha256": digest(checksums(files))}
    if from_candidate:
        return pairs(entries, files), {
            "source": "candidate",
            "dir": named["from"],
            **named,
            "overridden": True,
        }
    exists = os.path.isdir(fixed)
    if exists and not replace:
        golden, info = read_fixed(fixed)
        if info["sha256"] != named["sha256"]:
            raise DeployError(
                f"{folder} is not {model}'s golden set (fixed in {fixed} from {info['from']}): a candidate "
                "is judged on the model's set. Leave out --golden to use it; --golden-from-candidate gates "
                f"on {folder} this once (the report records it); --replace-golden makes {folder} the "
                "model's set"
            )
        return golden, info
    fix(state_dir, model, folder, files)
    source = "replaced" if exists else "fixed"
    return pairs(entries, files), {"source": source, "dir": fixed, **named, "overridden": exists}
