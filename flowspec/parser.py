"""Text -> Lark parse tree -> raw document (`RawDict`s that remember where everything was written).

The only module that knows Lark. Syntax errors are collected with a simple recovery (blank out the
offending token and parse again), so one run reports every independent mistake of a file.
"""

from __future__ import annotations

import functools
import math
import re
from importlib import resources
from typing import Any, get_args

from lark import Lark, Token, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr
from lark.visitors import Transformer_NonRecursive

from flowspec.diagnostics import CONTROL, Diagnostic, SpecError, did_you_mean
from flowspec.document import Call, RawDict, SettingError, Word, convert, interval, placed
from flowspec.nodes import SourceLoc
from flowspec.steps import KINDS
from flowspec.steps.split import Mask

MAX_SYNTAX_ERRORS = 10
MAX_NESTING = 32  # split/repeat blocks inside each other
MAX_BRACKETS = 64  # brackets of any kind inside each other (values: tuples inside tuples)
MAX_DIGITS = 64  # digits in a row: no setting needs a longer number

# section keyword as written -> key in the raw document (the spec's field name)
SECTION_KEYS = {"model": "name"}
SECTION_NAMES = {"name": "model"}
#: the words that start a section (the grammar's `_section` rules)
_SECTION_WORDS = ("extends", "model", "target_params", "data", "preprocess", "defaults", "dequantize", "flow")
_SECTION_WORDS += ("prior", "train", "eval")

_DESCRIBE = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": 'a quoted string ("...")',
    "DIMS": "a shape (CxHxW)",
    "$END": "end of file",
}


class Args(RawDict):
    """Settings written in parentheses, `(key=value, ...)`: told apart from a step's dict by type, since
    a user may write any key, `kind` included."""


class _WholeWords:
    """Lark post-lexer that lets every parser state lex a NAME, so keywords only match whole words."""

    always_accept = ("NAME",)

    def process(self, stream):
        return stream


@functools.cache
def _lark() -> Lark:
    grammar = resources.files("flowspec").joinpath("grammar", "flowspec.lark").read_text(encoding="utf-8")
    return Lark(
        grammar,
        parser="lalr",
        start=["start", "override_value"],
        propagate_positions=True,
        maybe_placeholders=True,
        postlex=_WholeWords(),
    )


def parse_document(text: str, file: str) -> RawDict:
    """Parse a whole `.flow` text into its raw document.

    Syntax errors raise `SpecError`. Mistakes that leave the document readable (a duplicated setting, a
    value that cannot mean anything) are dropped from it and listed in `doc.problems`, so that later
    stages can report them together with their own.
    """
    tree = _parse(text, file, "start")
    builder = _Builder(file, text)
    doc = builder.transform(tree)
    doc.problems = builder.diagnostics
    return doc


def parse_value(text: str, file: str, line: int, col: int) -> Any:
    """Parse the value of a `--set` override (`1e-3`, `off`, `(dog, cat)`, `100 steps`, ...).

    `line` and `col` say where `text` starts in `file`, for error messages.
    """
    padded = "\n" * (line - 1) + " " * (col - 1) + text
    tree = _parse(padded, file, "override_value")
    builder = _Builder(file, padded)
    value = builder.transform(tree).children[0]
    if builder.diagnostics:
        raise SpecError(builder.diagnostics)
    return value


# ---------------------------------------------------------------- syntax errors


def _parse(text: str, file: str, start: str):
    _check_limits(text, file)
    diagnostics: list[Diagnostic] = []
    work = text
    for _ in range(4 * MAX_SYNTAX_ERRORS):
        try:
            tree = _lark().parse(work, start=start)
        except UnexpectedInput as error:
            diagnostic, repair = _describe(error, work, file)
            previous = diagnostics[-1].loc if diagnostics else None
            # an error on the line of the previous one is most likely its consequence: skip it silently
            if previous is None or diagnostic.loc is None or diagnostic.loc.line > previous.line:
                diagnostics.append(diagnostic)
            if repair is None or len(diagnostics) >= MAX_SYNTAX_ERRORS:
                break
            (begin, end), word = repair  # padded: the columns after it stay where they were
            work = work[:begin] + word.ljust(end - begin) + work[end:]
            continue
        if not diagnostics:
            return tree
        break
    raise SpecError(diagnostics, {file: text})


def _check_limits(text: str, file: str) -> None:
    """Refuse what no spec needs and later stages could not take: brackets nested deeper than
    `MAX_BRACKETS` (recursion), numbers with more than `MAX_DIGITS` digits in a row (integer conversion
    limits) or too large for a float. Comments and strings are skipped; the error points at the
    offending bracket or number."""
    depth = 0
    for match in _LIMITED.finditer(text):
        token = match[0]
        if token in ("(", "{", "["):
            depth += 1
            if depth > MAX_BRACKETS:
                _refuse(text, file, match.start(), f"brackets nested more than {MAX_BRACKETS} deep")
        elif token in (")", "}", "]"):
            depth = max(0, depth - 1)
        elif token[0].isdigit() or token[0] == ".":
            digits = max(len(run) for run in re.findall(r"[0-9]+", token.replace("_", "")))
            if digits > MAX_DIGITS:
                _refuse(text, file, match.start(), f"a number with {digits:,} digits: at most {MAX_DIGITS}")
            if "x" not in token and not math.isfinite(float(token.replace("_", ""))):
                _refuse(text, file, match.start(), f"the number {token} is too large")


# comments and strings (skipped), words (skipped), numbers and shapes, brackets
_LIMITED = re.compile(
    r'#[^\n]*|"[^"\n]*"?|[A-Za-z_][A-Za-z0-9_]*|[(){}\[\]]'
    r"|(?:[0-9][0-9_]*(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?(?:x[0-9]+)*"
)


def _refuse(text: str, file: str, pos: int, message: str) -> None:
    raise SpecError([Diagnostic(_loc_at(text, file, pos), message)], {file: text})


def _loc_at(text: str, file: str, pos: int) -> SourceLoc:
    line = text.count("\n", 0, pos) + 1
    return SourceLoc(file=file, line=line, col=pos - (text.rfind("\n", 0, pos) + 1) + 1)


Repair = tuple[tuple[int, int], str]  # a span of the text and the word that replaces it


def _describe(error: UnexpectedInput, text: str, file: str) -> tuple[Diagnostic, Repair | None]:
    """A diagnostic for a Lark error, and how to repair the text to look for further errors: only a
    misspelled keyword is repaired (replaced by the one it resembles). After any other mistake, a missing
    or extra bracket, comma or word, what follows would be read out of place and its errors would be
    consequences, not mistakes of their own (None: stop there)."""
    if isinstance(error, UnexpectedCharacters):
        char = text[error.pos_in_stream]
        loc = SourceLoc(file=file, line=error.line, col=error.column)
        message = f"unexpected character {char!r}"
        after_word = char == "." and error.pos_in_stream > 0 and text[error.pos_in_stream - 1].isalnum()
        if char in "/\\~" or after_word:  # a path or file name (`data.npz`) left unquoted
            message += '; paths and other text are written in quotes: "..."'
        return Diagnostic(loc, message), None
    if isinstance(error, UnexpectedEOF) or (
        isinstance(error, UnexpectedToken) and error.token.type == "$END"
    ):
        parser = getattr(error, "interactive_parser", None)
        expected = parser.accepts() if parser else getattr(error, "expected", set())
        return Diagnostic(_end_loc(text, file), f"unexpected end of file{_expected(expected)}"), None
    assert isinstance(error, UnexpectedToken)
    token = error.token
    loc = SourceLoc(file=file, line=token.line, col=token.column)
    expected = error.interactive_parser.accepts() if error.interactive_parser else error.expected
    unexpected = f"unexpected '{token}'"
    if re.fullmatch(r"[A-Za-z_]\w*", token):
        hint = did_you_mean(token, _expected_words(expected))
        meant = re.fullmatch(r"; did you mean '(\w+)'\?", hint)
        if meant:  # a misspelled keyword: read on as if it were spelled right
            return Diagnostic(loc, unexpected + hint), ((token.start_pos, token.end_pos), meant[1])
    previous = re.search(r"(\w+)\s*$", text[: token.start_pos])
    return Diagnostic(loc, unexpected + _hint(str(token), previous[1] if previous else "", expected)), None


def _hint(token: str, previous: str, expected: set[str]) -> str:
    """What to say after `unexpected 'TOKEN'`, knowing the word before it and what the parser expected."""
    if "RBRACE" in expected and token in _SECTION_WORDS:
        return ": a '}' is missing before it (a section above is not closed)"
    if previous == "split" and "NAME" in expected:
        return f"; expected the mask after 'split': {', '.join(get_args(Mask))}"
    if previous == "eval" and token == "every":
        return ": `eval every N steps` goes in the train section (a top-level `eval { ... }` sets evaluation)"
    return _expected(expected)


def _end_loc(text: str, file: str) -> SourceLoc:
    """Just after the last character written (where something is missing)."""
    written = text.rstrip() or text
    return SourceLoc(file=file, line=written.count("\n") + 1, col=len(written) - written.rfind("\n"))


def _literal(name: str) -> str | None:
    """The text of a literal terminal (`POINTWISE` -> pointwise, `LBRACE` -> {); None for the others."""
    terminal = next((t for t in _lark().terminals if t.name == name), None)
    return terminal.pattern.value if terminal and isinstance(terminal.pattern, PatternStr) else None


def _expected_words(expected: set[str]) -> list[str]:
    """The keywords the parser would have accepted."""
    return sorted({w for w in map(_literal, expected) if w and w.isidentifier()})


def _expected(expected: set[str]) -> str:
    """`; expected one of ...`: the literals the parser would have accepted, then the kinds of value."""
    literals = sorted(f"'{w}'" for w in map(_literal, expected) if w)
    kinds = sorted(_DESCRIBE[name] for name in expected if name in _DESCRIBE)
    shown = literals + kinds
    if not shown:
        return ""
    return "; expected " + (shown[0] if len(shown) == 1 else "one of " + ", ".join(shown))


# ---------------------------------------------------------------- parse tree -> raw document


def _number(text: str) -> int | float:
    text = text.replace("_", "")
    return int(text) if re.fullmatch(r"[+-]?[0-9]+", text) else float(text)


@v_args(meta=True)
class _Builder(Transformer_NonRecursive):
    """Builds the raw document, noting duplicated sections and settings and meaningless values."""

    def __init__(self, file: str, text: str):
        super().__init__()
        self.file = file
        self.text = text
        self.diagnostics: list[Diagnostic] = []

    def _loc(self, meta_or_token: Any) -> SourceLoc:
        return SourceLoc(file=self.file, line=meta_or_token.line, col=meta_or_token.column)

    def _error(self, loc: SourceLoc, message: str) -> None:
        self.diagnostics.append(Diagnostic(loc, message))

    def _set(self, target: RawDict, section: str, key: str, value: Any, loc: SourceLoc, what: str) -> None:
        """Apply `key value` to `target`, noting a duplicate or a value that cannot mean anything."""
        try:
            fields = convert(section, key, value)
        except SettingError as error:
            self._error(loc, str(error))
            return
        for field, field_value, where in placed(fields, loc):
            if field in target and where is not None and target.locs.get(field) is not None:
                first = target.locs[field]
                written = key.replace("_every", " every")  # `eval every`, `save every`
                self._error(loc, f"duplicate setting '{written}' in {what} (first set at line {first.line})")
                return
            target.put(field, field_value, where)

    # values ------------------------------------------------------------

    def number(self, meta, children):
        return _number(children[0])

    def word(self, meta, children):
        return Word(children[0])

    def string(self, meta, children):
        text = str(children[0][1:-1])
        control = CONTROL.search(text)  # a file's carriage return ends its line: `show` could not write it
        if control:
            loc = SourceLoc(file=self.file, line=meta.line, col=meta.column + 1 + control.start())
            self._error(loc, f"a quoted string cannot hold a control character, got {control.group()!r}")
        return text

    def dims(self, meta, children):
        return tuple(int(d) for d in children[0].split("x"))

    def interval(self, meta, children):
        return interval(_number(children[0]), children[1])

    def call(self, meta, children):
        return Call(str(children[0]), children[1])

    def tuple(self, meta, children):
        return tuple(c for c in children if c is not None)

    def arg(self, meta, children):
        return children[0], children[1]

    def args(self, meta, children):
        out = Args(self._loc(meta))
        for arg in children:
            if arg is None:
                continue
            name, value = arg
            if name in out:
                self._error(
                    self._loc(name), f"duplicate setting '{name}' (first set at column {out.locs[name].col})"
                )
                continue
            out.put(str(name), value, self._loc(name))
        return out

    # steps --------------------------------------------------------------

    def __default__(self, data, children, meta):
        """A step: its rule is named as its kind (`flowspec.steps`); other rules keep their tree."""
        kind = KINDS.get(str(data))
        if kind is None:
            return super().__default__(data, children, meta)
        step = self._step(meta, kind.name)
        count = len(kind.positional)
        for name, value in zip(kind.positional, children[:count], strict=True):
            if isinstance(value, Tree):  # a rule of literal alternatives: its word
                value = value.children[0]
            if isinstance(value, Token):
                step.put(name, Word(value), self._loc(value))
            elif value is not None:
                step.put(name, value, step.loc)
        rest = children[count:]
        args = rest[0] if rest and isinstance(rest[0], Args) else None
        for key, value in (args or {}).items():
            if key in ("kind", "source"):
                self._error(args.locs[key], f"unknown setting '{key}' of {kind.name}")
                continue
            step.put(key, value, args.locs[key])
        if kind.body:
            self._block(step, [c for c in rest if isinstance(c, RawDict) and not isinstance(c, Args)])
        return step

    def _step(self, meta, kind: str) -> RawDict:
        loc = self._loc(meta)
        step = RawDict(loc, kind=kind)
        step.put("source", loc, loc)
        return step

    def _body(self, children) -> list:
        return [c for c in children if isinstance(c, RawDict)]

    def _block(self, step: RawDict, body: list[RawDict]) -> None:
        """Give a split or repeat its body, refusing absurd nesting (later stages recurse through it)."""
        step.depth = 1 + max((getattr(s, "depth", 0) for s in body), default=0)
        if step.depth > MAX_NESTING:
            if not any(d.message.startswith("blocks nested") for d in self.diagnostics):
                self._error(step.loc, f"blocks nested more than {MAX_NESTING} deep")
            body, step.depth = [], 1
        step.put("body", body, step.loc)

    # sections -----------------------------------------------------------

    def extends(self, meta, children):
        return "extends", str(children[0][1:-1]), self._loc(meta)

    def model(self, meta, children):
        return "name", str(children[0]), self._loc(meta)

    def target_params(self, meta, children):
        return "target_params", children[0], self._loc(meta)

    def prior(self, meta, children):
        return "prior", Word(children[0]), self._loc(meta)

    def preprocess(self, meta, children):
        name, args = children
        out = RawDict(self._loc(meta))
        out.put("kind", Word(name), self._loc(name))
        for key, value in (args or {}).items():
            if key == "kind":
                self._error(args.locs[key], "unknown setting 'kind' of preprocess")
                continue
            out.put(key, value, args.locs[key])
        return "preprocess", out, out.loc

    def data_setting(self, meta, children):
        return str(children[0]), children[1], self._loc(meta)

    def data(self, meta, children):
        out = RawDict(self._loc(meta))
        for child in children:
            if isinstance(child, Token):
                out.put("dataset", Word(child), self._loc(child))
            elif child is not None:
                key, value, loc = child
                self._set(out, "data", key, value, loc, "data")
        return "data", out, out.loc

    def defaults(self, meta, children):
        out = RawDict(self._loc(meta))
        for step in children:
            kind = step["kind"]
            if kind in out:
                first = out.locs[kind]
                self._error(step.loc, f"duplicate '{kind}' in defaults (first set at line {first.line})")
                continue
            if kind == "norm":
                if "granularity" not in step:
                    self._error(
                        step.loc, "`norm` in defaults needs a granularity: `norm element` or `norm channel`"
                    )
                    continue
                out.put("norm", step["granularity"], step.loc)
            else:
                settings = RawDict(step.loc)
                for key, value in step.items():
                    if key not in ("kind", "source"):
                        settings.put(key, value, step.locs[key])
                out.put("coupling", settings, step.loc)
        return "defaults", out, out.loc

    def context(self, meta, children):
        return children[0]

    def dequantize(self, meta, children):
        name = children[0]
        out = RawDict(self._loc(meta))
        out.put("kind", Word(name), self._loc(name))
        rest = self.text[name.end_pos : meta.end_pos]
        if "{" in rest:
            context = next((c for c in children[1:] if isinstance(c, Args)), None)
            if context is not None:
                out.put("context", context, context.loc)
            steps = [c for c in children[1:] if isinstance(c, RawDict) and not isinstance(c, Args)]
            if steps or context is None:  # `{ }` writes no steps; `{ context(...) }` writes only a context
                out.put("steps", steps, out.loc)
        return "dequantize", out, out.loc

    def flow(self, meta, children):
        return "flow", self._body(children), self._loc(meta)

    def optimizer(self, meta, children):
        name, args = children
        value = Word(name) if args is None else Call(str(name), args)
        return "optimizer", value, self._loc(meta)

    def warmup(self, meta, children):
        loc = self._loc(meta)
        out = [("warmup", children[0], loc)]
        if children[1] is not None:
            out.append(("schedule", children[1], loc))
            out.append(("rewarm_at", children[2] if children[2] is not None else Word("off"), loc))
        return out

    def eval_every(self, meta, children):
        return "eval_every", children[0], self._loc(meta)

    def save_every(self, meta, children):
        return "save_every", children[0], self._loc(meta)

    def train_setting(self, meta, children):
        return str(children[0]), children[1], self._loc(meta)

    def train(self, meta, children):
        out = RawDict(self._loc(meta))
        for child in children:
            for key, value, loc in child if isinstance(child, list) else [child]:
                self._set(out, "train", key, value, loc, "train")
        return "train", out, out.loc

    def eval_setting(self, meta, children):
        return str(children[0]), children[1], self._loc(meta)

    def evaluation(self, meta, children):
        out = RawDict(self._loc(meta))
        for key, value, loc in children:
            self._set(out, "eval", key, value, loc, "eval")
        return "eval", out, out.loc

    def start(self, meta, children):
        doc = RawDict(SourceLoc(file=self.file, line=1, col=1))
        for key, value, loc in children:
            if key in doc:
                name = SECTION_NAMES.get(key, key)
                self._error(loc, f"duplicate section '{name}' (first at line {doc.locs[key].line})")
                continue
            doc.put(key, value, loc)
        return doc
