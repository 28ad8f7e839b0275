"""The guard's reading of a management request (deploy/guard.py): strict HTTP/1.1 framing, the target split
the way TorchServe reads it, and the calls that may pass, each parameter with the form of its value.
Everything here is pure: bytes in, a `Call` built from validated values out, or a `Refusal` that says why.
Each parser runs in time linear in its input (tests/test_guard_units.py grows hostile input 10x)."""

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urlencode

from deploy.archive import NAME

ARCHIVE_NAME = re.compile(NAME.pattern + r"\.mar")  # a file name in the store, as archive.sh names them
# the framing we accept; management calls carry parameters, never archives (bodies are refused)
MAX_BODY = 1 << 20
MAX_LINE = 8192  # bytes of the request line or of one header line, CRLF included
MAX_HEADERS = 64
MAX_PARAMS = 16
MAX_NAME = 128  # characters of a path segment or a model name

TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VISIBLE = bytes(range(0x21, 0x7F))  # what a request target may hold
FIELD_CHARS = VISIBLE + b" \t"  # what a header value may hold: no control characters, no obs-text


class Refusal(Exception):
    """A request the guard answers itself (status, message, TorchServe-style error type)."""

    def __init__(self, status: int, message: str, kind: str = "BadRequest"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def shown(value: str, limit: int = 80) -> str:
    """A client's value inside a message or a log line: quoted, escaped, short."""
    return repr(value[:limit]) + ("…" if len(value) > limit else "")


# --- HTTP framing: the request head -------------------------------------------------------------------------


@dataclass
class Head:
    """A request head as read_head parsed it: the request line's parts, the headers and the body's length."""

    method: str
    target: str
    version: str
    headers: dict[str, str]  # lower-case name -> value; every name at most once
    length: int  # the body's, from Content-Length (0 without one)


def only(data: bytes, allowed: bytes) -> bool:
    """Every byte of `data` is one of `allowed` (linear: translate deletes the allowed bytes in one pass)."""
    return not data.translate(None, allowed)


def read_line(rfile) -> bytes | None:
    """One CRLF-terminated line without its CRLF; None at a clean end of input before any byte."""
    line = rfile.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE:
        raise Refusal(400, f"a request line or header line is longer than {MAX_LINE} bytes")
    if not line.endswith(b"\r\n"):
        raise Refusal(400, "every request line and header line ends with CRLF")
    return line[:-2]


def read_head(rfile) -> Head | None:
    """Parse a request head strictly; None when the client closed the connection between requests."""
    line = read_line(rfile)
    if line is None:
        return None
    parts = line.split(b" ")
    if len(parts) != 3 or not 0 < len(parts[0]) <= 16 or not only(parts[0], b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"):
        raise Refusal(400, "the request line is not METHOD SP target SP HTTP/1.x")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise Refusal(400, "only HTTP/1.1 and HTTP/1.0 are spoken here")
    if not target or not only(target, VISIBLE):
        raise Refusal(400, "the request target holds a control character, a space or a non-ASCII byte")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = read_line(rfile)
        if line is None:
            raise Refusal(400, "the request head ended before its blank line")
        if not line:
            return Head(method.decode(), target.decode(), version.decode(), headers, content_length(headers))
        if line[:1] in (b" ", b"\t"):
            raise Refusal(400, "folded header lines (obs-fold) are not accepted")
        name, colon, value = line.partition(b":")
        if not colon or not name or not only(name, TOKEN_CHARS):
            raise Refusal(400, "a header line is not name:value")
        if not only(value, FIELD_CHARS):
            raise Refusal(400, "a header value holds a control character or a non-ASCII byte")
        key = name.decode().lower()
        if key in headers:
            raise Refusal(400, f"header {key} is given twice")
        headers[key] = value.strip(b" \t").decode()
    raise Refusal(400, f"more than {MAX_HEADERS} header lines")


def content_length(headers: dict[str, str]) -> int:
    """The body's length from the headers; Refusal for Transfer-Encoding, a Content-Length that is not a
    number, or one over MAX_BODY (413)."""
    if "transfer-encoding" in headers:
        raise Refusal(400, "Transfer-Encoding is not accepted here: send a Content-Length")
    value = headers.get("content-length", "0")
    if not value.isascii() or not value.isdigit():
        raise Refusal(400, f"Content-Length {shown(value)} is not a number of bytes")
    if len(value) > 9 or int(value) > MAX_BODY:
        raise Refusal(413, f"management requests are limited to {MAX_BODY} bytes")
    return int(value)


# --- the target, as TorchServe reads it ---------------------------------------------------------------------


def decode(component: str, is_path: bool = False) -> str:
    """Netty's QueryStringDecoder.decodeComponent: %XX sequences are UTF-8 bytes and, outside a path, '+' is a
    space. Netty throws on a broken escape and replaces invalid UTF-8: both are refused here."""
    if "%" not in component and (is_path or "+" not in component):
        return component
    pieces = component.split("%")
    if any(len(p) < 2 or not only(p[:2].encode(), b"0123456789abcdefABCDEF") for p in pieces[1:]):
        raise ValueError(f"broken percent-escape in {shown(component)}")
    if not is_path:
        component = component.replace("+", " ")  # before unquoting: an escaped %2B stays a '+'
    try:
        return unquote_to_bytes(component).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{shown(component)} is not UTF-8") from None


def netty_params(query: str) -> list[tuple[str, str]]:
    """(name, value) pairs in order, as Netty 4.1.53's QueryStringDecoder.decodeParams finds them: a parameter
    ends at '&' or ';', the query at '#'; a leading '=' is skipped, the first later '=' starts the value, and
    parameters with an empty name are dropped. One pass over the query, then one decode per part."""
    pairs, name_start, value_start, i = [], 0, -1, 0

    def add(end: int):
        nonlocal value_start
        if name_start >= end:
            return
        if value_start <= name_start:
            value_start = end + 1
        pairs.append((decode(query[name_start : value_start - 1]), decode(query[value_start:end])))

    for i, c in enumerate(query):
        if c == "=":
            if name_start == i:
                name_start = i + 1
            elif value_start < name_start:
                value_start = i + 1
        elif c in "&;":
            add(i)
            name_start = i + 1
        elif c == "#":
            break
    else:
        i = len(query)
    add(i)
    return pairs


def parse_target(target: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Path segments and parameters of an origin-form target, as TorchServe would see them; Refusal for
    anything that could be read two ways (absolute form, fragments, broken escapes)."""
    if not target.startswith("/"):
        raise Refusal(400, "send the path only (origin-form), not an absolute URL")
    if "#" in target:
        raise Refusal(400, "a request target carries no fragment")
    raw_path, _, query = target.partition("?")
    try:
        # TorchServe decodes the path, then splits it on '/'; the re-issued path has no empty segments
        segments = [s for s in decode(raw_path, is_path=True).split("/") if s]
        pairs = netty_params(query)
    except ValueError as e:
        raise Refusal(400, str(e)) from None
    for s in segments:
        if len(s) > MAX_NAME or not NAME.fullmatch(s):
            raise Refusal(400, f"path segment {shown(s)}: use letters, digits, '.', '_' or '-'")
    return segments, pairs


# --- what may pass ------------------------------------------------------------------------------------------


def integer(low: int, high: int):
    """A parameter check: a decimal integer from `low` to `high`, returned without leading zeros; ValueError
    otherwise."""

    def check(value: str) -> str:
        if not (value.isascii() and value.isdigit() and len(value) <= 9 and low <= int(value) <= high):
            raise ValueError(f"an integer from {low} to {high}")
        return str(int(value))

    return check


def boolean(value: str) -> str:
    """A parameter value 'true' or 'false' in any case, lower-cased; ValueError otherwise."""
    if value.lower() not in ("true", "false"):
        raise ValueError("true or false")
    return value.lower()


def model_name(value: str) -> str:
    """A parameter value that is a model name (NAME, at most MAX_NAME characters); ValueError otherwise."""
    if len(value) > MAX_NAME or not NAME.fullmatch(value):
        raise ValueError("letters, digits, '.', '_' or '-'")
    return value


def archive_name(value: str) -> str:
    """A registration's `url`: the bare file name of a .mar in the model store; ValueError otherwise."""
    if not ARCHIVE_NAME.fullmatch(value):
        raise ValueError(
            "the file name of a .mar in the model store: only archives built with "
            "scripts/archive.sh (with their "
            ".sha256) can be registered"
        )
    return value


def token_type(value: str) -> str:
    """A /token `type`: 'management' or 'inference'; ValueError otherwise."""
    if value not in ("management", "inference"):
        raise ValueError("management or inference")
    return value


WORKERS = integer(0, 32)
PARAMS = {  # every parameter that may reach TorchServe, and the form of its value
    "url": archive_name,
    "model_name": model_name,
    "initial_workers": WORKERS,
    "batch_size": integer(1, 512),
    "max_batch_delay": integer(0, 60_000),  # ms
    "response_timeout": integer(1, 3600),  # s
    "synchronous": boolean,
    "min_worker": WORKERS,
    "max_worker": WORKERS,
    "customized": boolean,
    "limit": integer(0, 100),
    "next_page_token": integer(0, 1_000_000),
    "type": token_type,
}
REGISTRATION: tuple[str, ...] = ("url", "model_name", "initial_workers", "batch_size", "max_batch_delay")
REGISTRATION += ("response_timeout", "synchronous")
SCALE = ("min_worker", "max_worker", "synchronous")
ANY = None  # in a route: any path segment (a model name or version)
ROUTES = {  # (method, path shape) -> the parameters it takes, in the order they are re-issued
    ("GET", ("models",)): ("limit", "next_page_token"),
    ("POST", ("models",)): REGISTRATION,
    ("GET", ("models", ANY)): ("customized",),
    ("GET", ("models", ANY, ANY)): ("customized",),  # a version, or "all"
    ("PUT", ("models", ANY)): SCALE,
    ("PUT", ("models", ANY, ANY)): SCALE,
    ("PUT", ("models", ANY, ANY, "set-default")): (),
    ("DELETE", ("models", ANY)): (),
    ("DELETE", ("models", ANY, ANY)): (),
    ("GET", ("token",)): ("type",),
}


@dataclass
class Call:
    """A management call built from validated values only: what goes to TorchServe."""

    method: str
    path: str
    params: dict[str, str]  # validated, in the order of the route's parameters
    key: str  # which key of key_file.json opens it: "management", or "API" for /token

    @property
    def target(self) -> str:
        """The request target re-issued to TorchServe: the path, then the validated parameters re-encoded."""
        return self.path + ("?" + urlencode(self.params) if self.params else "")

    @property
    def registers(self) -> bool:
        """Whether the call registers a model (POST /models): its archive is checked before it passes."""
        return self.method == "POST" and self.path == "/models"


def route(method: str, segments: list[str]) -> tuple[str, ...]:
    """The parameters a call takes; Refusal (403, 404, 405) when the guard does not pass it at all."""
    if segments[:1] == ["workflows"]:
        prefix = "registration refused: " if method == "POST" else ""
        raise Refusal(403, prefix + "workflows are not served by this bundle", "RegistrationRefused")
    fits = lambda shape: len(shape) == len(segments) and all(p in (ANY, s) for p, s in zip(shape, segments))
    methods = [m for m, shape in ROUTES if fits(shape)]
    if not methods:
        raise Refusal(
            404, f"/{'/'.join(segments)} is not a management call that this guard passes", "NotFound"
        )
    if method not in methods:
        raise Refusal(405, f"{method} is not allowed here (only {', '.join(methods)})", "MethodNotAllowed")
    return next(p for (m, shape), p in ROUTES.items() if m == method and fits(shape))


def build(head: Head) -> Call:
    """The call TorchServe will get for this request, with every parameter's form checked (not yet the
    archive: that is costly, and waits for the key)."""
    segments, pairs = parse_target(head.target)
    registers = head.method == "POST" and segments == ["models"]
    allowed = route(head.method, segments)
    try:
        if head.length:
            raise ValueError("send the parameters in the query string: management calls here carry no body")
        if len(pairs) > MAX_PARAMS:
            raise ValueError(f"more than {MAX_PARAMS} parameters")
        params = {}
        for name, value in pairs:
            if name in params:  # Netty keeps every value and TorchServe reads the first: one meaning only
                raise ValueError(f"parameter {shown(name)} is given twice")
            params[name] = value
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(
                f"parameter {shown(unknown[0])} is not accepted here (only {', '.join(allowed)})"
            )
        if registers and "url" not in params:
            raise ValueError("give exactly one url: the file name of an archive in the model store")
        checked = {}
        for name in allowed:
            if name in params:
                try:
                    checked[name] = PARAMS[name](params[name])
                except ValueError as e:
                    raise ValueError(f"{name} {shown(params[name])} is not {e}") from None
    except ValueError as e:
        if registers:
            raise Refusal(403, f"registration refused: {e}", "RegistrationRefused") from None
        raise Refusal(400, str(e)) from None
    path = "/" + "/".join(segments)
    return Call(head.method, path, checked, "API" if segments == ["token"] else "management")
