"""Reviewers' tokens of the review server: a text file with one ``<name> <token>`` per line.

``#`` starts a comment. Names are what verdicts record; tokens are secrets of at least 16
characters (``add`` makes 32 random ones). The file is written with mode 0600: whoever can read it
can review as anyone in it.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from medseg.errors import ConfigError
from medseg.io import atomic_path

MIN_TOKEN = 16
NAME = re.compile(r"^[\w.@-]{1,100}$")


def load(path: Path) -> dict[str, str]:
    """Reviewer name -> token, from ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"reviewers' tokens: expected a file at {path}, found none "
                          "(medseg review --add-reviewer NAME --tokens FILE makes one)")
    tokens: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not NAME.match(parts[0]) or len(parts[1]) < MIN_TOKEN:
            raise ConfigError(f"{path}:{number}: expected '<name> <token>' with a name of letters, digits, . @ _ - "
                              f"and a token of at least {MIN_TOKEN} characters, found {len(parts)} field(s)")
        name, token = parts
        if name in tokens:
            raise ConfigError(f"{path}:{number}: reviewer {name!r} is listed twice")
        if token in tokens.values():
            raise ConfigError(f"{path}:{number}: the token of {name!r} is another reviewer's too")
        tokens[name] = token
    if not tokens:
        raise ConfigError(f"{path}: expected at least one '<name> <token>' line, found none")
    return tokens


def add(path: Path, name: str) -> str:
    """Add reviewer ``name`` with a new random token to ``path`` (created if missing); the token."""
    path = Path(path)
    if not NAME.match(name):
        raise ConfigError(f"reviewer name: expected letters, digits, . @ _ - (at most 100), found {name!r}")
    existing = load(path) if path.is_file() else {}
    if name in existing:
        raise ConfigError(f"{path}: reviewer {name!r} has a token already")
    token = secrets.token_urlsafe(24)
    lines = path.read_text().splitlines() if path.is_file() else ["# medseg review tokens: <name> <token>"]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join([*lines, f"{name} {token}"]) + "\n")
        os.chmod(tmp, 0o600)
    os.chmod(path, 0o600)
    return token
