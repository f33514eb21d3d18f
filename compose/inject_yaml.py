"""Round-trip YAML for `meshlet inject`: load safely, and dump the same bytes back.

For: compose/inject.py. ``load`` refuses what a compose file must not contain (object
tags, aliases that expand past ``MAX_NODES``, recursive aliases, several documents,
duplicate keys) before anything is built, and guesses the file's indentation so that
``dump(load(text)) == text`` for files written in one consistent style; line endings
(LF or CRLF) are kept. Comments are put where moving an entry takes them along
(compose/inject_comments.py).

Must never: construct an object from a tag (only the core schema's tags load), expand an
alias, read or write files, or print.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from compose.inject_comments import attach_comments_to_what_they_follow
from meshlet.errors import InputError

MAX_NODES = 100_000  # a compose file with aliases expanded stays far below this
_CORE = "tag:yaml.org,2002:"
ALLOWED_TAGS = frozenset(
    _CORE + t for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge", "timestamp")
)


@dataclass(slots=True)
class Document:
    """A loaded compose file and how to write it back in its own style."""

    root: Any
    yaml: YAML
    crlf: bool
    indent: int  # of a nested mapping: how much deeper a value one level down is written

    def dump(self) -> str:
        out = io.StringIO()
        self.yaml.dump(self.root, out)
        text = out.getvalue()
        return text.replace("\n", "\r\n") if self.crlf else text


def load(text: str, *, source: str) -> Document:
    """Parse one compose document, refusing unsafe or malformed input (InputError)."""
    crlf = "\r\n" in text
    if crlf:
        text = text.replace("\r\n", "\n")
    mapping, sequence, offset = guess_indent(text)
    yaml = YAML(typ="rt", pure=True)
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap the user's long lines
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    yaml.explicit_start = _first_content_line(text) == "---"
    try:
        node = yaml.compose(text)
        if node is not None:
            _check_nodes(node, source=source)
        root = yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join((e.problem or e.context or "malformed").split())
        if "another document" in problem:
            raise InputError(
                f"{source}: a second YAML document starts{where}: a compose file is one "
                "document; split it into several files"
            ) from None
        raise InputError(f"{source}: not valid YAML{where}: {problem}") from None
    except YAMLError as e:
        first = " ".join(str(e).split()) or type(e).__name__
        raise InputError(f"{source}: not valid YAML: {first}") from None
    except RecursionError:
        raise InputError(f"{source}: nested too deeply to be a compose file") from None
    attach_comments_to_what_they_follow(root)
    return Document(root=root, yaml=yaml, crlf=crlf, indent=mapping)


def _first_content_line(text: str) -> str:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return stripped
    return ""


def guess_indent(text: str) -> tuple[int, int, int]:
    """(mapping indent, sequence indent, dash offset) as ruamel's ``YAML.indent`` takes them.

    Read from the first nested mapping and the first block sequence under a key; a file
    with no block sequence gets dashes indented like mappings (``ports:\\n  - 80``).
    """
    mapping: int | None = None
    sequence: int | None = None
    offset: int | None = None
    key_indent: int | None = None  # indent of the previous line when it was "key:" alone
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if key_indent is not None:
            if stripped.startswith("- ") and offset is None:
                offset = indent - key_indent
                rest = line[indent + 1 :]
                sequence = offset + 1 + len(rest) - len(rest.lstrip(" "))
            elif not stripped.startswith("-") and mapping is None and indent > key_indent:
                mapping = indent - key_indent
        is_key_line = stripped.endswith(":") and not stripped.startswith(("-", "#", '"', "'"))
        key_indent = indent if is_key_line else None
        if mapping is not None and offset is not None:
            break
    mapping = mapping or 2
    if offset is None or sequence is None or sequence < offset + 2:
        offset, sequence = mapping, mapping + 2
    return mapping, sequence, offset


def _tag_name(tag: str) -> str:
    return "!!" + tag[len(_CORE) :] if tag.startswith(_CORE) else tag


def _check_nodes(root: Node, *, source: str) -> None:
    """Refuse object tags, recursive aliases and alias bombs, without expanding anything.

    Each node is visited once; its expanded size (what a consumer that copies aliases,
    like docker-compose, would build) is summed from its children's.
    """
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            total = 1 + sum(size[id(c)] for c in _children(node))
            if total > MAX_NODES:
                line = node.start_mark.line + 1
                raise InputError(
                    f"{source}: the aliases at line {line} expand to more than {MAX_NODES} "
                    "values (an alias bomb?): write the file without them"
                )
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            line = node.start_mark.line + 1
            raise InputError(f"{source}: line {line}: an alias refers to itself: remove it")
        tag = str(node.tag)
        if tag not in ALLOWED_TAGS:
            line = node.start_mark.line + 1
            raise InputError(
                f"{source}: line {line}: the tag {_tag_name(tag)} is not allowed in a compose "
                "file (plain strings, numbers, booleans, lists and mappings only): remove it"
            )
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)


def _children(node: Node) -> Iterator[Node]:
    if isinstance(node, MappingNode):
        for k, v in node.value:
            yield k
            yield v
    elif isinstance(node, SequenceNode):
        yield from node.value
    elif not isinstance(node, ScalarNode):  # pragma: no cover - the composer makes only these
        raise AssertionError(type(node))
