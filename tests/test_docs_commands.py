"""Every command in a ```bash block of README.md and docs/*.md starts with something that exists on a clone
after scripts/setup.sh: a script of scripts/, a program of the venv (.venv/bin/..., and for `python -m` a
module that is there), or a known tool. Nothing is run. A bare `python` or `tensorboard` works only with the
venv active, so it is refused unless the block itself ran `source .venv/bin/activate` first (as
docs/serving.md's plain commands do)."""

import glob
import importlib.util
import os
import re
import shlex

import pytest

from bundle.settings import ROOT

DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# from the system, not the venv
TOOLS = {
    "curl",
    "docker",
    "kubectl",
    "sleep",
    "printf",
    "echo",
    "cd",
    "export",
}
PREFIXES = {"sudo", "until", "while", "if", "then", "do", "else", "!"}  # the command is the word after them
ENDINGS = {"done", "fi"}
OPERATORS = {"|", "||", "&&", ";", "&"}
FUNCTION = re.compile(r"^(\w+)\(\)\s*\{")


def bash_blocks(path: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, text) of each ```bash block."""
    text = open(os.path.join(ROOT, path)).read()
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1))
        for m in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M)
    ]


def commands(block: str) -> list[str]:
    """Logical lines: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def first_words(line: str) -> list[str]:
    """The program of each command in a line: after an operator, past VAR=value assignments and
    sudo/until/do..."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    words, start = [], True
    for token in lexer:
        if token in OPERATORS:
            start = True
        elif start and not (re.fullmatch(r"\w+=.*", token) or token in PREFIXES):
            words.append(token)
            start = False
    return [w for w in words if w not in ENDINGS]


def problem(word: str, rest: str, known: set[str], activated: bool) -> str | None:
    """Why `word` (the program of a command; `rest` is the line) would not run on a clone, or None."""
    local = word.removeprefix("./")
    if local.startswith("scripts/") or (local.startswith("bench/") and local.endswith(".sh")):  # bench/gpu.sh
        return (
            None if os.access(os.path.join(ROOT, local), os.X_OK) else f"{local} is not an executable script"
        )
    if local.startswith(".venv/bin/"):
        if not os.access(os.path.join(ROOT, local), os.X_OK):
            return f"{local} is not in the venv"
        module = re.match(r"\S+ -m ([\w.]+)", rest[rest.find(word) :])
        if (
            module
            and os.path.basename(local).startswith("python")
            and not importlib.util.find_spec(module[1])
        ):
            return f"no module {module[1]}"
        return None
    if word in TOOLS or word in known:
        return None
    if activated and os.access(os.path.join(ROOT, ".venv", "bin", word), os.X_OK):
        return None
    if os.access(os.path.join(ROOT, ".venv", "bin", word), os.X_OK):
        return f"bare {word!r} needs the venv active: write .venv/bin/{word}"
    return f"{word!r} is neither a script, a venv program nor a known tool"


def check(block: str) -> list[str]:
    known, activated, problems = set(), False, []
    for line in commands(block):
        if FUNCTION.match(line):  # a shell function the block defines (its body runs when called)
            known.add(FUNCTION.match(line)[1])
            continue
        for word in first_words(line):
            if word == "source":
                activated |= ".venv/bin/activate" in line
                continue
            why = problem(word, line, known, activated)
            if why:
                problems.append(f"{line[:80]}: {why}")
    return problems


@pytest.mark.parametrize("path", DOCS)
def test_every_documented_command_starts_with_something_that_exists(path):
    found = [f"{path}, block at line {n}: {p}" for n, block in bash_blocks(path) for p in check(block)]
    assert not found, "\n".join(found)


def test_the_check_refuses_what_fails_on_a_clone():
    assert check("python -m train.train --help") == [
        "python -m train.train --help: bare 'python' needs the venv active: write .venv/bin/python"
    ]
    assert check("tensorboard --logdir runs  # graphs")[0].endswith("write .venv/bin/tensorboard")
    assert check(".venv/bin/python -m train.nowhere")[0].endswith("no module train.nowhere")
    assert check("scripts/nowhere.sh")[0].endswith("is not an executable script")
    assert check("X=1 sudo \\\n  .venv/bin/python -m train.export | curl -s x && echo ok") == []
    assert check("source .venv/bin/activate\ntorchserve --stop") == []
    assert check("until curl -s x; do sleep 1; done\nf() { python -c 1; }\nf | curl -s x") == []
