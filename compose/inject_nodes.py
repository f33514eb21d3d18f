"""Small tools on ruamel's round-trip nodes for `meshlet inject`: the keys a mapping
sets itself versus those it takes from a merge key (``<<``), key order with the merge
key's place, moving and deleting entries with the comments kept on them, building
nodes, copying without comments or anchors, and counting references (aliases).

For: compose/inject*.py. Must never: parse or print YAML text, or lose a comment on an
entry it moves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.mergevalue import merge_attrib
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, LiteralScalarString

MERGE = "<<"


def own_keys(m: CommentedMap) -> list[Any]:
    """The keys ``m`` sets itself, in order (not those it only takes from ``<<``)."""
    own = m._ok
    return [k for k in m if k in own]


def merge_sources(m: CommentedMap) -> list[CommentedMap]:
    merged = getattr(m, merge_attrib, None)
    return list(merged) if merged else []


def merged_keys(m: CommentedMap) -> set[Any]:
    """Every key ``m``'s merge keys provide (through nested merges too)."""
    keys: set[Any] = set()
    for src in merge_sources(m):
        keys.update(src.keys())
    return keys


def key_order(m: CommentedMap) -> list[Any]:
    """Own keys in order, with ``MERGE`` where the merge key stands."""
    keys = own_keys(m)
    merged = getattr(m, merge_attrib, None)
    if merged:
        keys.insert(min(merged.merge_pos or 0, len(keys)), MERGE)
    return keys


def set_key_order(m: CommentedMap, order: Iterable[Any]) -> None:
    """Order ``m``'s own keys (and the merge key) as ``order`` says; keys it does not
    name keep their order after the named ones."""
    wanted = [k for k in order if k == MERGE or k in m._ok]
    rest = [k for k in key_order(m) if k not in wanted]
    final = wanted + rest
    for k in final:
        if k != MERGE:
            m.move_to_end(k)
    merged = getattr(m, merge_attrib, None)
    if merged and MERGE in final:
        merged.merge_pos = final.index(MERGE)


def move_entry(src: CommentedMap, key: Any, dst: CommentedMap) -> None:
    """Move ``key`` from ``src`` to the end of ``dst`` with the comments kept on it."""
    value = src[key]
    comments = src.ca.items.pop(key, None)
    delete(src, key)
    dst[key] = value
    if comments is not None:
        dst.ca.items[key] = comments


def delete(m: CommentedMap, key: Any) -> None:
    """Remove an own key and its comments, keeping the merge key where it stands."""
    order = [k for k in key_order(m) if k != key]
    m.ca.items.pop(key, None)
    del m[key]
    set_key_order(m, order)


def insert(m: CommentedMap, pos: int, key: Any, value: Any) -> None:
    """Insert an own key at ``pos`` among the own keys (the merge key counts as one)."""
    order = key_order(m)
    order.insert(pos, key)
    m[key] = value
    set_key_order(m, order)


# --- building and copying nodes -----------------------------------------------------


def cmap(*pairs: tuple[Any, Any], flow: bool = False) -> CommentedMap:
    m = CommentedMap()
    for k, v in pairs:
        m[k] = v
    if flow:
        m.fa.set_flow_style()
    else:
        m.fa.set_block_style()
    return m


def cseq(items: Iterable[Any], *, flow: bool = False) -> CommentedSeq:
    s = CommentedSeq(items)
    if flow:
        s.fa.set_flow_style()
    else:
        s.fa.set_block_style()
    return s


def quoted(text: str) -> str:
    """A string docker-compose's YAML 1.1 reader must not take for a number (``1337:1337``)."""
    result: str = DoubleQuotedScalarString(text)
    return result


def literal(text: str) -> str:
    """A multi-line string written as a ``|`` block."""
    result: str = LiteralScalarString(text)
    return result


def plain_copy(value: Any) -> Any:
    """A deep copy with no comments and no anchors (so it never becomes an alias), that
    spells out what merge keys provided; scalars keep their quoting."""
    if isinstance(value, dict):
        m = CommentedMap()
        for k, v in value.items():
            m[_plain_scalar(k)] = plain_copy(v)
        if isinstance(value, CommentedMap) and value.fa.flow_style():
            m.fa.set_flow_style()
        return m
    if isinstance(value, list):
        s = CommentedSeq(plain_copy(v) for v in value)
        if isinstance(value, CommentedSeq) and value.fa.flow_style():
            s.fa.set_flow_style()
        return s
    return _plain_scalar(value)


def _plain_scalar(value: Any) -> Any:
    anchor = getattr(value, "anchor", None)
    if anchor is None or getattr(anchor, "value", None) is None:
        return value
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


def reference_counts(root: Any) -> dict[int, int]:
    """How many places refer to each mapping and list (an anchor and its aliases are one
    object in several places; a merge key's source counts as a place too)."""
    counts: dict[int, int] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, CommentedMap):
            children = [node[k] for k in own_keys(node)] + merge_sources(node)
        elif isinstance(node, list):
            children = list(node)
        else:
            continue
        for child in children:
            if isinstance(child, dict | list):
                seen = id(child) in counts
                counts[id(child)] = counts.get(id(child), 0) + 1
                if not seen:
                    stack.append(child)
    return counts
