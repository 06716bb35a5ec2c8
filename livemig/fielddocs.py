"""The doc comments of a dataclass's fields, read from its source, as Sphinx reads them: `#: text`
on the lines just above a field, or after it on its own line (that one first, where there are both).

Options (options.py) and the reports (report.py) document every field so, and a unit test holds
them to it; the JSON Schemas give each report field's text as its description (contract.py).
"""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize

_MARK = "#:"


def _said(comment: str) -> str:
    """A doc comment's text: after the mark and one space, as Sphinx takes it."""
    return comment.strip()[len(_MARK):].removeprefix(" ")


def field_docs(cls: type) -> dict[str, str]:
    """Each field of cls (its annotated names, in its own body) that has a doc comment: its
    text, the lines of one above the field joined by spaces."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    docs: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        after = comments.get(stmt.end_lineno or stmt.lineno, "")     # on the field's (last) line, after it
        if after.startswith(_MARK):
            docs[stmt.target.id] = _said(after)
            continue
        above: list[str] = []
        n = stmt.lineno - 1       # the line above the field, counted from 1
        while n >= 1 and lines[n - 1].lstrip().startswith(_MARK):
            above.insert(0, _said(lines[n - 1]))
            n -= 1
        if above:
            docs[stmt.target.id] = " ".join(line for line in above if line)
    return docs
