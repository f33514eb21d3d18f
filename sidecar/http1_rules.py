"""The HTTP/1.1 framing rules the codec enforces in its own code, on top of llhttp.

For: the checks that decide where a message ends and whether it may be forwarded, kept
independent of llhttp so that a lenient or buggy llhttp (llhttp before 9.0 accepted bare
LF, nodejs/llhttp#236; a bare LF still ends an HTTP/0.9 request line, nodejs/llhttp#877)
can never make the sidecar see a different message than the backend: the raw shape of
a head (CRLF lines only, no control bytes), Content-Length, Transfer-Encoding, Host, the
request target, Upgrade, trailers, and the chunked-body scanner that finds where a
chunked body ends. Each rule raises ``HttpError`` with the status a server answers (the
response side turns it into a 502).

Must never: import asyncio/socket/ssl, loop over bytes one at a time in Python, or
accept anything it cannot describe exactly (when in doubt, reject).
"""

from __future__ import annotations

import re
from collections.abc import Collection

from sidecar.http1_model import NOT_IN_TRAILERS, HttpError, ParsedHeaders

# tchar (RFC 9110 §5.6.2): the bytes a field name or a method may contain.
TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Bytes a head line may contain besides its CRLF: VCHAR, SP, HTAB, obs-text.
_LINE_BYTES = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)) + b"\t"
_HEXDIG = b"0123456789abcdefABCDEF"
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_EXT = re.compile(
    rb"(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)+" % (_TOKEN, _TOKEN, _QUOTED)
)
_PROTOCOL = re.compile(rb"%s(?:/%s)?" % (_TOKEN, _TOKEN))
# uri-host [":" port]: an IP-literal, or a reg-name/IPv4 of unreserved chars only (no
# sub-delims or pct-encoding: a comma, semicolon or % in a Host is a trick, not a name).
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~]+)(?::[0-9]{0,5})?")
_FOLDED = re.compile(rb"\n[ \t]")  # a line starting with whitespace: obs-fold
_ABSOLUTE = re.compile(rb"(?i:https?)://([^/?#]*)([/?][^#]*)?")

MAX_CHUNK_LINE = 4096  # chunk size plus extensions; llhttp itself has no limit
_MAX_CL_DIGITS = 18  # < 2**63: no overflow in any backend's integer type
# Framing and hop-by-hop names: a header spelled like one of these with "_" for "-" is
# rejected, since some backends (CGI/WSGI environ) cannot tell the two apart.
_GUARDED = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"host",
        b"expect",
    }
)


def is_token(value: bytes) -> bool:
    return bool(value) and not value.translate(None, TCHAR)


def check_lines(block: bytes, lines: int, what: str) -> None:
    """``block`` must be exactly ``lines`` CRLF-terminated lines of field bytes (as many
    as the fields llhttp reported, plus the start and blank lines): no bare CR or LF, no
    control bytes but HTAB, no line starting with whitespace (obs-fold)."""
    rest = block.translate(None, _LINE_BYTES)  # what is left: CR, LF and forbidden bytes
    folded = _FOLDED.search(block)
    if rest == b"\r\n" * lines and block.count(b"\r\n") == lines and folded is None:
        return
    if rest.translate(None, b"\r\n"):
        bad = rest.translate(None, b"\r\n")[0]
        raise HttpError(400, f"{what} contains the control byte 0x{bad:02x}")
    if folded is not None:
        raise HttpError(400, f"{what} has a line starting with whitespace (obs-fold)")
    raise HttpError(400, f"{what} has a bare CR or LF; lines must end in CRLF")


def check_name(name: bytes) -> None:
    """Beyond tchar: a name that spells a framing or control field with underscores."""
    if b"_" in name and name.replace(b"_", b"-") in _GUARDED:
        raise HttpError(400, f"header {name!r} looks like {name.replace(b'_', b'-')!r}")


def clean_trailers(fields: list[tuple[bytes, bytes]]) -> ParsedHeaders:
    """A trailer section as forwarded: framing fields refused (as strict llhttp does),
    other control fields (Host, Authorization, Content-Type...) dropped."""
    kept = []
    for name, value in fields:
        name = name.lower()
        check_name(name)
        if name in (b"content-length", b"transfer-encoding"):
            raise HttpError(400, f"{name.decode()} in a trailer section")
        if name not in NOT_IN_TRAILERS:
            kept.append((name, value.strip(b" \t")))
    return ParsedHeaders(kept)


def content_length(values: list[bytes]) -> int:
    """The one Content-Length: digits only (no sign, no list, no spaces), < 10**18. Two
    headers are refused even when equal: RFC 9112 allows a proxy to merge them, but the
    next hop may not, and the safe proxy never guesses."""
    if len(values) != 1:
        raise HttpError(400, f"{len(values)} Content-Length headers; send exactly one")
    value = values[0]
    if not value.isdigit() or len(value) > _MAX_CL_DIGITS:
        raise HttpError(400, f"Content-Length {value[:40]!r} is not a plain decimal number")
    return int(value)


def check_chunked(values: list[bytes]) -> None:
    """Transfer-Encoding must be exactly ``chunked`` (any case, OWS around it). Any other
    final coding makes the length unknowable (400); other codings before chunked
    (``gzip, chunked``) are valid HTTP that we do not implement (501)."""
    codings = [c.strip(b" \t").lower() for v in values for c in v.split(b",")]
    if codings == [b"chunked"]:
        return
    shown = b", ".join(values)[:80]
    if not all(codings) or codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
        raise HttpError(400, f"Transfer-Encoding {shown!r} does not end in one 'chunked'")
    raise HttpError(501, f"Transfer-Encoding {shown!r}: only 'chunked' is implemented")


def check_host(value: bytes) -> None:
    if _HOST.fullmatch(value) is None:
        raise HttpError(400, f"Host {value[:80]!r} is not a host[:port]")


def split_target(method: str, target: bytes) -> tuple[str, bytes | None]:
    """The request target as origin-form (or ``*``), plus the authority when it came in
    absolute-form (which then replaces the Host header, RFC 9112 §3.2.2)."""
    if target[:1] == b"/":
        if b"#" in target:
            raise HttpError(400, "request target contains a fragment ('#')")
        return target.decode("latin-1"), None
    if target == b"*":
        if method != "OPTIONS":
            raise HttpError(400, f"'*' is a target for OPTIONS only, not {method}")
        return "*", None
    match = _ABSOLUTE.fullmatch(target)
    if match is None:
        raise HttpError(400, f"request target {target[:80]!r} is not origin- or absolute-form")
    authority, rest = match.group(1), match.group(2) or b"/"
    if b"@" in authority:
        raise HttpError(400, "request target carries userinfo ('@'); send it in a header")
    check_host(authority)
    return (b"/" + rest if rest[:1] == b"?" else rest).decode("latin-1"), authority


def upgrade_protocols(values: list[bytes], allowed: Collection[bytes]) -> bytes | None:
    """The Upgrade protocols the proxy lets through (others are dropped, so a backend is
    never asked to switch to, say, h2c behind the proxy's back)."""
    protocols = [p.strip(b" \t") for v in values for p in v.split(b",")]
    if not all(_PROTOCOL.fullmatch(p) for p in protocols):
        raise HttpError(400, f"Upgrade {b', '.join(values)[:80]!r} is not a protocol list")
    kept = [p for p in protocols if p.split(b"/", 1)[0].lower() in allowed]
    return b", ".join(kept) or None


def parse_chunk_size(line: bytes) -> int:
    """A chunk-size line without its CRLF: 1-16 hex digits, then optional well-formed
    extensions (dropped on re-emission). No sign, no 0x, no whitespace, no underscore."""
    semi = line.find(b";")
    digits = line if semi < 0 else line[:semi]
    if not 0 < len(digits) <= 16 or digits.translate(None, _HEXDIG):
        raise HttpError(400, f"invalid chunk size {digits[:40]!r}")
    if semi >= 0 and _CHUNK_EXT.fullmatch(line, semi) is None:
        raise HttpError(400, f"invalid chunk extension {line[semi : semi + 40]!r}")
    return int(digits, 16)


_SIZE, _DATA, _DATA_END, _TRAILERS = range(4)


class ChunkScanner:
    """Finds where a chunked body ends without decoding it (llhttp decodes the same bytes
    and must agree). ``scan(buf)`` returns how many bytes of ``buf`` belong to the body
    and may be fed now, and whether that includes the end; once it does,
    ``trailer_block`` holds the raw trailer section (b"" when there is none)."""

    __slots__ = ("_left", "_max_trailer", "_state", "trailer_block")

    def __init__(self, max_trailer_bytes: int) -> None:
        self._max_trailer = max_trailer_bytes
        self._state = _SIZE
        self._left = 0
        self.trailer_block = b""

    def scan(self, buf: bytearray) -> tuple[int, bool]:
        pos, end = 0, len(buf)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._left, end - pos)
                pos += take
                self._left -= take
                if self._left:
                    break
                self._state = _DATA_END
            elif state == _DATA_END:
                if buf[pos] != 13 or (end - pos > 1 and buf[pos + 1] != 10):
                    raise HttpError(400, "chunk data is not followed by CRLF")
                if end - pos < 2:
                    break
                pos += 2
                self._state = _SIZE
            elif state == _SIZE:
                eol = buf.find(b"\r\n", pos, pos + MAX_CHUNK_LINE + 2)
                if eol < 0:
                    if end - pos > MAX_CHUNK_LINE or b"\n" in buf[pos:end]:
                        raise HttpError(400, "chunk-size line too long or not ended by CRLF")
                    break
                size = parse_chunk_size(bytes(buf[pos:eol]))
                pos = eol + 2
                self._state, self._left = (_DATA, size) if size else (_TRAILERS, 0)
            else:
                if buf.startswith(b"\r\n", pos):
                    return pos + 2, True
                stop = buf.find(b"\r\n\r\n", pos)
                if stop < 0:
                    if end - pos >= self._max_trailer:
                        raise HttpError(431, "trailer section over the header size limit")
                    break
                if stop + 4 - pos > self._max_trailer:
                    raise HttpError(431, "trailer section over the header size limit")
                self.trailer_block = bytes(buf[pos : stop + 4])
                return stop + 4, True
        return pos, False
