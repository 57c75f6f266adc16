"""A small LaTeX / plain-math grammar of our own: normalised answer text -> a tuple AST.

No ``eval``, no sympy string parsing: a tokenizer plus a recursive-descent parser with hard limits on
tokens, nesting depth and list sizes, so untrusted model output cannot make it hang or recurse away.

AST nodes are tuples whose first element is the kind:

    ('num', Fraction, places)    places = digits after the point of a decimal literal, else None
    ('sym', name)  ('const', 'pi'|'e'|'i'|'inf')  ('text', str)
    ('neg', x) ('add', [x..]) ('mul', [x..]) ('div', a, b) ('pow', b, e) ('sqrt', x, index|None)
    ('fact', x) ('pct', x) ('abs', x) ('binom', n, k) ('func', name, arg, base|None, power|None)
    ('pm', a|None, b, sign)      a ± b (sign +1) or a ∓ b (sign -1); expanded by ``expand_pm``
    ('list', items) ('set', items) ('brack', open, close, items) ('matrix', kind, rows)
    ('union', parts) ('rel', exprs, ops, names) ('in', lhs, rhs) ('empty',)
                                 names[k]: member k is a name for the answer (names.py), e.g. f(x), |AB|
    ('based', digits, base)      a numeral written in a base, 52_8
"""

from __future__ import annotations

from posttrain.verify.latex_lex import ParseError, collapse_parens, number, tokenize
from posttrain.verify.names import DECORATIONS, GREEK, NAME_CMDS, is_name

MAX_DEPTH = 400
MAX_ITEMS = 64
MAX_PM = 3


FUNCS = {
    "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
    "ln", "log", "exp", "lg", "arccot", "arcsec", "arccsc", "coth", "lcm", "gcd", "max", "min", "det",
    "floor", "ceil",
}
RELOPS = {"=": "=", "<": "<", ">": ">", "\\leq": "<=", "\\geq": ">=", "\\neq": "!=", "\\approx": "~="}
MATRIX_ENVS = {"pmatrix", "bmatrix", "matrix", "vmatrix", "Bmatrix", "smallmatrix", "array", "Vmatrix"}

class _Parser:
    def __init__(self, toks):
        self.t = toks
        self.i = 0
        self.depth = 0

    # -- helpers
    def peek(self, k=0):
        j = self.i + k
        return self.t[j] if j < len(self.t) else (None, None)

    def next(self):
        tok = self.peek()
        self.i += 1
        return tok

    def at(self, kind, val=None):
        k, v = self.peek()
        return k == kind and (val is None or v == val)

    def expect(self, kind, val):
        k, v = self.next()
        if k != kind or v != val:
            raise ParseError(f"expected {val!r}, got {v!r}")

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("nesting too deep")

    # -- grammar
    def parse_top(self):
        items = self.parse_items(("end_of_input",))
        if self.i != len(self.t):
            raise ParseError(f"unexpected {self.peek()[1]!r}")
        if not items:
            raise ParseError("empty answer")
        return items[0] if len(items) == 1 else ("list", items)

    def parse_items(self, closers):
        items = []
        if self._at_closer(closers):
            return items
        while True:
            items.append(self.parse_relation())
            if len(items) > MAX_ITEMS:
                raise ParseError("too many items")
            if self.at("op", ",") or self.at("op", ";"):
                self.next()
                continue
            return items

    def _at_closer(self, closers):
        k, v = self.peek()
        return k is None or (k == "op" and v in closers) or (k, v) in (("cmd", "\\}"), ("end", v))

    def parse_relation(self):
        self.enter()
        start = self.i
        first = self.parse_union()
        exprs, ops, spans = [first], [], [(start, self.i)]
        while True:
            k, v = self.peek()
            op = RELOPS.get(v) if k in ("op", "cmd") else None
            if op is None and (k, v) == ("cmd", "\\in"):
                self.next()
                rhs = self.parse_union()
                self.depth -= 1
                return ("in", first, rhs)
            if op is None:
                break
            self.next()
            ops.append(op)
            start = self.i
            exprs.append(self.parse_union())
            spans.append((start, self.i))
        self.depth -= 1
        if not ops:
            return first
        return ("rel", exprs, ops, tuple(is_name(self.t[a:b]) for a, b in spans))

    def parse_union(self):
        parts = [self.parse_additive()]
        while self.at("cmd", "\\cup"):
            self.next()
            parts.append(self.parse_additive())
        return parts[0] if len(parts) == 1 else ("union", parts)

    def parse_additive(self):
        self.enter()
        terms = []
        k, v = self.peek()
        if (k, v) in (("cmd", "\\pm"), ("cmd", "\\mp")):
            self.next()
            node = ("pm", None, self.parse_mult(), 1 if v == "\\pm" else -1)
        else:
            node = self.parse_mult()
        terms.append(node)
        while True:
            k, v = self.peek()
            if (k, v) == ("op", "+"):
                self.next()
                terms.append(self.parse_mult())
            elif (k, v) == ("op", "-"):
                self.next()
                terms.append(("neg", self.parse_mult()))
            elif (k, v) in (("cmd", "\\pm"), ("cmd", "\\mp")):
                self.next()
                left = terms[0] if len(terms) == 1 else ("add", terms)
                terms = [("pm", left, self.parse_mult(), 1 if v == "\\pm" else -1)]
            else:
                break
        self.depth -= 1
        return terms[0] if len(terms) == 1 else ("add", terms)

    _IMPLICIT_START = {"num", "id", "cmd"}

    def _starts_implicit(self):
        k, v = self.peek()
        if k == "op":
            return v == "("
        if k == "cmd":
            name = v[1:]
            return name in FUNCS or name in GREEK or name in NAME_CMDS or name in DECORATIONS or name in (
                "frac", "sqrt", "pi", "infty", "binom", "mathbb", "exp", "overline",
            )
        return k in ("num", "id")

    def parse_mult(self):
        self.enter()
        factors = [self.parse_unary()]
        while True:
            k, v = self.peek()
            if (k, v) in (("op", "*"), ("cmd", "\\cdot"), ("cmd", "\\times"), ("cmd", "\\ast")):
                self.next()
                factors.append(self.parse_unary())
            elif (k, v) in (("op", "/"), ("cmd", "\\div")):
                self.next()
                left = factors[0] if len(factors) == 1 else ("mul", factors)
                factors = [("div", left, self.parse_unary())]
            elif self._starts_implicit():
                prev = factors[-1]
                if k == "num" and prev[0] == "num":
                    raise ParseError("two numbers side by side")
                factors.append(self.parse_power())
            else:
                break
        self.depth -= 1
        return factors[0] if len(factors) == 1 else ("mul", factors)

    def parse_unary(self):
        k, v = self.peek()
        if (k, v) == ("op", "-"):
            self.next()
            self.enter()
            node = ("neg", self.parse_unary())
            self.depth -= 1
            return node
        if (k, v) == ("op", "+"):
            self.next()
            return self.parse_unary()
        return self.parse_power()

    def parse_power(self):
        self.enter()
        base = self.parse_postfix()
        if self.at("op", "^") or self.at("op", "**"):
            self.next()
            if self.at("op", "-"):
                self.next()
                exp = ("neg", self.parse_power_arg())
            else:
                exp = self.parse_power_arg()
            base = ("pow", base, exp)
            base = self._postfix_ops(base)
        self.depth -= 1
        return base

    def parse_power_arg(self):
        """The exponent: a braced group, a parenthesised group, a whole number (plain-text ``2^10`` is
        1024, as writers mean it) or a power (``a^b^c`` = a^(b^c))."""
        k, v = self.peek()
        if (k, v) == ("op", "{"):
            return self.parse_atom()
        if k == "num":
            self.next()
            return number(v)
        if (k, v) == ("op", "("):
            return self.parse_atom()
        self.enter()
        node = self.parse_power()  # right-associative: a^b^c = a^(b^c)
        self.depth -= 1
        return node

    def parse_postfix(self):
        return self._postfix_ops(self.parse_atom())

    def _postfix_ops(self, node):
        while True:
            if self.at("op", "!"):
                self.next()
                node = ("fact", node)
            elif self.at("op", "%") or self.at("cmd", "\\%"):
                self.next()
                node = ("pct", node)
            elif self.at("op", "'"):
                self.next()
                if node[0] != "sym":
                    raise ParseError("prime on a non-symbol")
                node = ("sym", node[1] + "'")
            else:
                return node

    def tex_arg(self):
        """One TeX macro argument: a braced group or a single token (``\\frac12`` -> 1, 2)."""
        k, v = self.peek()
        if (k, v) == ("op", "{"):
            self.next()
            self.enter()
            items = self.parse_items(("}",))
            self.expect("op", "}")
            self.depth -= 1
            if len(items) != 1:
                raise ParseError("bad macro argument")
            return items[0]
        if k == "num":
            self.next()
            if len(v) > 1 and v[0].isdigit():  # \frac123 -> \frac{1}{2}3: split the token
                self.t.insert(self.i, ("num", v[1:]))
                return number(v[0])
            return number(v)
        if k == "id":
            self.next()
            return ("sym", v)
        if k == "cmd" or (k, v) == ("op", "("):  # \frac\pi2, and the common slip \sqrt(2)
            return self.parse_atom()
        raise ParseError("missing macro argument")

    def parse_atom(self):
        self.enter()
        try:
            return self._atom()
        finally:
            self.depth -= 1

    def _atom(self):
        k, v = self.next()
        if k is None:
            raise ParseError("unexpected end")
        if k == "num":
            if self.at("op", "_") and v.isdigit():  # a numeral in a base: 52_8, 4210_{5}
                self.next()
                base = self.tex_arg()
                if base[0] != "num" or base[2] is not None or not 2 <= base[1] <= 36:
                    raise ParseError("bad base subscript")
                return ("based", v.lstrip("0") or "0", int(base[1]))
            node = number(v)
            # mixed number: 2\frac{1}{2} = 5/2 (an integer directly followed by a fraction of integers)
            if node[2] is None and node[1].denominator == 1 and self.at("cmd", "\\frac"):
                save = self.i
                self.next()
                a, b = self.tex_arg(), self.tex_arg()
                if a[0] == "num" and b[0] == "num" and a[2] is None and b[2] is None and b[1] != 0:
                    return ("num", node[1] + a[1] / b[1], None)
                self.i = save
            return node
        if k == "id":
            node = ("sym", v)
            if self.at("op", "_"):
                self.next()
                sub = self.tex_arg()
                node = ("sym", v + "_" + _sub_name(sub))
            if v in ("e", "i") and node[1] == v:
                return ("const", v)
            return node
        if k == "text":
            return ("text", v.strip())
        if k == "begin":
            return self._matrix(v)
        if k == "op":
            return self._bracket(v)
        if k == "cmd":
            return self._command(v[1:])
        raise ParseError(f"unexpected {v!r}")

    def _bracket(self, v):
        if v in ("(", "["):
            items = self.parse_items((")", "]"))
            k, close = self.next()
            if k != "op" or close not in (")", "]"):
                raise ParseError("unclosed bracket")
            if len(items) == 1 and (v + close) in ("()", "[]"):
                return items[0]
            if not items:
                raise ParseError("empty brackets")
            return ("brack", v, close, items)
        if v == "{":
            items = self.parse_items(("}",))
            self.expect("op", "}")
            if len(items) == 1:
                return items[0]
            return ("set", items)
        if v == "|":
            inner = self.parse_additive()
            self.expect("op", "|")
            return ("abs", inner)
        raise ParseError(f"unexpected {v!r}")

    def _command(self, name):
        if name == "frac":
            return ("div", self.tex_arg(), self.tex_arg())
        if name == "sqrt":
            index = None
            if self.at("op", "["):
                self.next()
                index = self.parse_additive()
                self.expect("op", "]")
            return ("sqrt", self.tex_arg(), index)
        if name == "binom":
            return ("binom", self.tex_arg(), self.tex_arg())
        if name == "pi":
            return ("const", "pi")
        if name == "infty":
            return ("const", "inf")
        if name == "emptyset":
            return ("empty",)
        if name == "{":
            items = self.parse_items(())
            self.expect("cmd", "\\}")
            return ("set", items)
        if name in ("vert", "lvert", "rvert", "|"):
            inner = self.parse_additive()
            k, v = self.next()
            if v not in ("\\vert", "\\rvert", "\\lvert", "|", "\\|"):
                raise ParseError("unclosed |")
            return ("abs", inner)
        if name == "mathbb":
            arg = self.tex_arg()
            if arg == ("sym", "R"):
                return ("brack", "(", ")", [("neg", ("const", "inf")), ("const", "inf")])
            raise ParseError("unsupported \\mathbb")
        if name in ("lfloor", "lceil"):
            inner = self.parse_additive()
            k, v = self.next()
            if v not in ("\\rfloor", "\\rceil"):
                raise ParseError("unclosed floor")
            return ("func", name[1:], inner, None, None)
        if name in NAME_CMDS:
            return ("sym", name)
        if name in DECORATIONS:  # \overline{AB}, \vec{v}: the decorated name
            return self.tex_arg()
        if name in GREEK:
            node = ("sym", name)
            if self.at("op", "_"):
                self.next()
                node = ("sym", name + "_" + _sub_name(self.tex_arg()))
            return node
        if name in FUNCS:
            return self._function(name)
        raise ParseError(f"unsupported command \\{name}")

    def _function(self, name):
        base = power = None
        for _ in range(2):
            if self.at("op", "_"):
                self.next()
                base = self.tex_arg()
            elif self.at("op", "^"):
                self.next()
                power = self.parse_power_arg()
        if self.at("op", "("):
            arg = self.parse_atom()
        elif self.at("op", "{"):
            arg = self.tex_arg()
        else:  # \sin 2x -> sin(2x): a run of implicit factors
            factors = [self.parse_power()]
            while self.peek()[0] in ("num", "id"):
                factors.append(self.parse_power())
            arg = factors[0] if len(factors) == 1 else ("mul", factors)
        return ("func", name, arg, base, power)

    def _matrix(self, env):
        if env not in MATRIX_ENVS:
            raise ParseError(f"unsupported environment {env}")
        rows, row = [], []
        while True:
            if self.at("end"):
                _, end_env = self.next()
                if end_env != env:
                    raise ParseError("mismatched \\end")
                break
            if self.peek()[0] is None:
                raise ParseError("unclosed matrix")
            row.append(self.parse_relation())
            if self.at("op", "&"):
                self.next()
            elif self.at("cmd", "\\\\"):
                self.next()
                rows.append(row)
                row = []
            if len(rows) > 30 or len(row) > 30:
                raise ParseError("matrix too large")
        if row:
            rows.append(row)
        if not rows or len({len(r) for r in rows}) != 1:
            raise ParseError("ragged matrix")
        kind = {"vmatrix": "det", "Vmatrix": "norm"}.get(env, "matrix")
        return ("matrix", kind, rows)


def _sub_name(node) -> str:
    if node[0] == "num":
        return str(node[1])
    if node[0] in ("sym", "const"):
        return node[1]
    if node[0] == "text":
        return node[1]
    raise ParseError("complex subscript")


def parse(s: str):
    """Parse a normalised answer into an AST; raise ParseError when it is not understood."""
    toks = tokenize(collapse_parens(s))
    if not toks:
        raise ParseError("empty answer")
    try:
        return _Parser(toks).parse_top()
    except RecursionError:
        raise ParseError("nesting too deep") from None


def expand_pm(node) -> list:
    """``a \\pm b`` -> [a + b, a - b]; several ± in one item expand together (all + or all -)."""
    count = [0]

    def has(n):
        if isinstance(n, tuple):
            if n and n[0] == "pm":
                count[0] += 1
            for c in n[1:]:
                has(c)
        elif isinstance(n, list):
            for c in n:
                has(c)

    has(node)
    if count[0] == 0:
        return [node]
    if count[0] > MAX_PM:
        raise ParseError("too many \\pm")

    def sub(n, s):
        if isinstance(n, list):
            return [sub(c, s) for c in n]
        if not isinstance(n, tuple) or not n:
            return n
        if n[0] == "pm":
            _, a, b, sign = n
            b = sub(b, s)
            b = b if s * sign > 0 else ("neg", b)
            return b if a is None else ("add", [sub(a, s), b])
        return (n[0],) + tuple(sub(c, s) for c in n[1:])

    return [sub(node, +1), sub(node, -1)]
