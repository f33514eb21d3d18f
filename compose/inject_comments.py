"""Comments in `meshlet inject`: where ruamel keeps the lines between entries, and how
they move when inject changes what an entry or a service ends with.

For: compose/inject_yaml.py (``attach_comments_to_what_they_follow`` on every load),
compose/inject_apply.py and compose/inject_undo.py. Must never: drop a comment line
(what cannot be placed exactly is placed nearby), or change the text of one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark
from ruamel.yaml.mergevalue import merge_attrib
from ruamel.yaml.scalarstring import FoldedScalarString, LiteralScalarString
from ruamel.yaml.tokens import CommentToken

from compose.inject_nodes import delete, merge_sources, own_keys

# ruamel keeps the comment lines (and blank lines) that follow a node with the deepest
# last scalar inside it, after that scalar's end-of-line comment. Visually they belong to
# what comes next (the next service), so when inject changes what a service ends with,
# it moves them to the new end, and records how many lines it moved, so uninject can
# move exactly those back. Only the regular places are handled (a last value that is a
# plain, flow or empty value); after a block scalar (``|``, ``>``) nothing moves.

_BLOCK_SCALARS = (LiteralScalarString, FoldedScalarString)


def _tail_slot(node: Any) -> tuple[Any, int] | None:
    """The comment entry (ruamel's ``ca.items[key]`` list, index) after ``node``'s last line."""
    while True:
        if isinstance(node, CommentedMap | CommentedSeq) and (node.ca.end or node.fa.flow_style()):
            return None
        if isinstance(node, CommentedMap):
            keys = own_keys(node)
            merged = getattr(node, merge_attrib, None)
            if not keys or (merged and (merged.merge_pos or 0) >= len(keys)):
                return None
            key: Any = keys[-1]
            index = 2
        elif isinstance(node, CommentedSeq) and len(node):
            key, index = len(node) - 1, 0
        else:
            return None
        value = node[key]
        if isinstance(value, CommentedMap | CommentedSeq) and value and not value.fa.flow_style():
            node = value
            continue
        if isinstance(value, _BLOCK_SCALARS):
            return None
        entry = node.ca.items.setdefault(key, [None, None, None, None])
        return entry, index


def _split_comment(value: str) -> tuple[str, str] | None:
    """A comment token's text → (end-of-line part, the lines after it)."""
    if value.startswith("#"):
        end = value.find("\n")
        return (value[: end + 1], value[end + 1 :]) if end >= 0 else None
    if value.startswith("\n"):
        return "\n", value[1:]
    return None


def take_trailer(node: Any) -> tuple[str, Any]:
    """Detach the lines after ``node``'s last line: (text, a handle to put them back)."""
    slot = _tail_slot(node)
    token = slot[0][slot[1]] if slot else None
    parts = _split_comment(token.value) if token is not None else None
    if token is None or parts is None:
        return "", None
    token.value = parts[0]
    return parts[1], token


def attach_comments_to_what_they_follow(root: Any) -> None:
    """ruamel keeps the comment lines between two entries either after the first (most
    values) or before the second (after a flow collection): move the second kind to the
    first, where moving an entry takes them along. The text written stays the same."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, CommentedMap):
            keys = own_keys(node)
            merged = getattr(node, merge_attrib, None)
            merge_at = (merged.merge_pos or 0) if merged else -1
            for i in range(1, len(keys)):
                entry = node.ca.items.get(keys[i])
                if not entry or not entry[1] or merge_at == i:
                    continue
                lines = "".join(_comment_line(t) for t in entry[1])
                if give_after_entry(node, keys[i - 1], lines):
                    entry[1] = None
            stack.extend(node[k] for k in keys)
            stack.extend(merge_sources(node))
        elif isinstance(node, CommentedSeq):
            stack.extend(node)


def _comment_line(token: Any) -> str:
    value = str(token.value)
    if value.startswith("#"):
        return " " * int(token.column) + value
    return value


def give_after_entry(m: CommentedMap, key: Any, text: str) -> bool:
    """Attach ``text`` (whole lines) after entry ``key`` of ``m``; False if it cannot."""
    value = m[key]
    if isinstance(value, CommentedMap | CommentedSeq) and value and not value.fa.flow_style():
        return give_trailer(value, text)
    if isinstance(value, _BLOCK_SCALARS):
        return False
    entry = m.ca.items.setdefault(key, [None, None, None, None])
    token = entry[2]
    if token is None:
        entry[2] = CommentToken("\n" + text, CommentMark(0), None)
        return True
    if _split_comment(token.value) is None:
        return False
    token.value = token.value + text
    return True


def keep_value(
    src: CommentedMap, key: Any, dst: CommentedMap, *, shift: int, remove: bool = False
) -> None:
    """Copy ``src[key]`` into ``dst``, ``shift`` columns deeper (or shallower), with the
    comment on its key's line: ``src[key]`` is about to get a new value, whose layout
    that comment would not fit.

    Comment columns move with the value, so a comment that followed it by two spaces
    still does, and moving it back by ``-shift`` gives the same columns again.
    ``remove`` deletes it from ``src``."""
    value = src[key]
    dst[key] = value
    shifted = shift_comments(value, shift)
    entry = src.ca.items.get(key)
    for index in (2, 3):  # after the key; before the value's first entry
        if entry and entry[index] is not None:
            for token in _tokens(entry[index]):
                if id(token) not in shifted:
                    shifted.add(id(token))
                    _shift(token, shift)
            dst.ca.items.setdefault(key, [None, None, None, None])[index] = entry[index]
            entry[index] = None
    if remove:  # else the caller gives src[key] a new value in its place
        delete(src, key)


def shift_comments(node: Any, delta: int) -> set[int]:
    """Move every comment inside ``node`` ``delta`` columns right (left if negative);
    the ids of the comments moved."""
    seen: set[int] = set()
    shifted: set[int] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, CommentedMap | CommentedSeq) or id(n) in seen:
            continue
        seen.add(id(n))
        for slot in (n.ca.comment, n.ca.end, *n.ca.items.values()):
            for token in _tokens(slot):
                if id(token) not in shifted:
                    shifted.add(id(token))
                    _shift(token, delta)
        stack.extend(n.values() if isinstance(n, CommentedMap) else n)
    return shifted


def _tokens(slot: Any) -> Iterator[Any]:
    if isinstance(slot, CommentToken):
        yield slot
    elif isinstance(slot, list):
        for item in slot:
            yield from _tokens(item)


def _shift(token: Any, delta: int) -> None:
    token.start_mark = CommentMark(max(0, token.start_mark.column + delta))


def take_lines_of(m: CommentedMap, key: Any, *, before: bool = True) -> str:
    """Detach the comment lines written after entry ``key`` (not its end-of-line
    comment), and those before it unless ``before`` is False: what must not vanish
    with the entry or its value."""
    entry = m.ca.items.get(key)
    lines = ""
    if before and entry and entry[1]:
        lines = "".join(_comment_line(t) for t in entry[1])
        entry[1] = None
    value = m[key]
    if isinstance(value, CommentedMap | CommentedSeq) and value and not value.fa.flow_style():
        after, _ = take_trailer(value)
    elif entry and entry[2] is not None and (parts := _split_comment(entry[2].value)):
        entry[2].value, after = parts
    else:
        after = ""
    return lines + after


def keep_lines(root: CommentedMap, key: Any, text: str) -> None:
    """Put ``text`` (whole comment lines) right after the top-level entry ``key``."""
    if not text or give_trailer(root[key], text):
        return
    keys = own_keys(root)
    following = keys[keys.index(key) + 1 :]
    token = CommentToken(text, CommentMark(0), None)
    if following:
        entry = root.ca.items.setdefault(following[0], [None, None, None, None])
        entry[1] = [token, *(entry[1] or [])]
    else:
        root.ca.end = [token, *(root.ca.end or [])]


def put_back(handle: Any, text: str) -> None:
    if handle is not None and text:
        handle.value = handle.value + text


def give_trailer(node: Any, text: str) -> bool:
    """Attach ``text`` (whole lines) after ``node``'s last line; False if it cannot."""
    if not text:
        return True
    slot = _tail_slot(node)
    if slot is None:
        return False
    entry, index = slot
    token = entry[index]
    if token is None:
        entry[index] = CommentToken("\n" + text, CommentMark(0), None)
    elif _split_comment(token.value) is None:
        return False
    else:
        token.value = token.value + text
    return True


def take_last_lines(node: Any, count: int) -> str | None:
    """Detach the last ``count`` trailer lines after ``node`` (what give_trailer added)."""
    slot = _tail_slot(node)
    token = slot[0][slot[1]] if slot else None
    parts = _split_comment(token.value) if token is not None else None
    if token is None or parts is None:
        return None
    lines = parts[1].splitlines(keepends=True)
    if count < 1 or len(lines) < count:
        return None
    token.value = parts[0] + "".join(lines[:-count])
    return "".join(lines[-count:])


def line_count(text: str) -> int:
    return len(text.splitlines())
