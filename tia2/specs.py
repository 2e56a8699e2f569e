"""Reward specs: small expressions naming a reward, used on the CLI, in configs and as the
`reward` column of the metric tables.

    NAME                                  a reward model's raw score (NAME@VERSION picks a version)
    textnorm(SPEC, tau=T)                 TextNorm (TextNorm paper eq. 1) over the caption's contrast
                                          set; contrast=METHOD picks the set (default: dataset)
    mean(SPEC, SPEC, ...)                 mean ensemble (eq. 2)
    ur(SPEC, SPEC, ..., lam=L)            uncertainty-regularised ensemble (eq. 3)

Parsed by a small recursive-descent parser (never eval); `str(spec)` is the canonical form with
normalised whitespace and every parameter spelled out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tia2.errors import UserError


class _SpecNode:
    """What every kind of spec offers."""

    def models(self) -> set[Model]:
        """The reward models the spec reads."""
        return set(scores_needed([self]))


@dataclass(frozen=True)
class Model(_SpecNode):
    name: str
    version: str | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"

    def version_among(self, versions: Sequence[str], built: bool = False) -> str:
        """The version this name means among `versions` (not empty): those of the model's stored
        scores, or (built) the one of the model built here. The pinned one (NAME@VERSION), else
        the only one."""
        what, where = ("build", "built here") if built else ("scores", "stored")
        if self.version is not None:
            if self.version not in versions:
                raise UserError(f"reward model {self.name!r} has no {what} of version {self.version!r} "
                                f"({where}: {', '.join(versions)})")
            return self.version
        if len(versions) > 1:
            raise UserError(f"reward model {self.name!r} has {what} of several versions "
                            f"({', '.join(versions)}): write {self.name}@VERSION")
        return versions[0]


@dataclass(frozen=True)
class TextNorm(_SpecNode):
    inner: Spec
    tau: float
    contrast: str = "dataset"

    def __str__(self) -> str:
        extra = "" if self.contrast == "dataset" else f", contrast={self.contrast}"
        return f"textnorm({self.inner}, tau={_num(self.tau)}{extra})"


@dataclass(frozen=True)
class Mean(_SpecNode):
    parts: tuple[Spec, ...]

    def __str__(self) -> str:
        return f"mean({', '.join(map(str, self.parts))})"


@dataclass(frozen=True)
class UncertaintyRegularized(_SpecNode):
    parts: tuple[Spec, ...]
    lam: float

    def __str__(self) -> str:
        return f"ur({', '.join(map(str, self.parts))}, lam={_num(self.lam)})"


Spec = Model | TextNorm | Mean | UncertaintyRegularized


def scores_needed(specs: Iterable[Spec]) -> dict[Model, set[str | None]]:
    """Each reward model the specs read, with the contrast methods whose scores they need: a model
    inside textnorm(..., contrast=METHOD) needs METHOD (and its caption's score), one elsewhere
    None (its caption's score only)."""
    needs: dict[Model, set[str | None]] = {}

    def walk(spec: Spec, method: str | None) -> None:
        if isinstance(spec, Model):
            needs.setdefault(spec, set()).add(method)
        elif isinstance(spec, TextNorm):
            walk(spec.inner, spec.contrast)
        else:
            for part in spec.parts:
                walk(part, method)

    for spec in specs:
        walk(spec, None)
    return needs


def _num(x: float) -> str:
    return repr(float(x)).removesuffix(".0") if float(x).is_integer() else repr(float(x))


MAX_NESTING = 50  # far beyond any real spec; deeper would exhaust Python's recursion
_TOKEN = re.compile(r"\s*(?:(?P<word>[A-Za-z0-9_.\-/@:+]+)|(?P<punct>[(),=])|(?P<bad>\S))")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []  # (kind, value, column)
        for m in _TOKEN.finditer(text):
            if m.group("bad"):
                self.fail(f"unexpected character {m.group('bad')!r}", m.start("bad"))
            kind = "word" if m.group("word") else "punct"
            self.tokens.append((kind, m.group(kind), m.start(kind)))
        self.pos = 0
        self.depth = 0  # functions open at the current token

    def fail(self, message: str, column: int | None = None):
        if column is None:
            column = self.tokens[self.pos][2] if self.pos < len(self.tokens) else len(self.text)
        shown = self.text if len(self.text) <= 120 else self.text[:120] + "..."  # one readable line
        raise UserError(f"bad reward spec {shown!r}: {message} (at column {column + 1})")

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str, int]:
        tok = self.peek()
        if tok is None:
            self.fail(f"expected {value!r}" if value else "unexpected end", len(self.text))
        if value is not None and tok[1] != value:
            self.fail(f"expected {value!r}, found {tok[1]!r}")
        self.pos += 1
        return tok

    def spec(self) -> Spec:
        kind, word, column = self.take()
        if kind != "word":
            self.fail(f"expected a reward model name or function, found {word!r}", column)
        nxt = self.peek()
        if nxt is None or nxt[1] != "(":
            name, _, version = word.partition("@")
            if not name or (_ and not version):
                self.fail(f"bad model name {word!r}", column)
            return Model(name, version or None)
        if word not in _FUNCTIONS:
            self.fail(f"unknown function {word!r} (known: {', '.join(sorted(_FUNCTIONS))})", column)
        self.depth += 1
        if self.depth > MAX_NESTING:
            self.fail(f"nested more than {MAX_NESTING} functions deep", column)
        self.take("(")
        positional, keywords = [], {}
        while True:
            tok = self.peek()
            if tok is None:
                self.fail(f"unbalanced parentheses: {word}( is never closed", len(self.text))
            if tok[0] == "word" and self.pos + 1 < len(self.tokens) and self.tokens[self.pos + 1][1] == "=":
                self.pos += 2
                val = self.take()
                if tok[1] in keywords:
                    self.fail(f"{tok[1]} given twice", tok[2])
                keywords[tok[1]] = (val[1], val[2])
            else:
                if keywords:
                    self.fail("a spec cannot follow a keyword argument", tok[2])
                positional.append(self.spec())
            if self.peek() is None:
                self.fail(f"unbalanced parentheses: {word}( is never closed", len(self.text))
            separator = self.take()
            if separator[1] == ")":
                break
            if separator[1] != ",":
                self.fail("expected ',' or ')'", separator[2])
        self.depth -= 1
        return _FUNCTIONS[word](self, word, column, positional, keywords)

    def number(self, fn: str, name: str, raw: tuple[str, int], *, positive: bool) -> float:
        value, column = raw
        try:
            x = float(value)
        except ValueError:
            self.fail(f"{fn}: {name} must be a number, got {value!r}", column)
        if not math.isfinite(x) or (x <= 0 if positive else x < 0):
            self.fail(f"{fn}: {name} must be {'> 0' if positive else '>= 0'}, got {value}", column)
        return x


def _check_keywords(p: _Parser, fn: str, keywords: dict, allowed: set[str], column: int) -> None:
    unknown = set(keywords) - allowed
    if unknown:
        name = sorted(unknown)[0]
        p.fail(f"{fn}() has no parameter {name!r} (allowed: {', '.join(sorted(allowed))})",
               keywords[name][1])


def _textnorm(p: _Parser, fn, column, positional, keywords) -> Spec:
    _check_keywords(p, fn, keywords, {"tau", "contrast"}, column)
    if len(positional) != 1:
        p.fail(f"textnorm() takes exactly one spec, got {len(positional)}", column)
    if "tau" not in keywords:  # no default: the best tau differs by orders of magnitude between models
        p.fail("textnorm() needs tau=T, its temperature (tia2 tune finds the best)", column)
    tau = p.number(fn, "tau", keywords["tau"], positive=True)
    contrast = keywords.get("contrast", ("dataset", 0))[0]
    return TextNorm(positional[0], tau, contrast)


def _ensemble(kind):
    def build(p: _Parser, fn, column, positional, keywords) -> Spec:
        allowed = {"lam"} if kind is UncertaintyRegularized else set()
        _check_keywords(p, fn, keywords, allowed, column)
        if len(positional) < 2:
            p.fail(f"{fn}() needs at least two specs, got {len(positional)}", column)
        if kind is Mean:
            return Mean(tuple(positional))
        lam = p.number(fn, "lam", keywords["lam"], positive=False) if "lam" in keywords else 1.0
        return UncertaintyRegularized(tuple(positional), lam)

    return build


_FUNCTIONS = {"textnorm": _textnorm, "mean": _ensemble(Mean), "ur": _ensemble(UncertaintyRegularized)}


def parse_spec(text: str) -> Spec:
    """Parse a reward spec; raises UserError naming the problem and its column."""
    parser = _Parser(text)
    if not parser.tokens:
        raise UserError("bad reward spec: it is empty")
    spec = parser.spec()
    if parser.peek() is not None:
        tok = parser.peek()
        if tok[1] == ")":
            parser.fail("unbalanced parentheses: unexpected ')'")
        parser.fail(f"unexpected {tok[1]!r} after the end of the spec")
    return spec
