"""Java .properties files as TorchServe reads and writes them (java.util.Properties rules)."""


def read_properties(path: str) -> dict:
    r"""Parse a Java .properties file as java.util.Properties.load does (TorchServe writes its snapshots with
    Java escapes: \n, \:, ...): keys end at the first unescaped '=', ':' or blank; leading blanks are
    dropped, trailing ones kept; an odd number of backslashes at the end of a line continues it on the
    next."""
    with open(path, encoding="latin-1") as f:  # Properties.load(InputStream) reads ISO 8859-1
        return parse_properties(f)


def parse_properties(lines) -> dict:
    """read_properties of lines already read (str, ISO 8859-1 decoded)."""
    props, pending = {}, None
    for raw in lines:
        line = raw.rstrip("\n").lstrip(" \t\f")
        if pending is None and (not line or line.startswith(("#", "!"))):
            continue
        line = line if pending is None else pending + line
        if (len(line) - len(line.rstrip("\\"))) % 2:
            pending = line[:-1]
            continue
        pending = None
        key, value = split_property(line)
        props[unescape(key)] = unescape(value)
    if pending is not None:  # the file ended on a continued line
        key, value = split_property(pending)
        props[unescape(key)] = unescape(value)
    return props


def split_property(line: str) -> tuple[str, str]:
    """'key = value' -> ('key', 'value'), both still escaped (Java's separator rules)."""
    i, escaped = 0, False
    while i < len(line) and (escaped or line[i] not in "=: \t\f"):
        escaped = line[i] == "\\" and not escaped
        i += 1
    j, has_sep = i + 1, line[i : i + 1] in ("=", ":")
    while j < len(line) and line[j] in " \t\f=:":
        if line[j] in "=:":
            if has_sep:
                break
            has_sep = True
        j += 1
    return line[:i], line[j:]


def unescape(value: str) -> str:
    """A key or value with its backslash escapes undone, as java.util.Properties.load reads it."""
    out, i = [], 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            n = value[i + 1]
            if n == "u" and i + 5 < len(value):
                out.append(chr(int(value[i + 2 : i + 6], 16)))
                i += 6
                continue
            out.append({"n": "\n", "t": "\t", "r": "\r", "f": "\f"}.get(n, n))
            i += 2
            continue
        out.append(c)
        i += 1
    # \uXXXX escapes are UTF-16 code units: join surrogate pairs into one character
    return "".join(out).encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def escape(text: str, key: bool = False) -> str:
    r"""The inverse of unescape, as java.util.Properties.store writes it, in plain ASCII. Without it, a value
    read from config.properties loses a level of backslashes on its way to TorchServe: the documented
    allowed_urls=https://models\\.example\\.com/.* would arrive as https://models.example.com/.*, whose '.'
    also matches the '-' of models-example.com."""
    units = text.encode("utf-16-le", "surrogatepass")
    out = []
    for i in range(0, len(units), 2):
        c = chr(int.from_bytes(units[i : i + 2], "little"))
        if c == "\\":
            out.append("\\\\")
        elif c in "\t\n\r\f":
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r", "\f": "\\f"}[c])
        elif c in "=:#!" or (c == " " and (key or i == 0)):
            out.append("\\" + c)
        elif not " " <= c <= "~":
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return "".join(out)


def write_properties(path: str, props: dict, comment: str = ""):
    """Write props so that Properties.load reads back exactly these strings."""
    with open(path, "w", encoding="latin-1") as f:  # escape() leaves plain ASCII
        f.write(format_properties(props, comment))


def format_properties(props: dict, comment: str = "") -> str:
    """The .properties text of `props`, escaped, one per line, after a `# comment` line if given."""
    lines = [f"# {comment}\n"] if comment else []
    return "".join(lines + [f"{escape(key, key=True)}={escape(value)}\n" for key, value in props.items()])
