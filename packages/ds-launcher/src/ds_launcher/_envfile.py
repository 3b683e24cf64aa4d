"""Env files: `.ds_env` / `.deepspeed_env` (home directory, then working directory) and --env_file.

Format, one variable per line:

    VAR=value            the rest of the line, verbatim (surrounding blanks removed)
    VAR='value'          verbatim between single quotes (no escapes)
    VAR="a\\nb"          between double quotes, with \\n \\t \\r \\\\ \\" escapes
    export VAR=value     the `export ` prefix is accepted and ignored
    # comment, blank lines

Values are never shell-expanded: `$(cmd)`, backticks and `$VAR` arrive as written. DeepSpeed
splices values into a shell string, which is how quoted values lose their quotes there; the
quoted forms above keep that common spelling working without a shell.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ds_launcher._errors import EnvFileError

ENV_FILE_NAMES: tuple[str, ...] = (".deepspeed_env", ".ds_env")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"'}


def check_env_name(name: str, where: str) -> None:
    if not _NAME.fullmatch(name):
        raise EnvFileError(
            f"{where}: {name!r} is not a valid environment variable name "
            "(letters, digits and '_', not starting with a digit)"
        )


def _unquote_double(body: str, where: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            if i + 1 >= len(body) or body[i + 1] not in _ESCAPES:
                raise EnvFileError(
                    f'{where}: unknown escape in double-quoted value; use \\n \\t \\r \\\\ or \\", '
                    "or single quotes for a verbatim value"
                )
            out.append(_ESCAPES[body[i + 1]])
            i += 2
        elif ch == '"':
            raise EnvFileError(f"{where}: unescaped '\"' inside a double-quoted value; write \\\"")
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse_env_file(text: str, source: str = "<env file>") -> dict[str, str]:
    """Parse env-file text into {VAR: value}; later lines override earlier ones."""
    env: dict[str, str] = {}
    # Split on '\n' only: values may legitimately contain other line-breaking characters.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r").strip(" \t")
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}: {raw!r}"
        if line.startswith("export ") or line.startswith("export\t"):
            line = line[len("export") :].lstrip(" \t")
        name, sep, value = line.partition("=")
        if not sep:
            raise EnvFileError(f"{where}: expected VAR=VALUE")
        name = name.strip(" \t")
        check_env_name(name, where)
        value = value.strip(" \t")
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            value = _unquote_double(value[1:-1], where)
        elif value[:1] in ("'", '"'):
            raise EnvFileError(f"{where}: the quote opening the value is never closed")
        if "\x00" in value:
            raise EnvFileError(f"{where}: NUL bytes cannot be passed in an environment variable")
        env[name] = value
    return env


def read_env_file(path: str | Path) -> dict[str, str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EnvFileError(f"env file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EnvFileError(f"env file {str(path)!r} cannot be read: {exc}") from None
    return parse_env_file(text, str(path))


def default_env_files(cwd: Path | None = None, home: Path | None = None) -> list[Path]:
    """The env files that exist, lowest precedence first: home before working directory, and
    DeepSpeed's `.deepspeed_env` before our `.ds_env` in each."""
    cwd = Path.cwd() if cwd is None else cwd
    home = Path.home() if home is None else home
    # DS_ENV_FILE renames DeepSpeed's file, as it does in DeepSpeed.
    names = (os.environ.get("DS_ENV_FILE") or ENV_FILE_NAMES[0], ENV_FILE_NAMES[1])
    found: list[Path] = []
    for directory in (home, cwd):
        for name in names:
            path = directory / name
            if path.is_file() and path.resolve() not in [p.resolve() for p in found]:
                found.append(path)
    return found


# Variables forwarded from the launcher's environment to remote ranks. The local runner passes the
# whole environment anyway; these are what multi-node runners add to the env-file variables.
EXPORT_PREFIXES: tuple[str, ...] = ("NCCL_", "PYTHON", "UCX_", "FI_", "DS_ACCELERATOR")


def collect_exports(
    environ: dict[str, str], env_files: list[Path], extra_names: tuple[str, ...] = ()
) -> dict[str, str]:
    """Variables exported to every rank: matching launcher variables, then env files in order."""
    exports = {
        k: v
        for k, v in environ.items()
        if (k.startswith(EXPORT_PREFIXES) or k in extra_names) and _NAME.fullmatch(k)
    }
    for path in env_files:
        exports.update(read_env_file(path))
    return exports
