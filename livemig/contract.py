"""What `--json` prints: exactly one JSON object on stdout, whatever the command and however
it ends, that scripts can hold to.

Every object says its `schema` (SCHEMA: raised when a field changes meaning or goes away;
a field added does not raise it), the `command` that printed it, the `livemig` version that
did, and the `exit_code` the command exits with. The rest is the command's own: a move's
Report, a dry run's Plan, a clone's CloneReport, check's CheckReport, recover's Recovered,
config's settings; or, where the command failed before it had one (bad arguments, a host
not reached, no such PID), a Failure: the error, its phase, its hint.

The JSON Schema of each command's output ships in livemig/schemas/ (COMMAND.json), written
from the dataclasses here by `python -m livemig.contract --write`, each field's doc comment
(fielddocs.py) its description; a unit test checks the files are what the code writes, and
real outputs (the unit tests', the lab's) validate against them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from .drainreport import DrainReport
from .fielddocs import field_docs
from .recoverreport import Listed, Recovered
from .report import (
    CheckReport,
    CloneReport,
    Failure,
    Plan,
    Report,
    RoundReport,
)
from .version import __version__

SCHEMA = 1
SCHEMAS = Path(__file__).parent / "schemas"

# each command's body, besides a Failure (config's is written by hand: its values are the settings')
BODIES: dict[str, type | None] = {
    "move": Report, "move --dry-run": Plan, "clone": CloneReport, "check": CheckReport,
    "recover": Recovered, "recover --list": Listed, "config": None,
    "drain": DrainReport, "drain --dry-run": DrainReport,
}
_COMPUTED: dict[type, dict[str, Any]] = {RoundReport: {"compression_ratio": {    # Report.to_dict adds it
    "type": "number", "description": "bytes_raw over bytes_wire, to two places (1.0: nothing crossed)"}}}


def document(command: str, body: dict[str, Any], exit_code: int) -> str:
    """The one object a command prints with --json."""
    head = {"schema": SCHEMA, "command": command, "livemig": __version__, "exit_code": int(exit_code)}
    return json.dumps({**head, **body}, indent=2)


def failure(command: str, message: str, phase: str | None, exit_code: int, host: str | None = None,
            hint: str | None = None) -> str:
    return document(command, dataclasses.asdict(Failure(message, phase or "", host or "", hint or "")), exit_code)


# --- the schemas ------------------------------------------------------------------------
def _of(t: Any) -> dict[str, Any]:
    """A Python type, as JSON Schema."""
    if t is Any:
        return {}       # any JSON at all (a drain's move's own object: its Report, or its Failure)
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_of(a) for a in args]}
    if origin is list:
        return {"type": "array", "items": _of(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _of(args[1])}
    if isinstance(t, type) and dataclasses.is_dataclass(t):
        return _object(t)
    simple = {int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"},
              bool: {"type": "boolean"}, type(None): {"type": "null"}}
    if t in simple:
        return simple[t]
    raise TypeError(f"no JSON Schema for {t!r}")


def _object(cls: type) -> dict[str, Any]:
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    props = {f.name: {**_of(hints[f.name]), **({"description": docs[f.name]} if f.name in docs else {})}
             for f in dataclasses.fields(cls)}
    props.update(_COMPUTED.get(cls, {}))
    # every field is always printed; fields added later do not break a script that validates
    return {"type": "object", "required": sorted(props), "properties": props, "additionalProperties": True}


def _config() -> dict[str, Any]:
    setting = {"type": "object", "required": ["value", "from"],
               "properties": {"value": {}, "from": {"type": "string"}}}
    return {"type": "object", "required": ["file", "settings"],
            "properties": {"file": {"type": ["string", "null"]},
                           "settings": {"type": "object", "additionalProperties": setting}}}


def schema(command: str) -> dict[str, Any]:
    """The JSON Schema of what `livemig COMMAND --json` prints."""
    body = BODIES[command]
    head = {"type": "object", "required": ["schema", "command", "livemig", "exit_code"],
            "properties": {"schema": {"const": SCHEMA}, "command": {"const": command},
                           "livemig": {"type": "string"}, "exit_code": {"type": "integer", "minimum": 0}}}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"livemig {command} --json",
            "allOf": [head, {"anyOf": [_config() if body is None else _object(body), _object(Failure)]}]}


def file_of(command: str) -> Path:
    return SCHEMAS / f"{command.replace(' --', '-')}.json"


def written(command: str) -> str:
    return json.dumps(schema(command), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    if argv != ["--write"]:
        print("usage: python -m livemig.contract --write   (writes livemig/schemas/ from the code)", file=sys.stderr)
        return 2
    SCHEMAS.mkdir(exist_ok=True)
    for command in BODIES:
        file_of(command).write_text(written(command))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
