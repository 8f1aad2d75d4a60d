"""MLP expressions in the paper's notation: printing, parsing and functional equivalence.

The template has three slots (see :mod:`.modeling`). A layer's expression prints as, e.g.,
``linear2(gelu(linear1(x)))`` or ``linear2(relu(mul(linear1(x),x)))``. Printing is
deterministic: ``act_first`` slots print as ``binary(operand, act(h))`` and ``binary_first``
slots as ``act(binary(h, operand))``; the parser accepts the arguments of the (commutative)
binary ops in either order.

A slot whose binary op takes its own input as the second operand (``operand: input``) uses
that input twice. Inlined, ``mul(linear2(...),tanh(linear2(...)))`` would read as two
applications of ``linear2``, so the printer names the output of ``linear1`` ``h1`` and that
of ``linear2`` ``h2`` where a slot uses it twice::

    h2 = linear2(gelu(linear1(x))); mul(h2,tanh(h2))

:func:`parse_expression` reads both forms (named statements are substituted back).
"""
import re
from functools import lru_cache
from itertools import product
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .modeling import OPERANDS, ORDERS, SLOTS, SlotSpec
from .ops import BINARY_OPS, NO_BINARY, UNARY_OPS

Tree = Tuple  # ('x',) or (name, child, ...)
X: Tree = ("x",)


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------

def _call(name: str, *args: str) -> str:
    return f"{name}({','.join(args)})"


def slot_to_string(slot: SlotSpec, h: str, x: str = "x") -> str:
    """Print a slot applied to the string ``h`` (its input); ``x`` is the MLP input."""
    act = (lambda s: s) if slot.act == "identity" else (lambda s: _call(slot.act, s))
    if slot.binary == NO_BINARY:
        return act(h)
    other = x if slot.operand == "x" else h
    if slot.order == "act_first" and slot.act != "identity":
        return _call(slot.binary, other, act(h))
    return act(_call(slot.binary, h, other))


def _uses_input_twice(slot: SlotSpec) -> bool:
    return slot.binary != NO_BINARY and slot.operand == "input"


#: Names the printer gives the outputs of ``linear1`` / ``linear2`` when a slot uses them twice.
LINEAR_NAMES = {"linear1": "h1", "linear2": "h2"}


def expression_to_string(pre: SlotSpec, mid: SlotSpec, post: SlotSpec) -> str:
    """Print a layer's expression; see the module docstring for the named form.

    Examples
    --------
    >>> from .modeling import SlotSpec
    >>> expression_to_string(SlotSpec(), SlotSpec("gelu"), SlotSpec("tanh", "mul", "input", "act_first"))
    'h2 = linear2(gelu(linear1(x))); mul(h2,tanh(h2))'
    """
    statements: List[str] = []
    h = slot_to_string(pre, "x")
    for linear, slot in (("linear1", mid), ("linear2", post)):
        h = _call(linear, h)
        if _uses_input_twice(slot):
            name = LINEAR_NAMES[linear]
            statements.append(f"{name} = {h}")
            h = name
        h = slot_to_string(slot, h)
    return "; ".join([*statements, h])


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

class ExpressionError(ValueError):
    """An expression string the template cannot express."""


def parse_tree(text: str, names: Optional[Dict[str, Tree]] = None) -> Tree:
    """Parse ``name(arg, ...)`` / ``x`` into a nested tuple tree; a leaf in ``names`` is
    replaced by its tree (the statements of the named form)."""
    names = names or {}
    tokens: List[str] = []
    word = ""
    for ch in text.replace(" ", ""):
        if ch.isalnum() or ch == "_":
            word += ch
            continue
        if ch not in "(),":
            raise ExpressionError(f"unexpected character {ch!r} in expression {text!r}")
        if word:
            tokens.append(word)
            word = ""
        tokens.append(ch)
    if word:
        tokens.append(word)
    pos = 0

    def parse() -> Tree:
        nonlocal pos
        if pos >= len(tokens) or tokens[pos] in "(),":
            raise ExpressionError(f"expected a name at token {pos} of {text!r}")
        name = tokens[pos]
        pos += 1
        if pos < len(tokens) and tokens[pos] == "(":
            pos += 1
            args = [parse()]
            while tokens[pos] == ",":
                pos += 1
                args.append(parse())
            if tokens[pos] != ")":
                raise ExpressionError(f"expected ')' in {text!r}")
            pos += 1
            return (name, *args)
        if name in names:
            return names[name]
        if name != "x":
            defined = f" or a name defined before ({', '.join(sorted(names))})" if names else ""
            raise ExpressionError(f"{name!r} in {text!r} needs arguments; the only leaf is 'x'{defined}")
        return X

    try:
        tree = parse()
    except IndexError:
        raise ExpressionError(f"unbalanced parentheses in expression {text!r}") from None
    if pos != len(tokens):
        raise ExpressionError(f"trailing text after position {pos} in expression {text!r}")
    return tree


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_statements(text: str) -> Tree:
    """Parse an expression, plain (``linear2(gelu(linear1(x)))``) or with named intermediates
    (``h2 = linear2(gelu(linear1(x))); mul(h2,tanh(h2))``), into one tree with the names
    substituted.

    Raises
    ------
    ExpressionError
        On a malformed statement, a name that shadows ``x`` or an op, or a name defined twice.
    """
    if not isinstance(text, str):
        raise ExpressionError(f"an expression must be a string, got {type(text).__name__}")
    *assignments, last = text.split(";")
    names: Dict[str, Tree] = {}
    for statement in assignments:
        name, eq, value = statement.partition("=")
        name = name.strip()
        if not eq or not _NAME.fullmatch(name):
            raise ExpressionError(f"statement {statement.strip()!r} in {text!r} is not 'name = expression'; "
                                  "only the last statement of an expression is unnamed")
        if name == "x" or name in UNARY_OPS or name in BINARY_OPS or name in ("linear1", "linear2"):
            raise ExpressionError(f"{name!r} in {text!r} names x or an op; pick another name, like h1")
        if name in names:
            raise ExpressionError(f"{name!r} is defined twice in {text!r}")
        names[name] = parse_tree(value, names)
    return parse_tree(last, names)


def _is_base(tree: Tree, linear: Optional[str]) -> bool:
    return tree == X if linear is None else (tree[0] == linear and len(tree) == 2)


def _split_slot(tree: Tree, linear: Optional[str], text: str) -> Tuple[SlotSpec, Tree]:
    """Match one slot around ``linear`` (``None``: the pre slot around ``x``).

    Returns the slot and the slot's input (``x`` or the ``linear(...)`` node).
    """
    def fail(why: str):
        where = "the pre slot (around x)" if linear is None else f"the slot around {linear}"
        raise ExpressionError(
            f"expression {text!r} does not fit the template at {where}: {why}. The template is "
            f"post(linear2(mid(linear1(pre(x))))), each slot being act(h), binary(operand, act(h)) "
            f"or act(binary(h, operand)) with operand x or h; acts {sorted(UNARY_OPS)}, "
            f"binary ops {sorted(BINARY_OPS)}")

    def operand_of(other: Tree, base: Tree) -> str:
        if other == X:
            return "x"
        if other == base:
            return "input"
        fail(f"second operand {other!r} must be x or the slot's input")

    def sides(node: Tree) -> Tuple[Tree, Tree]:
        """(h side, other side) of a binary node; h is the side holding the slot's input."""
        if len(node) != 3:
            fail(f"{node[0]} takes two arguments")
        a, b = node[1], node[2]
        def holds(t):
            return _is_base(t, linear) or (t[0] in UNARY_OPS and len(t) == 2 and _is_base(t[1], linear))
        # Prefer the activated side as h (act_first), then the side that holds the linear.
        for h, o in ((b, a), (a, b)):
            if holds(h) and h != X and h[0] in UNARY_OPS:
                return h, o
        for h, o in ((a, b), (b, a)):
            if holds(h):
                return h, o
        fail(f"neither argument of {node[0]} is the slot's input")

    if _is_base(tree, linear):
        return SlotSpec(), tree
    name = tree[0]
    if name in UNARY_OPS and len(tree) == 2:
        inner = tree[1]
        if _is_base(inner, linear):
            return SlotSpec(act=name), inner
        if inner[0] in BINARY_OPS:
            h, other = sides(inner)
            if not _is_base(h, linear):
                fail(f"{name} applied to {inner[0]} of an activation: no activation may be applied to another")
            return SlotSpec(act=name, binary=inner[0], operand=operand_of(other, h), order="binary_first"), h
        fail(f"{name} must be applied to the slot's input or to a binary op of it")
    if name in BINARY_OPS:
        h, other = sides(tree)
        if _is_base(h, linear):
            return SlotSpec(binary=name, operand=operand_of(other, h)), h
        return SlotSpec(act=h[0], binary=name, operand=operand_of(other, h[1]), order="act_first"), h[1]
    fail(f"unknown op {name!r}")


def parse_expression(text: str) -> Tuple[SlotSpec, SlotSpec, SlotSpec]:
    """Parse a paper-notation expression into its (pre, mid, post) slots.

    Raises
    ------
    ExpressionError
        If the template cannot express it (the message says where and why).
    """
    tree = parse_statements(text)
    post, base2 = _split_slot(tree, "linear2", text)
    mid, base1 = _split_slot(base2[1], "linear1", text)
    pre, base0 = _split_slot(base1[1], None, text)
    assert base0 == X
    if pre.operand != "x":  # pre's input is x itself
        pre = SlotSpec(pre.act, pre.binary, "x", pre.order)
    return pre, mid, post


# --------------------------------------------------------------------------------------------
# Functional equivalence of slots
# --------------------------------------------------------------------------------------------

def all_slots(unary_ops: Sequence[str], binary_ops: Sequence[str], pre: bool) -> List[SlotSpec]:
    """Every slot the labels can encode (simplest first: no binary op, then identity acts)."""
    out = []
    for b, a, operand, order in product((NO_BINARY, *binary_ops), unary_ops, OPERANDS, ORDERS):
        if pre and operand != "x":
            continue
        out.append(SlotSpec(a, b, operand, order))
    return out


def _slot_signature(slot: SlotSpec, seeds: Sequence[int], pre: bool) -> torch.Tensor:
    outs = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        h = torch.randn(64, 8, generator=g, dtype=torch.float64) * 3
        x = h if pre else torch.randn(64, 8, generator=g, dtype=torch.float64) * 3
        outs.append(slot(h, x))
    return torch.stack(outs)


@lru_cache(maxsize=None)
def slot_classes(unary_ops: Tuple[str, ...], binary_ops: Tuple[str, ...], pre: bool) -> Dict[SlotSpec, SlotSpec]:
    """Map every encodable slot to the representative of its class of equal functions.

    Two slots are equal when their outputs agree (``allclose``) on random ``(h, x)`` at several
    seeds; the representative is the first of the class in a fixed order (simplest first), so the
    mapping does not depend on the order of queries. This catches both the trivial equalities
    (order or operand of an absent binary op, ``max(a,b)`` vs ``max(b,a)``) and non-obvious ones
    such as ``max(h,relu(h)) == relu(h)``.
    """
    seeds = (0, 1, 2)
    reps: List[Tuple[SlotSpec, torch.Tensor]] = []
    mapping: Dict[SlotSpec, SlotSpec] = {}
    for slot in all_slots(unary_ops, binary_ops, pre):
        sig = _slot_signature(slot, seeds, pre)
        for rep, rep_sig in reps:
            if torch.allclose(sig, rep_sig, rtol=1e-9, atol=1e-9):
                mapping[slot] = rep
                break
        else:
            reps.append((slot, sig))
            mapping[slot] = slot
    return mapping
