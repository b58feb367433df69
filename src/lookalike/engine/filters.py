"""``where`` expressions on listing attributes: a small, safe grammar (never ``eval``).

Grammar (keywords case-insensitive)::

    expr       := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | "(" expr ")" | comparison
    comparison := NAME op literal
                | NAME ["not"] "in" "(" literal ("," literal)* ")"
                | NAME "is" ["not"] "null"
    op         := "=" | "==" | "!=" | "<>" | "<" | "<=" | ">" | ">="
    literal    := NUMBER | 'string' | "string" | true | false
    NAME       := [A-Za-z_][A-Za-z0-9_.-]*

``NAME`` is a listing attribute (``stock_level``, ``etag``, any free attribute) or
``listing_id``. Examples: ``stock_level > 0``, ``color = 'red' and price <= 20000``,
``listing_id in ('truck-17', 'truck-18')``, ``not (stock_level is null)``.

Limits: an expression is at most :data:`MAX_WHERE_LENGTH` characters and nests at most
:data:`MAX_WHERE_DEPTH` levels (each ``(`` and each ``not`` is one level), so no input can
exhaust the parser's stack or time; past them :func:`parse_where` raises ``QueryError``.

Semantics: a comparison with a missing attribute (or one of another type: a number compared
with a string that does not parse as a number) is false; ``not`` negates the result of its
operand. Numbers compare numerically (a string attribute such as ``"12"`` is read as 12 when
compared with a number); text compares with text, ``true``/``false`` with bools
(:mod:`lookalike.engine.columns` gives the details). Expressions are evaluated as vectorized
masks over the listing table's typed columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import QueryError
from .columns import ColumnReader

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<number>[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?))
      | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<op><=|>=|!=|<>|==|=|<|>)
      | (?P<punct>[(),])
      | (?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)
    )""",
    re.VERBOSE,
)

#: Longest ``where`` expression accepted, in characters.
MAX_WHERE_LENGTH = 4096
#: Deepest nesting accepted: parentheses and ``not`` count one level each.
MAX_WHERE_DEPTH = 32

_KEYWORDS = {"and", "or", "not", "in", "is", "null", "true", "false"}


class Columns(Protocol):
    """Where expressions read attribute columns through this (see ``ListingTable``)."""

    def attribute(self, name: str) -> ColumnReader:
        """The typed column of attribute ``name`` (``listing_id`` included)."""
        ...

    def __len__(self) -> int: ...


class Expr:
    """A parsed expression; :meth:`mask` evaluates it for every listing at once."""

    def mask(self, table: Columns) -> np.ndarray:  # pragma: no cover - abstract
        """``(n_listings,) bool``: True where the listing satisfies the expression (vectorized
        over the table's typed columns, :mod:`lookalike.engine.columns`)."""
        raise NotImplementedError

    def names(self) -> set[str]:  # pragma: no cover - abstract
        """Attribute names the expression reads."""
        raise NotImplementedError


@dataclass(frozen=True)
class Compare(Expr):
    """``name op literal``."""

    name: str
    op: str
    value: Any

    def mask(self, table: Columns) -> np.ndarray:
        """``(n_listings,) bool`` (see :meth:`Expr.mask`)."""
        return table.attribute(self.name).compare(self.op, self.value, len(table))

    def names(self) -> set[str]:
        """Attribute names read (see :meth:`Expr.names`)."""
        return {self.name}


@dataclass(frozen=True)
class In(Expr):
    """``name in (v1, v2, ...)``."""

    name: str
    values: tuple[Any, ...]

    def mask(self, table: Columns) -> np.ndarray:
        """``(n_listings,) bool`` (see :meth:`Expr.mask`)."""
        return table.attribute(self.name).equal_any(self.values, len(table))

    def names(self) -> set[str]:
        """Attribute names read (see :meth:`Expr.names`)."""
        return {self.name}


@dataclass(frozen=True)
class IsNull(Expr):
    """``name is null``."""

    name: str

    def mask(self, table: Columns) -> np.ndarray:
        """``(n_listings,) bool`` (see :meth:`Expr.mask`)."""
        return table.attribute(self.name).is_null(len(table))

    def names(self) -> set[str]:
        """Attribute names read (see :meth:`Expr.names`)."""
        return {self.name}


@dataclass(frozen=True)
class Not(Expr):
    """``not expr``."""

    inner: Expr

    def mask(self, table: Columns) -> np.ndarray:
        """``(n_listings,) bool`` (see :meth:`Expr.mask`)."""
        return ~self.inner.mask(table)

    def names(self) -> set[str]:
        """Attribute names read (see :meth:`Expr.names`)."""
        return self.inner.names()


@dataclass(frozen=True)
class BoolOp(Expr):
    """``a and b and ...`` / ``a or b or ...``."""

    op: str
    parts: tuple[Expr, ...]

    def mask(self, table: Columns) -> np.ndarray:
        """``(n_listings,) bool`` (see :meth:`Expr.mask`)."""
        masks = [p.mask(table) for p in self.parts]
        combine = np.logical_and if self.op == "and" else np.logical_or
        return combine.reduce(masks)

    def names(self) -> set[str]:
        """Attribute names read (see :meth:`Expr.names`)."""
        return set().union(*(p.names() for p in self.parts))


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                col = pos + (len(text[pos:]) - len(text[pos:].lstrip()))
                raise QueryError(f"where: unexpected character {text[col]!r} at column {col + 1}")
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind), m.start(kind)))
            pos = m.end()
        self.i = 0
        self.depth = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def error(self, what: str) -> QueryError:
        tok = self.peek()
        where = f"at column {tok[2] + 1} ({tok[1][:40]!r})" if tok else "at the end"
        shown = self.text if len(self.text) <= 200 else self.text[:200] + "..."
        return QueryError(f"where: {what} {where} in {shown!r}")

    def keyword(self, word: str) -> bool:
        tok = self.peek()
        if tok and tok[0] == "name" and tok[1].lower() == word:
            self.i += 1
            return True
        return False

    def punct(self, ch: str) -> bool:
        tok = self.peek()
        if tok and tok[0] == "punct" and tok[1] == ch:
            self.i += 1
            return True
        return False

    def parse(self) -> Expr:
        if not self.tokens:
            raise QueryError("where: empty expression")
        expr = self.or_expr()
        if self.peek() is not None:
            raise self.error("unexpected token")
        return expr

    def or_expr(self) -> Expr:
        parts = [self.and_expr()]
        while self.keyword("or"):
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else BoolOp("or", tuple(parts))

    def and_expr(self) -> Expr:
        parts = [self.not_expr()]
        while self.keyword("and"):
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else BoolOp("and", tuple(parts))

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_WHERE_DEPTH:
            tok = self.tokens[self.i - 1]
            raise QueryError(
                f"where: nested deeper than {MAX_WHERE_DEPTH} levels (each '(' and 'not' is"
                f" one) at column {tok[2] + 1}"
            )

    def not_expr(self) -> Expr:
        if self.keyword("not"):
            self.enter()
            inner = self.not_expr()
            self.depth -= 1
            return Not(inner)
        if self.punct("("):
            self.enter()
            inner = self.or_expr()
            if not self.punct(")"):
                raise self.error("expected ')'")
            self.depth -= 1
            return inner
        return self.comparison()

    def literal(self) -> Any:
        tok = self.peek()
        if tok is None:
            raise self.error("expected a value")
        kind, text, _ = tok
        if kind == "number":
            self.i += 1
            value = float(text)
            return int(value) if value.is_integer() and re.fullmatch(r"[-+]?\d+", text) else value
        if kind == "string":
            self.i += 1
            return re.sub(r"\\(.)", r"\1", text[1:-1])
        if kind == "name" and text.lower() in ("true", "false"):
            self.i += 1
            return text.lower() == "true"
        raise self.error("expected a number, a quoted string, true or false")

    def comparison(self) -> Expr:
        tok = self.peek()
        if tok is None or tok[0] != "name" or tok[1].lower() in _KEYWORDS:
            raise self.error("expected an attribute name")
        name = tok[1]
        self.i += 1
        if self.keyword("is"):
            negate = self.keyword("not")
            if not self.keyword("null"):
                raise self.error("expected 'null'")
            expr: Expr = IsNull(name)
            return Not(expr) if negate else expr
        negate = self.keyword("not")
        if self.keyword("in"):
            if not self.punct("("):
                raise self.error("expected '('")
            values = [self.literal()]
            while self.punct(","):
                values.append(self.literal())
            if not self.punct(")"):
                raise self.error("expected ')'")
            expr = In(name, tuple(values))
            return Not(expr) if negate else expr
        if negate:
            raise self.error("expected 'in'")
        op = self.peek()
        if op is None or op[0] != "op":
            raise self.error("expected a comparison operator (=, !=, <, <=, >, >=)")
        self.i += 1
        return Compare(name, op[1], self.literal())


def parse_where(text: str) -> Expr:
    """Parse a ``where`` expression (grammar and limits in the module docstring).

    Raises:
        QueryError: syntax error, naming the column and the offending token; not a string;
            longer than :data:`MAX_WHERE_LENGTH` characters or nested deeper than
            :data:`MAX_WHERE_DEPTH` levels. No other exception escapes for any string.
    """
    if not isinstance(text, str):
        raise QueryError(f"where: expected a string, got {type(text).__name__}")
    if len(text) > MAX_WHERE_LENGTH:
        raise QueryError(
            f"where: expression is {len(text)} characters long; the limit is {MAX_WHERE_LENGTH}"
        )
    return _Parser(text).parse()
