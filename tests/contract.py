"""Every `livemig ... --json` the tests run holds to the contract (livemig/contract.py): stdout
is exactly one JSON object, valid against the command's shipped JSON Schema, whose exit_code
is the one the command exited with. tests.lab's run() checks each one it runs."""

from __future__ import annotations

import json
from functools import cache

import jsonschema

from livemig import contract


@cache
def _validator(command: str) -> jsonschema.protocols.Validator:
    schema = json.loads(contract.file_of(command).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def command_of(argv: list[str]) -> str | None:
    """The livemig command argv runs with --json (None: it runs none, or without --json)."""
    if "livemig" not in argv or "--json" not in argv:
        return None
    rest = argv[argv.index("livemig") + 1:]
    command = next((a for a in rest if a in contract.BODIES), None)
    for flag in ("--dry-run", "--list"):
        if f"{command} {flag}" in contract.BODIES and flag in rest:
            return f"{command} {flag}"
    return command


def held(command: str, stdout: bytes, returncode: int) -> dict:
    """stdout, parsed, once it is shown to hold to the contract."""
    text = stdout.decode()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise AssertionError(f"livemig {command} --json printed no one JSON object ({e}): {text!r}") from None
    errors = list(_validator(command).iter_errors(doc))
    # an anyOf's failure says only that no branch held: each branch's own say why
    said = [e.message for err in errors for e in (err.context or [err])]
    assert not errors, f"livemig {command} --json breaks its schema: {said[:8]}\n{text}"
    assert doc["exit_code"] == returncode, (doc["exit_code"], returncode)
    return doc
