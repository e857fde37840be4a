"""Text to :class:`~gradspec.dsl.ast.SpecAST`, with Lark and the grammar in ``gradspec.lark``.

Syntax errors become a :class:`SpecError` that names what was found, what could come
there instead, and the most likely fix.
"""
from __future__ import annotations

import functools
import math
import re
from importlib import resources

import lark
from lark import Token, Transformer, v_args
from lark.lexer import LineCounter

from . import ast
from .errors import Diagnostic, Source, Span, SpecError
from .files import strip_bom
from ..recursion import MAX_DEPTH, deep

RESERVED = {"optimizer", "adaptor", "hyper", "state", "require", "import", "as", "if", "else",
            "and", "or", "not", "true", "false", "tensor", "global",
            "law", "equals", "invariant", "fixed_point", "at", "given", "probe", "every"}

_READABLE = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "CMP": "a comparison",
    "ADD_OP": "'+' or '-'", "MUL_OP": "'*', '/' or '%'", "SCOPE": "'tensor' or 'global'",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'",
    "RBRACE": "'}'", "EQUAL": "'='", "COMMA": "','", "DOT": "'.'", "QUOTE": "\"'\"",
    "CIRCUMFLEX": "'^'", "MINUS": "'-'", "$END": "the end of the spec",
}


@functools.cache
def _terminal_of() -> dict[str, str]:
    """The grammar's terminal for each keyword and punctuation string ("state" -> "STATE")."""
    return {t.pattern.value: t.name for t in _lark().terminals if t.pattern.type == "str"}


@functools.cache
def _lark() -> lark.Lark:
    """The LALR parser, built from the grammar once per process. Lark could keep its tables
    in a cache file, but that file is a pickle it loads before checking anything, so a file
    planted there would run code; building them costs 0.1-0.15 s of the first spec's parse
    (measured in fresh processes on the 2-core CPU: 0.21-0.29 s for lark's import, the
    build and a first parse, against 0.09-0.14 s loading the same tables from JSON), and
    commands that need no parser (``gradspec --help``) never pay it."""
    grammar = resources.files(__package__).joinpath("gradspec.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


@deep
def parse(text: str, filename: str = "<string>") -> ast.SpecAST:
    """Parse one spec; raise :class:`SpecError` with a located message on bad syntax.

    The result is remembered per (text, filename): loading a stdlib name or an adaptor
    expression re-reads the same source, and the AST is immutable, so a shared tree is safe.
    A SpecError is raised, never returned, so nothing bad is remembered."""
    return _parse_remembered(text, filename)


@functools.lru_cache(maxsize=512)
def _parse_remembered(text: str, filename: str) -> ast.SpecAST:
    source = Source(strip_bom(text), filename)
    recovery = _Recovery(source)
    try:
        tree = _lark().parse(source.text, on_error=recovery)
    except lark.exceptions.UnexpectedInput as error:  # the error recovery stopped at
        recovery.record(error)
    if recovery.diagnostics:
        raise SpecError(recovery.diagnostics) from None
    _refuse_too_deep(tree, source)
    try:
        return _ToAst(source).transform(tree)
    except lark.exceptions.VisitError as error:  # a SpecError raised while building the AST
        if isinstance(error.orig_exc, SpecError):
            raise error.orig_exc from None
        raise


_STATEMENT_START = re.compile(
    r"^[ \t]*(?P<token>(?:hyper|state|require|law|if|probe)\b|\}"
    r"|[A-Za-z_]\w*(?=[ \t]*(?:\.[ \t]*[A-Za-z_]\w*[ \t]*)?'?[ \t]*=(?!=)))", re.MULTILINE)
"""A line that starts a statement: a keyword, a block's closing brace, or ``name =``,
``name' =``, ``base.name =``. Newlines mean nothing to the grammar, but specs keep one
statement a line, which is what lets a parse go on after an error."""


class _Recovery:
    """Lark's ``on_error`` handler, so that one report holds every syntax error of a file.

    At an error it records a diagnostic, then resumes at the next line that starts a
    statement (see _STATEMENT_START): the parser's stack is unwound to the innermost state
    where a statement may begin and that takes the statement's first token, and the lexer
    moves to that token. The statement in error is skipped and the rest is parsed as
    usual, so later errors are real ones, not echoes of the first. Recovery stops at the
    end of the text, after MAX_ERRORS, or where no statement can follow (inside the
    header)."""

    MAX_ERRORS = 50

    def __init__(self, source: Source):
        self.source = source
        self.diagnostics: list[Diagnostic] = []
        self.resumed_at = -1  # every resumption starts further on: recovery always ends

    def record(self, error: lark.exceptions.UnexpectedInput) -> None:
        found = _syntax_diagnostic(error, self.source)
        if all(d.span != found.span for d in self.diagnostics):
            self.diagnostics.append(found)

    def __call__(self, error: lark.exceptions.UnexpectedInput) -> bool:
        self.record(error)
        if len(self.diagnostics) >= self.MAX_ERRORS:
            return False
        text = self.source.text
        state = error.interactive_parser.parser_state
        for match in _STATEMENT_START.finditer(text, self._search_from(error, text)):
            at = match.start("token")
            if at <= self.resumed_at:
                continue
            word = match.group("token")
            depth = _statement_depth(state, _terminal_of().get(word, "NAME"))
            if depth is None:
                continue
            del state.state_stack[depth + 1:]
            del state.value_stack[depth:]
            counter = LineCounter("\n")
            counter.feed(text[:at])
            error.interactive_parser.lexer_thread.state.line_ctr = counter
            self.resumed_at = at
            return True
        return False

    @staticmethod
    def _search_from(error, text: str) -> int:
        """Where a statement after the error may start: the error's own line when the bad
        token begins it (a stray '}' may close a block), else the next line."""
        token = getattr(error, "token", None)
        position = token.start_pos if token is not None else getattr(error, "pos_in_stream", None)
        if position is None or (token is not None and token.type == "$END"):  # nothing follows
            return len(text)
        line_start = text.rfind("\n", 0, position) + 1
        if token is not None and not text[line_start:position].strip():
            return line_start
        end = text.find("\n", position)
        return len(text) if end < 0 else end + 1


def _statement_depth(state, terminal: str) -> int | None:
    """The deepest index in the parser's stack of a state where a statement may start (it
    takes the ``state`` keyword) that also takes ``terminal``; None if there is none."""
    table = state.parse_conf.parse_table.states
    for depth in range(len(state.state_stack) - 1, -1, -1):
        actions = table[state.state_stack[depth]]
        if _terminal_of()["state"] in actions and terminal in actions:
            return depth
    return None


_CHAINS = {"sum", "product", "comparison", "and_expr", "or_expr"}
"""Rules whose operands Lark keeps flat and the AST nests: ``a + b + c`` is two deep."""


def _refuse_too_deep(tree: lark.Tree, source: Source) -> None:
    """A located SpecError for an expression nested deeper than MAX_DEPTH (see
    gradspec.recursion); measured without recursion, before anything walks the tree."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SpecError(Diagnostic(
                "GS009", f"an expression nests more than {MAX_DEPTH:,} operations deep", source,
                _span(node.meta), "split it into shorter expressions joined by named definitions"))
        children = [child for child in node.children if isinstance(child, lark.Tree)]
        weight = len(children) if node.data in _CHAINS else 1
        stack.extend((child, depth + weight) for child in children)


def _syntax_diagnostic(error: lark.exceptions.UnexpectedInput, source: Source) -> Diagnostic:
    line, column = error.line, error.column
    if line is None or line < 1:  # at the end of input Lark may not know the position
        lines = source.text.splitlines() or [""]
        line, column = len(lines), len(lines[-1]) + 1
    span = Span(line, column, line, column + 1)
    text_line = source.line(line)
    if isinstance(error, lark.exceptions.UnexpectedCharacters):
        char = text_line[column - 1:column] or "?"
        hint = None
        if char == "*" and text_line[column:column + 1] == "*":
            hint = "powers are written with '^', as in beta2^step"
        elif char == "'":
            hint = "a prime marks the next value of a state, as in m' (no space before it)"
        elif char in "&|!":
            hint = "boolean operators are the words 'and', 'or' and 'not'"
        elif char == '"':
            return _unclosed_string(source, line, column)
        return Diagnostic("GS001", f"unexpected character {char!r}", source, span, hint)

    token = getattr(error, "token", None)
    expected = sorted(getattr(error, "expected", None) or getattr(error, "allowed", None) or [])
    readable = sorted({_READABLE.get(e, repr(e.strip('"').lower()) if e.startswith('"') else e.lower())
                       for e in expected})
    found = "end of the spec" if token is None or token.type == "$END" else repr(str(token))
    if token is not None and token.type != "$END":
        span = Span(token.line, token.column, token.end_line or token.line,
                    token.end_column or token.column + len(str(token)))
    hint = None
    if token is not None and str(token) == "*" and text_line[token.column - 2:token.column - 1] == "*":
        found = "'**'"  # the lexer read the first star as a product; the mistake starts there
        span = Span(token.line, token.column - 1, token.line, token.column + 1)
        hint = "powers are written with '^', as in beta2^step"
    elif token is not None and str(token) in RESERVED and "NAME" in expected:
        hint = f"'{token}' is a reserved word; choose another name"
    elif token is not None and token.type == "$END" and "RBRACE" in expected:
        hint = "an 'if' block is missing its closing '}'"
    elif token is not None and token.type == "EQUAL":
        hint = "a statement is 'name = expr', 'name' = expr' or 'state name = expr'"
    elif readable:
        hint = "expected " + (readable[0] if len(readable) == 1 else
                              "one of " + ", ".join(readable[:8]) + (" ..." if len(readable) > 8 else ""))
    return Diagnostic("GS002", f"unexpected {found}", source, span, hint)


def _unclosed_string(source: Source, line: int, column: int) -> Diagnostic:
    """A quote that opens no string the lexer can end. Before it, the lexer has read ``""``
    as an empty string when the quote is the third of a docstring's opening."""
    text_line = source.line(line)
    if column >= 3 and text_line[column - 3:column - 1] == '""':
        return Diagnostic("GS001", "a docstring that is never closed", source,
                          Span(line, column - 2, line, column + 1), 'end the docstring with """')
    return Diagnostic("GS001", "a string that is never closed", source, Span(line, column, line, column + 1),
                      'a string ends with " on the line where it starts; only the docstring (first in the file, '
                      'between """ and """) spans lines')


def _span(meta) -> Span | None:
    return Span.of(meta)


def _shortened(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:10]}...{text[-6:]} ({len(text)} characters)"


def _number(token: Token) -> int | float:
    text = str(token)
    if any(c in text for c in ".eE"):
        return float(text)
    return int(text)


@v_args(meta=True)
class _ToAst(Transformer):
    """Builds AST nodes bottom-up; every node keeps the span Lark recorded for it."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    # ---- file level
    def start(self, meta, children):
        doc = None
        if children and isinstance(children[0], _Doc):
            doc = children.pop(0).text
        imports = []
        while isinstance(children[0], ast.Import):
            imports.append(children.pop(0))
        kind, name, extra, header_span = children[0]
        items = tuple(imports) + tuple(children[1:])
        doc_comments = _hyper_comments(self.source)
        items = tuple(_attach_doc(i, doc_comments) for i in items)
        return ast.SpecAST(kind=kind, name=name, items=items, source=self.source, doc=doc,
                           base_param=extra if kind == "adaptor" else None,
                           variant=extra if kind == "variant" else None, span=header_span)

    def docstring(self, meta, children):
        return _Doc(_unquote(children[0]))

    def optimizer_header(self, meta, children):
        return ("optimizer", str(children[0]), None, _span(meta))

    def variant_header(self, meta, children):
        return ("variant", str(children[0]), children[1], _span(meta))

    def adaptor_header(self, meta, children):
        return ("adaptor", str(children[0]), str(children[1]), _span(meta))

    def import_(self, meta, children):
        return ast.Import(_unquote(children[0]), str(children[1]), _span(meta))

    # ---- hyperparameters
    def hyper(self, meta, children):
        name, declared, value, constraint = children
        value = _literal(value)
        if declared is None or str(declared) == "real":
            value = float(value) if not isinstance(value, bool) else value
        elif str(declared) == "int" and not isinstance(value, bool) and float(value).is_integer():
            value = int(value)
        else:
            raise SpecError(Diagnostic("GS003", f"unknown or mismatched type '{declared}' for hyperparameter '{name}'",
                                       self.source, Span.of(declared), "numeric types are 'int' and 'real'"))
        return ast.Hyper(str(name), value, constraint, None, _span(meta))

    def bound(self, meta, children):
        return ast.Bound(str(children[0]), float(_literal(children[1])))

    def interval(self, meta, children):
        lo_closed, lo, hi, hi_closed = children
        return ast.Interval(float(_literal(lo)), float(_literal(hi)), lo_closed, hi_closed)

    def closed_end(self, meta, children):
        return True

    def open_end(self, meta, children):
        return False

    def inf_number(self, meta, children):
        return ast.Num(float("inf"), _span(meta))

    def neg_inf_number(self, meta, children):
        return ast.Num(float("-inf"), _span(meta))

    def neg_number(self, meta, children):
        return ast.Num(-self._read_number(children[0], meta), _span(meta))

    # ---- statements
    def require(self, meta, children):
        cond, message = children
        return ast.Require(cond, _unquote(message) if message is not None else None, _span(meta))

    def law(self, meta, children):
        claim, bindings, given, message = children
        return ast.Law(claim[0], claim[1], claim[2], tuple(bindings or ()), given,
                       _unquote(message) if message is not None else None, _span(meta))

    def law_equals(self, meta, children):
        return ("equals", children[0], ())

    def law_invariant(self, meta, children):
        return ("invariant", None, tuple(children))

    def law_fixed_point(self, meta, children):
        return ("fixed_point", None, ())

    def law_holds(self, meta, children):
        return ("holds", children[0], ())

    def at_clause(self, meta, children):
        return tuple(children)

    def given_clause(self, meta, children):
        return children[0]

    def binding(self, meta, children):
        return (str(children[0]), _literal(children[1]), _span(meta))

    def mapping(self, meta, children):
        return (str(children[0]), children[1])


    def state(self, meta, children):
        name, kind, init = children
        scope, rank = kind if kind is not None else ("element", None)
        dims = None
        if scope == "shaped":
            rank, dims = None, rank
        return ast.State(str(name), init, _span(meta), scope, rank, dims)

    def state_kind(self, meta, children):
        word, rank = children if len(children) == 2 else (children[0], None)
        if str(word) in ("global", "tensor") and rank is None:
            return (str(word), None)
        if str(word) == "subspace" and rank is not None:
            return ("subspace", str(rank))
        if str(word) in ("rows", "cols") and rank is None:  # a vector: one value per row / column
            return ("shaped", ("rows", 1) if str(word) == "rows" else (1, "cols"))
        hint = ("write ': subspace(k)', k an int hyperparameter" if str(word) == "subspace"
                else "drop the annotation for a per-element state, or give a shape: ': rows', ': cols', "
                     "': (rows, rows)', ': (cols, r)'")
        raise SpecError(Diagnostic("GS004", f"a state is per element, ': global', ': tensor', ': rows', ': cols', "
                                            f"': (d0, d1)' or ': subspace(k)', not ': {word}'",
                                   self.source, Span.of(word), hint))

    def state_shape(self, meta, children):
        return ("shaped", tuple(children))

    def dim(self, meta, children):
        token = children[0]
        if token.type == "NUMBER":
            if not float(str(token)).is_integer() or float(str(token)) < 1:
                raise SpecError(Diagnostic("GS004", f"a state's size must be a whole number >= 1, not {token}",
                                           self.source, Span.of(token), "write rows, cols, a number or an int "
                                                                        "hyperparameter"))
            return int(float(str(token)))
        return str(token)

    def probe_block(self, meta, children):
        every, *body = children
        if every.type == "NUMBER":
            every = int(float(every)) if float(every).is_integer() else float(every)
        else:
            every = str(every)
        return ast.Probe(every, tuple(body), _span(meta))

    def every_block(self, meta, children):
        probe = self.probe_block(meta, children)
        return ast.Probe(probe.every, probe.items, probe.span, model=False)

    def repeat_block(self, meta, children):
        _, count, *body = children  # the REPEAT keyword, the count, the body
        if count.type == "NUMBER":
            count = int(float(count)) if float(count).is_integer() else float(count)
        else:
            count = str(count)
        return ast.Repeat(count, tuple(body), _span(meta))

    def blocks_block(self, meta, children):
        _, size, *body = children  # the BLOCKS keyword, the block size, the body
        repeat = self.repeat_block(meta, [None, size, *body])
        return ast.Blocks(repeat.count, repeat.items, repeat.span)

    def define(self, meta, children):
        return ast.Define(str(children[0]), children[1], False, _span(meta))

    def define_next(self, meta, children):
        return ast.Define(str(children[0]), children[1], True, _span(meta))

    def override(self, meta, children):
        return ast.Override(str(children[0]), str(children[1]), children[2], _span(meta))

    def if_block(self, meta, children):
        cond, *body = children
        otherwise = ()
        if body and isinstance(body[-1], _Else):
            otherwise = body.pop().items
        return ast.If(cond, tuple(body), otherwise, _span(meta))

    def else_block(self, meta, children):
        return _Else(tuple(children))

    # ---- expressions
    def number(self, meta, children):
        return ast.Num(self._read_number(children[0], meta), _span(meta))

    def _read_number(self, token, meta) -> int | float:
        """A number literal's value; GS001 past what a step can hold (float64's largest, about
        1.8e308: 1e400 would be an infinity no one wrote) or past Python's limit on the digits
        of an int read from text."""
        try:
            value = _number(token)
        except ValueError:
            raise SpecError(Diagnostic("GS001", f"a number of {len(str(token))} digits is too long to read",
                                       self.source, _span(meta), "write it with an exponent: 1e30")) from None
        try:
            finite = math.isfinite(float(value))
        except OverflowError:
            finite = False
        if not finite:
            raise SpecError(Diagnostic("GS001", f"{_shortened(str(token))} is beyond the largest number a step holds "
                                                "(about 1.8e308)", self.source, _span(meta),
                                       "write inf for an infinity, or a smaller number"))
        return value

    def true(self, meta, children):
        return ast.Bool(True, _span(meta))

    def false(self, meta, children):
        return ast.Bool(False, _span(meta))

    def name(self, meta, children):
        return ast.Name(str(children[0]), span=_span(meta))

    def next_name(self, meta, children):
        return ast.Name(str(children[0]), primed=True, span=_span(meta))

    def qualified(self, meta, children):
        return ast.Name(str(children[1]), qualifier=str(children[0]), span=_span(meta))

    def qualified_next(self, meta, children):
        return ast.Name(str(children[1]), primed=True, qualifier=str(children[0]), span=_span(meta))

    def call(self, meta, children):
        func, *args = children
        return ast.Call(str(func), tuple(a for a in args if a is not None), _span(meta))

    def reduce(self, meta, children):
        scope, func, *args = children
        return ast.Reduce(str(scope), str(func), tuple(a for a in args if a is not None), _span(meta))

    def measure(self, meta, children):
        return ast.Measure(str(children[0]), str(children[1]), _span(meta))

    def axis_reduce(self, meta, children):
        """``row.mean(x)``, ``col.norm(x)``: ``row`` and ``col`` stay ordinary names elsewhere; any
        other qualifier is reported by the IR builder (GS055)."""
        return self.reduce(meta, children)

    def neg(self, meta, children):
        return ast.UnOp("-", children[0], _span(meta))

    def not_(self, meta, children):
        return ast.UnOp("not", children[0], _span(meta))

    def power(self, meta, children):
        return ast.BinOp("^", children[0], children[1], _span(meta))

    def _left_assoc(self, meta, children, fixed_op=None):
        result = children[0]
        rest = children[1:]
        step = 1 if fixed_op else 2
        for i in range(0, len(rest), step):
            op = fixed_op or str(rest[i])
            right = rest[i] if fixed_op else rest[i + 1]
            result = ast.BinOp(op, result, right, _join(result, right))
        return result

    def sum(self, meta, children):
        return self._left_assoc(meta, children)

    def product(self, meta, children):
        return self._left_assoc(meta, children)

    def comparison(self, meta, children):
        return self._left_assoc(meta, children)

    def and_expr(self, meta, children):
        return self._left_assoc(meta, children, "and")

    def or_expr(self, meta, children):
        return self._left_assoc(meta, children, "or")

    # ---- spec expressions
    def spec_expr(self, meta, children):
        name, *args = children
        specs = tuple(a for a in args if isinstance(a, ast.SpecCall))
        overrides = tuple(a for a in args if isinstance(a, tuple))
        return ast.SpecCall(str(name), specs, overrides, _span(meta))

    def override_arg(self, meta, children):
        return (str(children[0]), _literal(children[1]), _span(meta))


class _Doc:
    def __init__(self, text):
        self.text = text


class _Else:
    def __init__(self, items):
        self.items = items


def _literal(node) -> bool | int | float:
    """The Python value of a literal written where only constants may stand."""
    return node.value


def _unquote(token) -> str:
    text = str(token)
    if text.startswith('"""'):
        import textwrap
        return textwrap.dedent(text[3:-3]).strip()
    return text[1:-1]


def _join(left, right) -> Span | None:
    a, b = getattr(left, "span", None), getattr(right, "span", None)
    if a is None or b is None:
        return a or b
    return Span(a.line, a.column, b.end_line, b.end_column)


def _hyper_comments(source: Source) -> dict[int, str]:
    """Trailing ``# comments`` by line: a hyperparameter's comment is its description."""
    out = {}
    for number, line in enumerate(source.text.splitlines(), 1):
        if line.lstrip().startswith("hyper") and "#" in line:
            out[number] = line.split("#", 1)[1].strip()
    return out


def _attach_doc(item, comments: dict[int, str]):
    if isinstance(item, ast.Hyper) and item.span and item.span.line in comments:
        return ast.Hyper(item.name, item.default, item.constraint, comments[item.span.line], item.span)
    if isinstance(item, ast.If):
        return ast.If(item.cond, tuple(_attach_doc(i, comments) for i in item.then),
                      tuple(_attach_doc(i, comments) for i in item.otherwise), item.span)
    return item
