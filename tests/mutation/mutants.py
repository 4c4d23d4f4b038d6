"""Mutant generation: small, deterministic edits of a module's syntax tree.

Every mutation site is found by one walk over the tree in a fixed order, so mutant number k
names the same edit every time the same source is read. The operators are those of mutmut
(operators, comparisons, boolean operators, `not`, numbers +1, strings wrapped in "XX",
True/False, break/continue, an assignment's value -> None, a call argument -> None or dropped,
mirrored string methods, a lambda's body -> None). Docstrings and annotations are never
mutated, nor decorators (as mutmut), nor a line marked `# pragma: no mutate`.

A mutant that can only change the text of a log line or of an error message (a string in a
`raise`, in an exception's constructor, in an `assert` message, anything inside a logging
call, or an error-location label: a variable named `where`/`w`/`what`/`detail` passed on, an argument
for a parameter of that name of a function of the same module, or an f-string that starts
with one, such as f"{where} row {r}") is marked `text_only`: it is counted apart and does
not enter the score.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

_BINOP_SWAP: dict[type, type] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div, ast.Mod: ast.Div, ast.Pow: ast.Mult,
    ast.LShift: ast.RShift, ast.RShift: ast.LShift,
    ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitAnd,
}
_CMP_SWAP: dict[type, type] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.In: ast.NotIn, ast.NotIn: ast.In,
}
_METHOD_SWAP = {
    "lower": "upper", "upper": "lower", "lstrip": "rstrip", "rstrip": "lstrip",
    "ljust": "rjust", "rjust": "ljust", "find": "rfind", "rfind": "find",
    "index": "rindex", "rindex": "index", "split": "rsplit", "rsplit": "split",
    "removeprefix": "removesuffix", "removesuffix": "removeprefix",
    "partition": "rpartition", "rpartition": "partition",
}
# split() and rsplit() without a maxsplit give the same list: swapping them is no mutation.
_SAME_WITHOUT_LIMIT = {"split", "rsplit"}
_TYPING = {"Literal", "Callable", "Union", "Optional", "TypeVar", "Protocol",
           # builtin generics: `Route = tuple[tuple[Any, ...], ...]` is a type alias too
           "tuple", "list", "dict", "set", "frozenset", "type"}
_LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "log"}
_LOG_OBJECTS = {"log", "logger", "_log", "logging", "LOG", "_logger", "warnings"}
_NO_MUTATE = "pragma: no mutate"
# Names the codebase uses for the "where did it happen" label of error messages only.
_LABEL_NAMES = {"where", "w", "what", "detail"}


def _is_type_alias(value: ast.AST) -> bool:
    if isinstance(value, ast.Subscript):
        base = value.value
        name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
        return name in _TYPING
    return False


def _assigns_label(node: ast.AST) -> bool:
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return bool(targets) and all(isinstance(t, ast.Name) and t.id in _LABEL_NAMES for t in targets)


def _is_label(node: ast.AST) -> bool:
    """An error-location label: `where`, or an f-string that starts with `{where}`."""
    if isinstance(node, ast.Name):
        return node.id in _LABEL_NAMES
    if isinstance(node, ast.JoinedStr) and node.values:
        first = node.values[0]
        return isinstance(first, ast.FormattedValue) and _is_label(first.value)
    return False


@dataclass(frozen=True)
class Mutant:
    id: int
    line: int
    operator: str
    before: str
    after: str
    text_only: bool
    end_line: int
    stmt_lines: tuple[int, int] = (0, 0)   # the enclosing statement's header: what the tracer sees
    col: int = 0                            # column of the mutated node (tells apart twins on a line)

    def lines(self) -> range:
        """Lines whose execution means the mutated code ran (for choosing the tests)."""
        lo = min(self.line, self.stmt_lines[0] or self.line)
        return range(lo, max(self.end_line, self.line, self.stmt_lines[1]) + 1)

    def describe(self) -> str:
        return f"{self.before} -> {self.after}"


@dataclass(frozen=True)
class _Ctx:
    skip: bool = False          # docstring, annotation, __all__, pragma
    message: bool = False       # inside raise / exception constructor / assert message
    log_call: bool = False      # inside the arguments of a logging call
    in_fstring: bool = False


def _is_log_call(call: ast.Call) -> bool:
    f = call.func
    if isinstance(f, ast.Attribute) and f.attr in _LOG_METHODS:
        base = f.value
        name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
        return name in _LOG_OBJECTS or name.endswith("log") or name.endswith("logger")
    return isinstance(f, ast.Name) and f.id == "print"


def _is_exception_ctor(call: ast.Call) -> bool:
    f = call.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
    return name.endswith(("Error", "Exception", "Warning", "Full", "Closed", "Corrupt", "Locked", "Cursor"))


def _is_text(node: ast.AST) -> bool:
    """A string literal, an f-string, or a concatenation with a string literal in it."""
    if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        return True
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and (
        _is_text(node.left) or _is_text(node.right))


def _positional_params(tree: ast.AST) -> dict[str, tuple[str, ...]]:
    """Functions and methods of this module by name: their positional parameters (no self),
    so that a label passed by position (`self._write("purge", body)`) is recognised."""
    seen: dict[str, tuple[str, ...]] = {}
    clash: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names = tuple(a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls"))
            if node.name in seen and seen[node.name] != names:
                clash.add(node.name)
            seen[node.name] = names
    return {k: v for k, v in seen.items() if k not in clash}


def _exception_classes(tree: ast.AST) -> set[str]:
    """Classes of this module that derive from an exception (their constructors take messages)."""
    found: set[str] = set()
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    for _ in range(3):  # a subclass of a subclass
        for c in classes:
            for b in c.bases:
                name = b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                if name.endswith(("Error", "Exception")) or name in found:
                    found.add(c.name)
    return found


def _docstring_ids(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                ids.add(id(body[0]))
    return ids


def _src(node: ast.AST) -> str:
    text = ast.unparse(node)
    return text if len(text) <= 160 else text[:157] + "..."


class _Walker:
    """Walks the tree in a fixed order; lists the sites, or applies site number `target`."""

    def __init__(self, source: str, target: int | None = None) -> None:
        self.lines = source.splitlines()
        self.target = target
        self.count = 0
        self.sites: list[Mutant] = []
        self.applied = False
        self._stmt: list[tuple[int, int]] = [(0, 0)]

    def run(self, tree: ast.Module) -> ast.Module:
        self._params = _positional_params(tree)
        self._docstrings = _docstring_ids(tree)
        self._exceptions = _exception_classes(tree)
        self._visit_children(tree, _Ctx())
        return tree

    # -- traversal ---------------------------------------------------------------------
    def _visit(self, node: ast.AST, ctx: _Ctx) -> ast.AST:
        if self.applied:
            return node
        ctx = self._ctx_for(node, ctx)
        is_stmt = isinstance(node, ast.stmt)
        if is_stmt:
            body = getattr(node, "body", None)
            header_end = body[0].lineno - 1 if isinstance(body, list) and body else node.end_lineno
            self._stmt.append((node.lineno, max(node.lineno, header_end or node.lineno)))
        try:
            self._visit_children(node, ctx)
        finally:
            if is_stmt:
                self._stmt.pop()
        if self.applied or ctx.skip:
            return node
        for replacement, operator, *message_arg in self._candidates(node, ctx):
            k = self.count
            self.count += 1
            if self.target is None:
                self.sites.append(Mutant(
                    id=k, line=getattr(node, "lineno", 0), operator=operator, before=_src(node),
                    after=_src(replacement) if replacement is not None else "(removed)",
                    text_only=bool(message_arg) or self._text_only(node, ctx),
                    end_line=getattr(node, "end_lineno", 0) or 0,
                    stmt_lines=self._stmt[-1] if not is_stmt else (node.lineno, node.lineno),
                    col=getattr(node, "col_offset", 0) or 0,
                ))
            elif k == self.target:
                self.applied = True
                return replacement
        return node

    def _visit_children(self, node: ast.AST, ctx: _Ctx) -> None:
        for field, value in ast.iter_fields(node):
            child_ctx = ctx
            if field in ("annotation", "returns", "type_comment", "decorator_list"):
                child_ctx = _Ctx(skip=True)
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, ast.AST):
                        value[i] = self._visit(item, self._field_ctx(node, field, item, child_ctx))
            elif isinstance(value, ast.AST):
                setattr(node, field, self._visit(value, self._field_ctx(node, field, value, child_ctx)))

    def _field_ctx(self, parent: ast.AST, field: str, child: ast.AST, ctx: _Ctx) -> _Ctx:
        if isinstance(parent, ast.Raise) and field == "exc":
            return _Ctx(ctx.skip, True, ctx.log_call, ctx.in_fstring)
        if isinstance(parent, ast.Assert) and field == "msg":
            return _Ctx(ctx.skip, True, ctx.log_call, ctx.in_fstring)
        if isinstance(parent, ast.Call) and field in ("args", "keywords"):
            if _is_log_call(parent):
                return _Ctx(ctx.skip, ctx.message, True, ctx.in_fstring)
            value = child.value if isinstance(child, ast.keyword) else child
            if self._is_exception_ctor(parent):
                # A message built from strings: whatever is inside only changes its text.
                return _Ctx(ctx.skip, True, ctx.log_call, ctx.in_fstring or _is_text(value))
            if self._label_argument(parent, child):
                return _Ctx(ctx.skip, True, ctx.log_call, True)
        return ctx

    def _label_argument(self, call: ast.Call, child: ast.AST) -> bool:
        """`child` is passed for a `where`/`what` parameter of a function of this module."""
        if isinstance(child, ast.keyword):
            return child.arg in _LABEL_NAMES
        f = call.func
        params = self._params.get(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""), ())
        for i, arg in enumerate(call.args):
            if arg is child:
                return i < len(params) and params[i] in _LABEL_NAMES
        return False

    def _ctx_for(self, node: ast.AST, ctx: _Ctx) -> _Ctx:
        if id(node) in self._docstrings:
            return _Ctx(skip=True)
        line = getattr(node, "lineno", None)
        if isinstance(node, ast.stmt) and line and _NO_MUTATE in self.lines[line - 1]:
            return _Ctx(skip=True)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return _Ctx(skip=True)
        if isinstance(node, ast.ImportFrom | ast.Import | ast.Global | ast.Nonlocal):
            return _Ctx(skip=True)
        if isinstance(node, ast.Assign) and _is_type_alias(node.value):
            return _Ctx(skip=True)      # a type alias: only annotations use it
        if isinstance(node, ast.JoinedStr):
            return _Ctx(ctx.skip, ctx.message or _is_label(node), ctx.log_call, True)
        if isinstance(node, ast.Assign) and _assigns_label(node):
            return _Ctx(ctx.skip, True, ctx.log_call, ctx.in_fstring)
        return ctx

    def _is_exception_ctor(self, call: ast.Call) -> bool:
        f = call.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        return name in self._exceptions or _is_exception_ctor(call)

    def _text_only(self, node: ast.AST, ctx: _Ctx) -> bool:
        if ctx.log_call:
            return True
        if not ctx.message:
            return False
        if ctx.in_fstring:
            return True
        return (isinstance(node, ast.Constant) and isinstance(node.value, str)) or isinstance(node, ast.JoinedStr)

    # -- operators ---------------------------------------------------------------------
    def _candidates(self, node: ast.AST, ctx: _Ctx) -> Iterator[tuple]:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAP:
            new = copy.copy(node)
            new.op = _BINOP_SWAP[type(node.op)]()
            yield new, "binop"
        elif isinstance(node, ast.AugAssign) and type(node.op) in _BINOP_SWAP:
            new = copy.copy(node)
            new.op = _BINOP_SWAP[type(node.op)]()
            yield new, "augassign"
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _CMP_SWAP:
                    new = copy.copy(node)
                    new.ops = list(node.ops)
                    new.ops[i] = _CMP_SWAP[type(op)]()
                    yield new, "compare"
        elif isinstance(node, ast.BoolOp):
            new = copy.copy(node)
            new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            yield new, "boolop"
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub | ast.Invert):
            yield node.operand, "unary"
        elif isinstance(node, ast.Constant):
            yield from self._constant(node, ctx)
        elif isinstance(node, ast.Break):
            yield ast.copy_location(ast.Continue(), node), "keyword"
        elif isinstance(node, ast.Continue):
            yield ast.copy_location(ast.Break(), node), "keyword"
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            if not (isinstance(node.value, ast.Constant) and node.value.value is None):
                new = copy.copy(node)
                new.value = ast.copy_location(ast.Constant(None), node.value)
                yield (new, "assign-none", *((True,) if _assigns_label(node) else ()))
        elif isinstance(node, ast.Call):
            yield from self._call(node)
        elif isinstance(node, ast.Lambda):
            new = copy.copy(node)
            none = isinstance(node.body, ast.Constant) and node.body.value is None
            new.body = ast.copy_location(ast.Constant(0 if none else None), node.body)
            yield new, "lambda"

    def _constant(self, node: ast.Constant, ctx: _Ctx) -> Iterator[tuple[ast.AST, str]]:
        v = node.value
        if isinstance(v, bool):
            yield ast.copy_location(ast.Constant(not v), node), "bool"
        elif isinstance(v, int | float) and v + 1 != v:
            yield ast.copy_location(ast.Constant(v + 1), node), "number"
        elif isinstance(v, str):
            yield ast.copy_location(ast.Constant(f"XX{v}XX"), node), "string"
        elif isinstance(v, bytes):
            yield ast.copy_location(ast.Constant(b"XX" + v + b"XX"), node), "bytes"

    def _call(self, node: ast.Call) -> Iterator[tuple]:
        f = node.func
        log_call = _is_log_call(node)
        sink = log_call or self._is_exception_ctor(node)

        params = self._params.get(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""), ())

        def message(arg: ast.AST, param: str | None = None) -> tuple:
            is_text = _is_text(arg)
            label = _is_label(arg) or param in _LABEL_NAMES
            return (True,) if (sink and is_text) or log_call or label else ()

        if isinstance(f, ast.Attribute) and f.attr in _METHOD_SWAP and not (
                f.attr in _SAME_WITHOUT_LIMIT and len(node.args) < 2 and not node.keywords):
            new = copy.copy(node)
            new.func = ast.copy_location(ast.Attribute(f.value, _METHOD_SWAP[f.attr], f.ctx), f)
            yield new, "method"
        for i, arg in enumerate(node.args):
            if isinstance(arg, ast.Starred) or (isinstance(arg, ast.Constant) and arg.value is None):
                continue
            new = copy.copy(node)
            new.args = list(node.args)
            new.args[i] = ast.copy_location(ast.Constant(None), arg)
            yield (new, "arg-none", *message(arg, params[i] if i < len(params) else None))
        for i, kw in enumerate(node.keywords):
            if kw.arg is None:
                continue
            new = copy.copy(node)
            new.keywords = node.keywords[:i] + node.keywords[i + 1:]
            yield (new, "kwarg-drop", *message(kw.value, kw.arg))


def list_mutants(source: str) -> list[Mutant]:
    """Every mutant of a module's source, numbered in walk order."""
    walker = _Walker(source)
    walker.run(ast.parse(source))
    return walker.sites


def scope_lines(source: str, names: Sequence[str]) -> set[int]:
    """The lines of the named definitions of a module: top-level functions and classes, or
    methods as "Class.method". Raises ValueError naming any that does not exist (moved or
    renamed: the table must follow)."""
    spans: dict[str, tuple[int, int]] = {}

    def walk(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                qual = prefix + node.name
                spans[qual] = (node.lineno, node.end_lineno or node.lineno)
                if isinstance(node, ast.ClassDef):
                    walk(node.body, qual + ".")

    walk(ast.parse(source).body, "")
    missing = [n for n in names if n not in spans]
    if missing:
        raise ValueError(f"no definition named {', '.join(map(repr, missing))} "
                         f"(defined: {', '.join(sorted(spans))})")
    return {line for n in names for line in range(spans[n][0], spans[n][1] + 1)}


def functions_by_line(source: str) -> dict[int, str]:
    """Line -> qualified name of the innermost function or class around it ("<module>" outside)."""
    out: dict[int, str] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                qual = prefix + child.name
                for line in range(child.lineno, (child.end_lineno or child.lineno) + 1):
                    out[line] = qual
                walk(child, qual + ".")
            else:
                walk(child, prefix)     # a def inside an if/with/try keeps its parent's name

    walk(ast.parse(source), "")
    return out


def in_scope(mutants: Sequence[Mutant], source: str, names: Sequence[str] | None) -> list[Mutant]:
    """The mutants inside the named definitions (all of them when `names` is None); ids
    stay those of the whole module."""
    if names is None:
        return list(mutants)
    lines = scope_lines(source, names)
    return [m for m in mutants if m.line in lines]


def mutate(source: str, mutant_id: int) -> ast.Module:
    """The module's tree with mutant `mutant_id` applied (compile it with the real filename)."""
    walker = _Walker(source, mutant_id)
    tree = walker.run(ast.parse(source))
    if not walker.applied:
        raise IndexError(f"no mutant {mutant_id} in this source ({walker.count} sites)")
    return ast.fix_missing_locations(tree)
