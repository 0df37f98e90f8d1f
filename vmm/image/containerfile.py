"""A Containerfile / Dockerfile subset: the instructions ``pyvmm build`` understands.

FROM (an image in the store, or ``scratch``), RUN, COPY / ADD (local files, ``--chown=
UID:GID``), ENV, ARG, WORKDIR, USER, ENTRYPOINT, CMD, LABEL. As in the Dockerfile
reference: ``#`` comment lines, ``\\`` line continuations, instructions case-insensitive,
the exec form (a JSON array) for RUN, ENTRYPOINT and CMD, else the shell form;
``$VAR`` / ``${VAR}`` replaced from ARG and ENV in the instructions that take it.
Anything else is an error naming the file and line.
"""

from __future__ import annotations

import json
import re

from vmm.errors import UserError

INSTRUCTIONS = ("FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER",
                "ENTRYPOINT", "CMD", "LABEL")
#: Instructions whose arguments get $VAR replaced (Dockerfile reference, "Environment
#: replacement"); RUN's are left to the shell.
SUBSTITUTED = frozenset(("FROM", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "LABEL"))
MAX_LINES = 100_000


class ContainerfileError(UserError):
    """A syntax error: ``FILE:LINE: what``."""


class Instruction:
    """One instruction: ``line`` (1-based, where it starts), ``name`` (upper case),
    ``text`` (the arguments as written, continuations joined), ``exec_form`` (a list
    when the arguments are a JSON array, else None), ``flags`` (``--chown=...``)."""

    __slots__ = ("line", "name", "text", "exec_form", "flags")

    def __init__(self, line, name, text, exec_form=None, flags=None):
        self.line, self.name, self.text = line, name, text
        self.exec_form, self.flags = exec_form, dict(flags or {})

    def __repr__(self):
        return f"{self.name} {self.text}"


def _pairs(text: str, where: str, what: str) -> list[tuple[str, str]]:
    """``K=V K2="V 2"`` (or the legacy ``K V``) into pairs."""
    import shlex
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ContainerfileError(f"{where}: {what}: {e}") from None
    if words and "=" not in words[0]:
        if len(words) < 2:
            raise ContainerfileError(f"{where}: {what} needs KEY=VALUE")
        return [(words[0], text.split(None, 1)[1].strip())]
    out = []
    for w in words:
        key, sep, value = w.partition("=")
        if not sep or not key:
            raise ContainerfileError(f"{where}: {what}: {w!r} is not KEY=VALUE")
        out.append((key, value))
    return out


def substitute(text: str, variables: dict[str, str]) -> str:
    """``$VAR``, ``${VAR}``, ``${VAR:-default}`` (unset: empty), ``\\$`` a literal $."""
    def repl(m):
        if m.group(0) == "\\$":
            return "$"
        name = m.group(1) or m.group(2)
        default = m.group(3)
        value = variables.get(name)
        return value if value else (default or "")
    return re.sub(r"\\\$|\$(?:([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)"
                  r"(?::-([^}]*))?\})", repl, text)


def parse(text: str, path: str = "Containerfile") -> list[Instruction]:
    """The instructions of a Containerfile (raises ContainerfileError with FILE:LINE)."""
    lines = text.splitlines()
    if len(lines) > MAX_LINES:
        raise ContainerfileError(f"{path}: more than {MAX_LINES} lines")
    out, i = [], 0
    while i < len(lines):
        start = i
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            nxt = lines[i]
            i += 1
            if nxt.lstrip().startswith("#"):
                continue
            line = line[:-1] + " " + nxt.strip()
        where = f"{path}:{start + 1}"
        name, _, rest = line.strip().partition(" ")
        name = name.upper()
        rest = rest.strip()
        if name not in INSTRUCTIONS:
            raise ContainerfileError(f"{where}: unknown instruction {name!r} "
                                     f"(pyvmm build knows {', '.join(INSTRUCTIONS)})")
        flags = {}
        while name in ("COPY", "ADD") and rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            key, sep, value = flag[2:].partition("=")
            if key != "chown" or not sep:
                raise ContainerfileError(f"{where}: {name} flag {flag!r} is not supported "
                                         "(only --chown=UID:GID)")
            flags[key] = value
            rest = rest.strip()
        exec_form = None
        if name in ("RUN", "ENTRYPOINT", "CMD") and rest.startswith("["):
            try:
                exec_form = json.loads(rest)
            except ValueError:
                exec_form = None       # not JSON: the shell form, as Docker does
            if exec_form is not None and (not isinstance(exec_form, list) or not all(
                    isinstance(a, str) for a in exec_form)):
                raise ContainerfileError(f"{where}: {name}: the exec form is a JSON array "
                                         "of strings")
        if not rest and name not in ("ENTRYPOINT", "CMD"):
            raise ContainerfileError(f"{where}: {name} needs arguments")
        ins = Instruction(start + 1, name, rest, exec_form, flags)
        if name in ("ENV", "LABEL"):
            _pairs(rest, where, name)             # checked here, used by the builder
        elif name in ("COPY", "ADD") and len(rest.split()) < 2:
            raise ContainerfileError(f"{where}: {name} needs SOURCE... DEST")
        out.append(ins)
    if not out or out[0].name not in ("FROM", "ARG"):
        raise ContainerfileError(f"{path}:{out[0].line if out else 1}: the first "
                                 "instruction must be FROM")
    if not any(ins.name == "FROM" for ins in out):
        raise ContainerfileError(f"{path}: no FROM")
    return out


pairs = _pairs
