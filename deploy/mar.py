"""Torch-free checks of TorchServe archives: names, SHA-256 sidecars, zip soundness, the manifests inside.

Imported by the guard, the version tools and the gate, which must not load torch; the builder is
deploy/archive.py (which re-exports these names).
"""

import json
import os
import re
import zipfile
import zlib

from model_src import manifest
from model_src.manifest import Manifest, sha256_of

__all__ = [
    "NAME",
    "SHA256",
    "archive_name",
    "check_archive",
    "read_bundle",
    "read_classes",
    "read_manifest",
    "sha256_of",
    "verify_checksum",
    "write_checksum",
]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MEMBER_MAX = 1 << 20  # bytes: MANIFEST.json and bundle.json are a few KB; a larger one is refused unread
# What a zip or its JSON raises besides ValueError: an encrypted member (RuntimeError), an unknown
# compression method (NotImplementedError) and JSON nested too deep (RecursionError) are RuntimeErrors.
UNREADABLE = (OSError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error)
SHA256 = re.compile(r"[0-9a-f]{64}")


def archive_name(model_name: str, version: str) -> str:
    """The file name of a model version's archive: <model>.mar for 1.0, else <model>_v<version>.mar;
    ValueError for a name or version that is not a plain file name part."""
    for what, value in (("model name", model_name), ("version", version)):
        if not NAME.fullmatch(value):
            raise ValueError(f"{what} {value!r}: use letters, digits, '.', '_' or '-'")
    return f"{model_name}.mar" if version == "1.0" else f"{model_name}_v{version}.mar"


def write_checksum(path: str) -> str:
    """The sidecar of an archive placed by other means (bench and test archives); build_archive uses
    place_archive."""
    digest = sha256_of(path)
    with open(path + ".sha256", "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
    return digest


def verify_checksum(path: str) -> str:
    """Raise ValueError unless <path>.sha256 exists and matches the archive."""
    sidecar = path + ".sha256"
    if not os.path.isfile(sidecar):
        raise ValueError(f"{sidecar} is missing: build archives with scripts/archive.sh, which writes it")
    with open(sidecar, errors="replace") as f:
        fields = f.read(4096).split()  # sha256sum's line is ~70 bytes plus the name
    if not fields or not SHA256.fullmatch(fields[0]):
        raise ValueError(f"{sidecar} is empty or garbled (no SHA-256 at its start): rebuild the archive")
    expected = fields[0]
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(
            f"{os.path.basename(path)}: SHA-256 {actual[:12]}… does not match {expected[:12]}… "
            "in its .sha256 file: the archive changed after it was built"
        )
    return actual


def read_manifest(path: str) -> dict:
    """Validate a .mar before TorchServe sees it: a readable zip whose CRCs match, with a manifest."""
    name = os.path.basename(path)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad:
                raise ValueError(f"{name} is corrupt: {bad} fails its CRC check")
            found = json.loads(read_member(z, "MAR-INF/MANIFEST.json"))
    except UNREADABLE as e:  # testzip() lets a broken deflate stream's zlib.error through
        raise ValueError(f"{name} is not a valid .mar (corrupt or unreadable zip: {e!r:.200})") from None
    except KeyError:
        raise ValueError(f"{name} has no MAR-INF/MANIFEST.json: not a TorchServe archive") from None
    if not isinstance(found, dict) or not isinstance(found.get("model"), dict):
        raise ValueError(f'{name}: MAR-INF/MANIFEST.json is not an object with a "model" object')
    return found


def read_member(z: zipfile.ZipFile, member: str) -> bytes:
    """A small member of an archive; ValueError if its header says it is over MEMBER_MAX (zipfile stops
    reading at that size, so the header cannot lie), KeyError if absent."""
    size = z.getinfo(member).file_size
    if size > MEMBER_MAX:
        raise ValueError(f"{member} is {size:,} bytes, over the {MEMBER_MAX:,} a manifest may have")
    return z.read(member)


def read_bundle(path: str) -> Manifest:
    """The bundle manifest (bundle.json) inside an archive, or what an archive built before it carries
    (serving.json). ValueError if it has neither or it is unreadable."""
    name = os.path.basename(path)
    try:
        with zipfile.ZipFile(path) as z:
            members = z.namelist()
            if manifest.FILE in members:
                return manifest.loads(read_member(z, manifest.FILE))
            legacy = manifest.from_legacy(lambda m: read_member(z, m) if m in members else None, members)
    except UNREADABLE as e:
        raise ValueError(f"cannot read {name}: {e!r:.200}") from None
    if legacy is None:
        raise ValueError(f"{name} has no {manifest.FILE}: its class names are unknown (rebuild it)")
    return legacy


def read_classes(path: str) -> list[str]:
    """The class names an archive answers, in index order, from its bundle manifest."""
    return read_bundle(path).class_names


def check_archive(archive: str, model_store: str) -> dict:
    """The manifest's model entry of an archive that may be registered: a file directly in the model
    store, matching its .sha256, a sound zip. ValueError says what is wrong."""
    path, store = os.path.abspath(archive), os.path.abspath(model_store)
    if os.path.dirname(path) != store:
        raise ValueError(
            f"{archive} is not in the model store {store}: only archives there can be registered "
            "(allowed_urls blocks everything else). Build it with scripts/archive.sh"
        )
    if not os.path.isfile(path):
        raise ValueError(f"{archive} does not exist")
    verify_checksum(path)
    return read_manifest(path)["model"]
