"""Exact arithmetic for answers, in-process and bounded: the verifier's fast path.

Values are rational functions N/D whose numerator and denominator are polynomials over the field
Q(i, √2, √3, √5, ...) in the answer's variables and the transcendentals π and e. A polynomial is a dict
from a key ``(n, k, monomial)`` (``√n · i^k · x^a y^b ...``, n square-free) to a ``Fraction``. Square roots of
distinct square-free integers are linearly independent over Q, so this form is canonical and equality is
decided exactly by cross-multiplication: ``N1·D2 == N2·D1``. Tiny magnitudes such as 1/2006! are therefore
compared exactly; no float tolerance is involved anywhere here.

Everything is capped (bits per number, terms per polynomial, exponents, work per evaluation), so model
output cannot make this code run long or allocate much; what exceeds a cap raises ``TooLarge`` and what
needs real symbolic algebra (trigonometry, logs, roots of expressions) raises ``NeedSymbolic`` and is
handed to sympy in a worker process with a hard timeout.
"""

from __future__ import annotations

import math
from decimal import Context, Decimal
from fractions import Fraction

MAX_BITS = 70_000  # 2006! has about 19,200 bits
BIG_BITS = 4_096
MAX_BIG_OPS = 40
MAX_OPS = 20_000
MAX_TERMS = 256
MAX_SYM_EXP = 64
MAX_POLY_POW = 24
MAX_FACT = 5_000
PI, E = "\u03c0", "\u212f"  # internal names of the transcendental constants
TRANSCENDENTAL = (PI, E)

_ONE_KEY = (1, 0, ())
_CTX = Context(prec=60, Emax=10**9, Emin=-(10**9))
_PI_DEC = Decimal("3.14159265358979323846264338327950288419716939937510582097494459")
_E_DEC = Decimal("2.71828182845904523536028747135266249775724709369995957496696763")


class NeedSymbolic(Exception):
    """The value needs symbolic algebra (sympy in a worker process)."""


class TooLarge(ArithmeticError):
    """A number exceeds the in-process caps. ``bigpow`` = (base, exponent or None) for b^e with |b| > 1."""

    def __init__(self, msg="too large", bigpow=None):
        super().__init__(msg)
        self.bigpow = bigpow


class Undefined(ArithmeticError):
    """Division by zero, 0^negative, factorial of a negative number..."""


class NotScalar(Exception):
    """A structure (list, interval, text) where a number was expected."""


class Budget:
    __slots__ = ("ops", "big")

    def __init__(self):
        self.ops = 0
        self.big = 0

    def frac(self, f: Fraction) -> Fraction:
        self.ops += 1
        if self.ops > MAX_OPS:
            raise NeedSymbolic("work budget exhausted")
        bits = max(f.numerator.bit_length(), f.denominator.bit_length())
        if bits > BIG_BITS:
            if bits > MAX_BITS:
                raise TooLarge()
            self.big += 1
            if self.big > MAX_BIG_OPS:
                raise NeedSymbolic("too many big-number operations")
        return f


# ---------------------------------------------------------------- square-free parts
def _small_primes(limit):
    sieve = bytearray([1]) * (limit + 1)
    sieve[0:2] = b"\x00\x00"
    for p in range(2, int(limit**0.5) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytearray(len(sieve[p * p :: p]))
    return [p for p in range(limit + 1) if sieve[p]]


_PRIMES = _small_primes(10_000)


def squarefree_split(n: int) -> tuple[int, int]:
    """n = s^2 * r with r square-free; exact for n < 10^12, otherwise NeedSymbolic (unless a square)."""
    if n < 0:
        raise ValueError(n)
    if n < 2:
        return 1, n
    r_ = math.isqrt(n)
    if r_ * r_ == n:
        return r_, 1
    if n >= 10**12:
        raise NeedSymbolic("radicand too large to factor in-process")
    s = r = 1
    for p in _PRIMES:
        if p * p * p > n:
            break
        if n % p:
            continue
        pp = p * p
        while n % pp == 0:
            n //= pp
            s *= p
        if n % p == 0:
            n //= p
            r *= p
    q = math.isqrt(n)
    if q * q == n:
        s *= q
    else:
        r *= n
    return s, r


# ---------------------------------------------------------------- polynomials
def _key_mul(a, b):
    n1, k1, m1 = a
    n2, k2, m2 = b
    coef = 1
    if n1 == 1 or n2 == 1:
        n = n1 * n2
    else:
        g = math.gcd(n1, n2)
        n = (n1 // g) * (n2 // g)
        coef = g
    k = k1 + k2
    if k == 2:
        k, coef = 0, -coef
    if not m1:
        m = m2
    elif not m2:
        m = m1
    else:
        d = dict(m1)
        for name, e in m2:
            d[name] = d.get(name, 0) + e
        m = tuple(sorted((x, e) for x, e in d.items() if e))
    return (n, k, m), coef


class Poly:
    __slots__ = ("t",)

    def __init__(self, t=None):
        self.t = t if t is not None else {}

    @staticmethod
    def const(f) -> "Poly":
        f = Fraction(f)
        return Poly({_ONE_KEY: f} if f else {})

    @staticmethod
    def sym(name) -> "Poly":
        return Poly({(1, 0, ((name, 1),)): Fraction(1)})

    def __eq__(self, other):
        return self.t == other.t

    def is_zero(self):
        return not self.t

    def rational(self):
        """The value as a Fraction when the polynomial is a rational constant, else None."""
        if not self.t:
            return Fraction(0)
        if len(self.t) == 1 and _ONE_KEY in self.t:
            return self.t[_ONE_KEY]
        return None

    def variables(self):
        return {x for (_, _, m) in self.t for x, _ in m if x not in TRANSCENDENTAL}

    def add(self, other, B, sign=1):
        t = dict(self.t)
        for key, c in other.t.items():
            v = t.get(key, 0) + (c if sign > 0 else -c)
            if v:
                t[key] = B.frac(v)
            else:
                t.pop(key, None)
        if len(t) > MAX_TERMS:
            raise NeedSymbolic("too many terms")
        return Poly(t)

    def neg(self):
        return Poly({k: -c for k, c in self.t.items()})

    def mul(self, other, B):
        if len(self.t) * len(other.t) > 4 * MAX_TERMS:
            raise NeedSymbolic("product too large")
        t: dict = {}
        for k1, c1 in self.t.items():
            for k2, c2 in other.t.items():
                key, coef = _key_mul(k1, k2)
                for _, e in key[2]:
                    if abs(e) > MAX_SYM_EXP:
                        raise TooLarge("exponent of a variable too large")
                v = t.get(key, 0) + B.frac(c1 * c2 * coef)
                if v:
                    t[key] = B.frac(v)
                else:
                    t.pop(key, None)
        if len(t) > MAX_TERMS:
            raise NeedSymbolic("too many terms")
        return Poly(t)

    def single(self):
        """(key, coefficient) when the polynomial is one term, else None."""
        if len(self.t) == 1:
            return next(iter(self.t.items()))
        return None


def _monomial_inverse(key, c, B):
    """1 / (c · √n · i^k · m)  =  (1/(c n)) · √n · (-i)^k · m^-1."""
    n, k, m = key
    coef = Fraction(1) / (c * n)
    if k:
        coef = -coef
    return Poly({(n, k, tuple((x, -e) for x, e in m)): B.frac(coef)})


class RF:
    """A rational function num/den; never reduced, compared by cross-multiplication."""

    __slots__ = ("num", "den")

    def __init__(self, num: Poly, den: Poly | None = None):
        self.num = num
        self.den = den if den is not None else Poly.const(1)

    @staticmethod
    def const(f):
        return RF(Poly.const(f))

    def equals(self, other, B) -> bool:
        if self.den == other.den:  # the common case (no denominators): canonical numerators
            return self.num == other.num
        return self.num.mul(other.den, B) == other.num.mul(self.den, B)

    def rational(self):
        a, b = self.num.rational(), self.den.rational()
        return None if a is None or b is None or b == 0 else a / b

    def is_constant(self):
        return not self.num.variables() and not self.den.variables()

    def add(self, o, B, sign=1):
        if self.den == o.den:
            return RF(self.num.add(o.num, B, sign), self.den)
        return RF(self.num.mul(o.den, B).add(o.num.mul(self.den, B), B, sign), self.den.mul(o.den, B))

    def mul(self, o, B):
        return RF(self.num.mul(o.num, B), self.den.mul(o.den, B))

    def inverse(self, B):
        if self.num.is_zero():
            raise Undefined("division by zero")
        one = self.num.single()
        if one is not None:  # 1/(c·t) has a closed form: keep the denominator simple
            return RF(self.den.mul(_monomial_inverse(one[0], one[1], B), B))
        return RF(self.den, self.num)

    def div(self, o, B):
        return self.mul(o.inverse(B), B)


# ---------------------------------------------------------------- powers and roots
def _int_pow_fraction(b: Fraction, e: int, B) -> Fraction:
    if b == 0:
        if e < 0:
            raise Undefined("0 to a negative power")
        return Fraction(0 if e else 1)
    if abs(b) == 1:
        return Fraction(1) if (b == 1 or e % 2 == 0) else Fraction(-1)
    bits = max(b.numerator.bit_length(), b.denominator.bit_length())
    if (bits - 1) * abs(e) > MAX_BITS:
        raise TooLarge("power too large")
    return B.frac(b**e)


def poly_pow(p: Poly, e: int, B) -> Poly:
    """p**e for e >= 0: a closed form for one term, repeated squaring (capped) for a sum."""
    one = p.single()
    if one is not None:
        (n, k, m), c = one
        half, odd = divmod(e, 2)
        coef = _int_pow_fraction(c, e, B) * _int_pow_fraction(Fraction(n), half, B)
        ik = (k * e) % 4
        if ik >= 2:
            coef, ik = -coef, ik - 2
        mono = tuple((x, ex * e) for x, ex in m)
        if any(abs(ex) > MAX_SYM_EXP for _, ex in mono):
            raise TooLarge("exponent of a variable too large")
        return Poly({(n if odd else 1, ik, mono): B.frac(coef)})
    if p.is_zero():
        return Poly.const(0 if e else 1)
    if e > MAX_POLY_POW:
        raise NeedSymbolic("power of a sum too large")
    result, base, k = Poly.const(1), p, e
    while k:
        if k & 1:
            result = result.mul(base, B)
        k >>= 1
        if k:
            base = base.mul(base, B)
    return result


def rf_pow(v: RF, e: Fraction, B) -> RF:
    if e.denominator == 1:
        k = e.numerator
        r = v.rational()
        if r is not None:
            if r == 0 and k < 0:
                raise Undefined("0 to a negative power")
            return RF.const(_int_pow_fraction(r, k, B))
        out = RF(poly_pow(v.num, abs(k), B), poly_pow(v.den, abs(k), B))
        return out.inverse(B) if k < 0 else out
    r = v.rational()
    if r is None:
        raise NeedSymbolic("fractional power of a non-rational")
    q = e.denominator
    base = rf_pow(RF.const(r), Fraction(e.numerator), B).rational()
    return root(base, q, B)


def _exact_root(n: int, q: int):
    """The exact integer q-th root of n, or None. Float-seeded, so only for n below 2^1000."""
    if n < 2:
        return n
    if n.bit_length() >= 1000:
        raise NeedSymbolic("higher root of a huge number")
    x = int(n ** (1.0 / q) * (1 + 1e-9)) + 2  # above the root; integer Newton steps down to floor(root)
    while True:
        y = ((q - 1) * x + n // x ** (q - 1)) // q
        if y >= x:
            break
        x = y
    r = x
    for c in (r - 1, r, r + 1):
        if c >= 0 and c**q == n:
            return c
    return None


def root(r: Fraction, q: int, B) -> RF:
    """The principal q-th root of a rational (i·√|r| for a negative r and q = 2)."""
    if r == 0:
        return RF.const(0)
    if q == 2:
        neg = r < 0
        a, b = abs(r.numerator), r.denominator
        s1, r1 = squarefree_split(a * b)
        coef = B.frac(Fraction(s1, b))
        if not coef:
            return RF.const(0)
        return RF(Poly({(r1, 1 if neg else 0, ()): coef}))
    if q > 64:
        raise NeedSymbolic("root index too large")
    neg = r < 0
    if neg and q % 2 == 0:
        raise NeedSymbolic("even root of a negative number")
    a, b = _exact_root(abs(r.numerator), q), _exact_root(r.denominator, q)
    if a is None or b is None:
        raise NeedSymbolic("irrational higher root")
    return RF.const(Fraction(-a if neg else a, b))


# ---------------------------------------------------------------- numeric value
def approx(v: RF):
    """(real, imag) as Decimals with 60 significant digits, for constants only; None with variables."""
    if not v.is_constant():
        return None

    def poly_val(p):
        re_, im_ = Decimal(0), Decimal(0)
        for (n, k, m), c in p.t.items():
            x = _CTX.divide(Decimal(c.numerator), Decimal(c.denominator))
            if n != 1:
                x = _CTX.multiply(x, _CTX.sqrt(Decimal(n)))
            for name, e in m:
                x = _CTX.multiply(x, _CTX.power(_PI_DEC if name == PI else _E_DEC, e))
            if k:
                im_ = _CTX.add(im_, x)
            else:
                re_ = _CTX.add(re_, x)
        return re_, im_

    a, b = poly_val(v.num)
    c, d = poly_val(v.den)
    den = _CTX.add(_CTX.multiply(c, c), _CTX.multiply(d, d))
    if den == 0:
        return None
    re_ = _CTX.divide(_CTX.add(_CTX.multiply(a, c), _CTX.multiply(b, d)), den)
    im_ = _CTX.divide(_CTX.subtract(_CTX.multiply(b, c), _CTX.multiply(a, d)), den)
    return re_, im_


def real_sign(v: RF):
    """-1, 0 or 1 for a real constant; None when unknown (variables, complex, cancellation)."""
    r = v.rational()
    if r is not None:
        return (r > 0) - (r < 0)
    ap = approx(v)
    if ap is None:
        return None
    re_, im_ = ap
    scale = max(abs(re_), abs(im_))
    if scale == 0 or abs(im_) > scale * Decimal("1e-40"):
        return None
    return 1 if re_ > 0 else -1


def is_finite_decimal(v: RF) -> bool:
    r = v.rational()
    if r is None:
        return False
    d = r.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1
