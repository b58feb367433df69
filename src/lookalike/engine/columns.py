"""Listing attributes as typed columns, and the vectorized comparisons ``where`` reads them with.

A listing attribute may hold values of different types on different listings (``price`` a
number on one listing, the text ``"9000"`` on another), so :class:`AttributeColumn` keeps one
attribute over every listing number in one typed array per kind of value, with a kind code per
listing:

* ``kind (n,) int8``: :data:`MISSING` (unset, or None: the validity mask), :data:`BOOL`,
  :data:`INT`, :data:`FLOAT`, :data:`STR`, or :data:`OTHER` (any other Python object);
* ``ints (n,) int64``, ``floats (n,) float64``, ``flags (n,) bool``: the values of that kind
  (undefined where ``kind`` is another one); an int outside the int64 range is kept as a float;
* ``codes (n,) int32``: text values, dictionary-encoded (``dictionary[code]``; -1 elsewhere).

Comparisons follow ``filters.py`` (and give exactly the masks of its earlier per-object
evaluation, which ``tests/test_filters.py`` checks on random tables):

* with a number: the attribute's number (:func:`as_number`: a bool is 0 or 1, text is parsed
  with Python's ``float``, anything else has none) compared in float64; no number -> False;
* with text: only text values, compared as Python strings (the comparison runs once per
  dictionary entry, not per listing);
* with ``true``/``false``: only bool values.

Columns follow their :class:`~lookalike.engine.cache.ListingTable` incrementally (one listing at
a time or in bulk), and are copied on write once a snapshot shares them (:meth:`copy`). The
dictionary only grows (a snapshot reads a prefix of it) until more than half of it is unused,
then it is rebuilt into new objects.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

MISSING, BOOL, INT, FLOAT, STR, OTHER = range(6)

#: Comparison operators of the ``where`` grammar.
OPS: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq,
    "==": operator.eq,
    "!=": operator.ne,
    "<>": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}

_I64 = (-(2**63), 2**63 - 1)
#: The dictionary is rebuilt when it has more than this many entries and over half are unused.
DICT_REBUILD_MIN = 1024

Mask = npt.NDArray[np.bool_]


class ColumnReader(Protocol):
    """What a ``where`` comparison reads from one attribute over ``n`` listings."""

    def compare(self, op: str, value: Any, n: int) -> Mask:
        """``(n,) bool``: listings whose value satisfies ``value_i op value``."""
        ...

    def equal_any(self, values: Sequence[Any], n: int) -> Mask:
        """``(n,) bool``: listings whose value equals one of ``values``."""
        ...

    def is_null(self, n: int) -> Mask:
        """``(n,) bool``: listings without the attribute."""
        ...


def as_number(value: Any) -> float:
    """The number a comparison with a number literal reads from an attribute value: a bool is
    0 or 1, an int or float itself, text is parsed with ``float`` (``" 12 "``, ``"1e3"``,
    ``"inf"`` parse); NaN (no number) for anything else. An int too large for a float reads as
    +-inf."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            return math.copysign(math.inf, value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def kind_of(value: Any) -> int:
    """The kind code of an attribute value (:data:`MISSING` for None)."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INT if _I64[0] <= value <= _I64[1] else FLOAT
    if isinstance(value, float):
        return FLOAT
    if isinstance(value, str):
        return STR
    return OTHER


class AttributeColumn:
    """One listing attribute in typed arrays (module docstring).

    The arrays cover the listing numbers set so far (:attr:`size`); a listing past them does not
    have the attribute. Every mask method takes the table's length ``n`` (``>= size``) and
    returns ``(n,) bool``.

    Attributes:
        kind: ``(size,) int8`` kind code per listing number.
        dictionary: the text values, ``dictionary[code]``; append-only between rebuilds.
        holders: how many listings have the attribute (a value, even None, is set).
        version: bumped on every change (derived arrays compare it).
    """

    _ARRAYS: tuple[tuple[str, Any, Any], ...] = (
        ("_kind", np.int8, MISSING),
        ("_ints", np.int64, 0),
        ("_floats", np.float64, 0.0),
        ("_flags", np.bool_, False),
        ("_codes", np.int32, -1),
        ("_held", np.bool_, False),
    )

    def __init__(self) -> None:
        self.size = 0
        self._kind = np.zeros(0, dtype=np.int8)
        self._ints = np.zeros(0, dtype=np.int64)
        self._floats = np.zeros(0, dtype=np.float64)
        self._flags = np.zeros(0, dtype=np.bool_)
        self._codes = np.zeros(0, dtype=np.int32)
        self._held = np.zeros(0, dtype=np.bool_)
        self.dictionary: list[str] = []
        self._code_of: dict[str, int] = {}
        self._uses: list[int] = []  # listings using each dictionary entry
        self._unused = 0
        self.holders = 0
        self.version = 0
        self._number: tuple[int, npt.NDArray[np.float64]] | None = None
        self._str_number: npt.NDArray[np.float64] = np.zeros(0, dtype=np.float64)

    @property
    def kind(self) -> npt.NDArray[np.int8]:
        """``(size,) int8`` kind code per listing number."""
        return self._kind[: self.size]

    def copy(self) -> AttributeColumn:
        """A copy whose arrays can change without touching this one (copy-on-write: the
        dictionary is shared, it only grows)."""
        out = copy.copy(self)
        out.__dict__.update({name: getattr(self, name).copy() for name, _, _ in self._ARRAYS})
        out.__dict__["_uses"] = list(self._uses)
        return out

    # ------------------------------------------------------------------ changes

    def _reserve(self, n: int) -> None:
        cap = len(self._kind)
        if n > cap:
            grow = max(n, cap + cap // 2 + 64)
            for name, dtype, fill in self._ARRAYS:
                arr = getattr(self, name)
                new = np.full(grow, fill, dtype=dtype)
                new[: self.size] = arr[: self.size]
                setattr(self, name, new)
        self.size = max(self.size, n)

    def set_many(
        self, numbers: npt.NDArray[np.int64], values: Sequence[Any], held: npt.NDArray[np.bool_]
    ) -> None:
        """Set the attribute of listing ``numbers[i]`` to ``values[i]`` (None: missing).

        Args:
            numbers: ``(m,) int64`` listing numbers, each at most once.
            values: ``m`` values.
            held: ``(m,) bool``: whether each listing has the attribute at all (False: it has
                none, its value is None).
        """
        if not len(numbers):
            return
        self._reserve(int(numbers.max()) + 1)
        kinds = np.fromiter((kind_of(v) for v in values), dtype=np.int8, count=len(values))
        self._release(numbers)
        self.holders += int(np.count_nonzero(held)) - int(np.count_nonzero(self._held[numbers]))
        self._held[numbers] = held
        self._kind[numbers] = kinds
        for kind in np.unique(kinds).tolist():
            at = np.flatnonzero(kinds == kind)
            rows = numbers[at]
            vals = [values[i] for i in at.tolist()]
            if kind == BOOL:
                self._flags[rows] = np.array(vals, dtype=bool)
            elif kind == INT:
                self._ints[rows] = np.array(vals, dtype=np.int64)
            elif kind == FLOAT:
                self._floats[rows] = np.fromiter((as_number(v) for v in vals), np.float64)
            elif kind == STR:
                self._codes[rows] = [self._code(v) for v in vals]
        self.version += 1
        self._maybe_rebuild_dictionary()

    def _code(self, text: str) -> int:
        code = self._code_of.get(text)
        if code is None:
            code = len(self.dictionary)
            self._code_of[text] = code
            self.dictionary.append(text)
            self._uses.append(0)
        elif self._uses[code] == 0:
            self._unused -= 1
        self._uses[code] += 1
        return code

    def _release(self, numbers: npt.NDArray[np.int64]) -> None:
        """Drop the dictionary uses of the current text values of ``numbers``."""
        old = self._codes[numbers]
        old = old[(old >= 0) & (self._kind[numbers] == STR)]
        for code in old.tolist():
            self._uses[code] -= 1
            if self._uses[code] == 0:
                self._unused += 1
        self._codes[numbers] = -1

    def _maybe_rebuild_dictionary(self) -> None:
        """Re-encode the used text values into a new dictionary once over half is unused."""
        if len(self.dictionary) <= DICT_REBUILD_MIN or 2 * self._unused <= len(self.dictionary):
            return
        used = [i for i, u in enumerate(self._uses) if u]
        remap = np.full(len(self.dictionary), -1, dtype=np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        texts = self._kind == STR
        self._codes[texts] = remap[self._codes[texts]]
        self.dictionary = [self.dictionary[i] for i in used]
        self._code_of = {t: i for i, t in enumerate(self.dictionary)}
        self._uses = [self._uses[i] for i in used]
        self._unused = 0
        self._str_number = np.zeros(0, dtype=np.float64)
        self.version += 1

    # ------------------------------------------------------------------ reading

    def number(self) -> npt.NDArray[np.float64]:
        """``(size,) float64``: the number a comparison with a number literal reads from each
        listing (:func:`as_number`), NaN where there is none. Cached until the next change."""
        cached = self._number
        if cached is not None and cached[0] == self.version:
            return cached[1]
        n = self.size
        kind = self._kind[:n]
        out = np.full(n, np.nan)
        for k, values in ((INT, self._ints), (FLOAT, self._floats), (BOOL, self._flags)):
            at = kind == k
            out[at] = values[:n][at]
        texts = kind == STR
        if texts.any():
            out[texts] = self._text_numbers()[self._codes[:n][texts]]
        self._number = (self.version, out)
        return out

    def _text_numbers(self) -> npt.NDArray[np.float64]:
        """``as_number`` of each dictionary entry (parsed once per entry)."""
        have = len(self._str_number)
        entries = self.dictionary[have:]
        if entries:
            new = np.fromiter((as_number(t) for t in entries), np.float64, count=len(entries))
            self._str_number = np.concatenate([self._str_number, new])
        return self._str_number

    def compare(self, op: str, value: Any, n: int) -> Mask:
        """``(n,) bool``: listings whose value satisfies ``value_i op value`` (module
        docstring: numbers numerically, text with text, bools with bools; missing -> False)."""
        fn = OPS[op]
        m = self.size
        if isinstance(value, bool):
            hit = (self._kind[:m] == BOOL) & np.asarray(fn(self._flags[:m], value), dtype=bool)
            return _fit(hit, n)
        if isinstance(value, str):
            return self.text_mask(_text_selector(self.dictionary, self._code_of, op, value), n)
        number = self.number()
        with np.errstate(invalid="ignore"):
            return _fit(~np.isnan(number) & fn(number, float(value)), n)

    def text_mask(self, selected: npt.NDArray[np.bool_], n: int) -> Mask:
        """``(n,) bool``: listings holding text whose dictionary entry is ``selected``."""
        out = np.zeros(n, dtype=bool)
        if selected.any():
            m = self.size
            texts = np.flatnonzero(self._kind[:m] == STR)
            out[texts] = selected[self._codes[texts]]
        return out

    def equal_any(self, values: Sequence[Any], n: int) -> Mask:
        """``(n,) bool``: listings whose value equals one of ``values`` (``name in (...)``)."""
        out = np.zeros(n, dtype=bool)
        texts = [v for v in values if isinstance(v, str)]
        if texts:
            sel = np.zeros(len(self.dictionary), dtype=bool)
            for t in texts:
                code = self._code_of.get(t)
                if code is not None and code < len(sel):
                    sel[code] = True
            out |= self.text_mask(sel, n)
        for v in values:
            if not isinstance(v, str):
                out |= self.compare("=", v, n)
        return out

    def is_null(self, n: int) -> Mask:
        """``(n,) bool``: listings without the attribute (unset, or None)."""
        return _fit(self._kind[: self.size] == MISSING, n, fill=True)


def _fit(mask: Mask, n: int, fill: bool = False) -> Mask:
    """``mask`` extended to ``n`` entries with ``fill`` (listings past a column's size)."""
    if len(mask) >= n:
        return mask[:n]
    out = np.full(n, fill, dtype=bool)
    out[: len(mask)] = mask
    return out


class ListingIdColumn:
    """The ``listing_id`` column of a listing table: every listing holds text, its id, and the
    id's dictionary code is the listing number (no copy of the ids is made).

    Args:
        ids: listing ids by number (append-only: only the first ``n`` of a call are read).
        number_of: listing id -> number (may hold numbers ``>= n``, which are ignored).
    """

    def __init__(self, ids: list[str], number_of: dict[str, int]) -> None:
        self.ids, self.number_of = ids, number_of

    def compare(self, op: str, value: Any, n: int) -> Mask:
        """As :meth:`AttributeColumn.compare`."""
        if isinstance(value, str):
            return _text_selector(self.ids, self.number_of, op, value, n)
        if isinstance(value, bool):  # an id is text, never a bool
            return np.zeros(n, dtype=bool)
        target = float(value)
        return np.fromiter(
            (_number_compare(as_number(x), op, target) for x in self.ids[:n]), bool, count=n
        )

    def equal_any(self, values: Sequence[Any], n: int) -> Mask:
        """As :meth:`AttributeColumn.equal_any`."""
        out = np.zeros(n, dtype=bool)
        for v in values:
            out |= self.compare("=", v, n)
        return out

    def is_null(self, n: int) -> Mask:
        """Never null: ``(n,)`` False."""
        return np.zeros(n, dtype=bool)


def _number_compare(x: float, op: str, value: float) -> bool:
    return not math.isnan(x) and bool(OPS[op](x, value))


def _text_selector(
    entries: list[str], code_of: dict[str, int], op: str, value: str, n: int | None = None
) -> npt.NDArray[np.bool_]:
    """``(len(entries),) bool``: which entries satisfy ``entry op value`` (Python string
    comparison); ``=`` and ``!=`` look the value up instead of comparing every entry."""
    size = len(entries) if n is None else n
    if op in ("=", "==", "!=", "<>"):
        out = np.zeros(size, dtype=bool)
        code = code_of.get(value)
        if code is not None and code < size:
            out[code] = True
        return ~out if op in ("!=", "<>") else out
    fn = OPS[op]
    return np.fromiter((bool(fn(t, value)) for t in entries[:size]), dtype=bool, count=size)
