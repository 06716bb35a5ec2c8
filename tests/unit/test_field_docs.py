"""Every field of Options and of the reports says what it holds, in a doc comment (`#:`) that
Sphinx reads too; the JSON Schemas give the same text as each field's description."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
from dataclasses import dataclass, field

import pytest

from livemig import contract, report
from livemig.fielddocs import field_docs
from livemig.options import Options

REPORTS = [c for c in vars(report).values()
           if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == report.__name__]
DOCUMENTED = [Options, *REPORTS]


def test_the_reports_named_in_the_contract_are_among_those_checked():
    assert {"Report", "RoundReport", "ThrottleStep", "DowntimePart", "CloneReport", "Replica", "CheckRow",
            "CheckReport", "Plan", "Failure"} <= {c.__name__ for c in REPORTS}


@pytest.mark.parametrize("cls", DOCUMENTED, ids=lambda c: c.__name__)
def test_every_field_has_a_doc_comment(cls):
    # a field added without one: `#: what it holds` on the line above it, or after it on its line
    docs = field_docs(cls)
    assert [f.name for f in dataclasses.fields(cls) if not docs.get(f.name, "").strip()] == []


@pytest.mark.parametrize("cls", DOCUMENTED, ids=lambda c: c.__name__)
def test_no_field_keeps_a_plain_comment_beside_its_doc(cls):
    """One form: a field's line holds no `#` comment but a doc comment, and the comment lines
    just above it are all doc comments (a plain one there would go unread)."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments = {t.start[0]: t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT}
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    plain = []
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign):
            on_it = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments]
            n = stmt.lineno - 1
            while n >= 1 and lines[n - 1].lstrip().startswith("#"):
                on_it.append(lines[n - 1].strip())
                n -= 1
            plain += [f"{ast.unparse(stmt.target)}: {c}" for c in on_it if not c.startswith("#:")]
    assert plain == []


@dataclass
class _Sample:
    #: above,
    #: on two lines
    a: int = 0
    b: int = 0        #: after it
    # a plain comment is no doc
    c: int = 0
    #: above, and after: the one after it is read
    d: list[int] = field(
        default_factory=list)   #: after it, on its last line
    e: int = 0        # plain, after it
    #:no space after the mark
    f: int = 0


def test_doc_comments_are_read_above_a_field_and_after_it():
    assert field_docs(_Sample) == {"a": "above, on two lines", "b": "after it", "d": "after it, on its last line",
                                   "f": "no space after the mark"}


@pytest.mark.parametrize("cls", REPORTS, ids=lambda c: c.__name__)
def test_each_report_field_s_doc_is_its_description_in_the_json_schema(cls):
    props = contract._object(cls)["properties"]
    docs = field_docs(cls)
    assert {f.name: props[f.name].get("description") for f in dataclasses.fields(cls)} == \
        {f.name: docs[f.name] for f in dataclasses.fields(cls)}
