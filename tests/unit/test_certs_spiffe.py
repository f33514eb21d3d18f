"""SPIFFE ID parsing (certs/spiffe.py): every rule of the spec, with a message that says
which rule the input broke."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from certs.spiffe import MAX_ID_LENGTH, SpiffeId, SpiffeIdError, parse, validate_trust_domain
from meshlet.errors import InputError

TD_ALPHABET = string.ascii_lowercase + string.digits + ".-_"
SEGMENT_ALPHABET = string.ascii_letters + string.digits + ".-_"


@pytest.mark.parametrize(
    ("text", "trust_domain", "segments"),
    [
        ("spiffe://mesh.local/ns/shop/sa/orders", "mesh.local", ("ns", "shop", "sa", "orders")),
        ("spiffe://example.org", "example.org", ()),
        ("spiffe://a_b-c.9/Upper/MiXed.Case-ok_1", "a_b-c.9", ("Upper", "MiXed.Case-ok_1")),
        ("spiffe://td/...", "td", ("...",)),
        ("spiffe://td/.hidden/a..b", "td", (".hidden", "a..b")),
    ],
)
def test_valid_ids_parse_and_round_trip(text: str, trust_domain: str, segments: tuple[str, ...]):
    sid = parse(text)
    assert sid.trust_domain == trust_domain
    assert sid.segments == segments
    assert str(sid) == text
    assert parse(str(sid)) == sid


def test_workload_ids_are_built_and_read_back():
    sid = SpiffeId.for_workload("mesh.local", "shop", "orders")
    assert str(sid) == "spiffe://mesh.local/ns/shop/sa/orders"
    assert sid.workload() == ("shop", "orders")
    assert parse("spiffe://mesh.local/ns/shop/x/orders").workload() is None
    assert parse("spiffe://mesh.local").workload() is None


def test_a_workload_id_with_a_bad_name_is_refused():
    with pytest.raises(SpiffeIdError, match="path segment 'my svc'"):
        SpiffeId.for_workload("mesh.local", "shop", "my svc")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # trust domain characters
        ("spiffe://Mesh.local/ns/a", r"trust domain 'Mesh.local' has characters .*\('M'\)"),
        ("spiffe://MESH/x", r"use lowercase letters, digits"),
        ("spiffe://me sh/x", r"trust domain 'me sh' has characters"),
        ("spiffe://mesh+local/x", r"\('\+'\)"),
        ("spiffe://mésh/x", r"trust domain 'mésh' has characters"),
        ("spiffe:///ns/a", "has no trust domain"),
        ("spiffe://", "has no trust domain"),
        # path characters and segments
        ("spiffe://td/ns/a b", r"path segment 'a b' may use only letters, digits"),
        ("spiffe://td/ns/a*b", r"path segment 'a\*b'"),
        ("spiffe://td/ns/ünï", r"path segment 'ünï'"),
        ("spiffe://td/ns//a", "has an empty path segment"),
        ("spiffe://td/ns/a/", r"has an empty path segment \(no '//' or trailing '/'\)"),
        ("spiffe://td/", "has an empty path segment"),
        ("spiffe://td/ns/./a", r"has a '\.' path segment, which SPIFFE forbids"),
        ("spiffe://td/ns/../a", r"has a '\.\.' path segment, which SPIFFE forbids"),
        ("spiffe://td/..", r"has a '\.\.' path segment"),
        # URI parts SPIFFE forbids
        ("spiffe://td/ns/a?x=1", r"must not contain a query \('\?'\)"),
        ("spiffe://td/ns/a#frag", r"must not contain a fragment \('#'\)"),
        ("spiffe://td:8443/ns/a", "must not contain a port"),
        ("spiffe://td:/ns/a", "must not contain a port"),
        ("spiffe://user@td/ns/a", r"must not contain userinfo \('user@'\)"),
        ("spiffe://user:pw@td/ns/a", "must not contain userinfo"),
        ("spiffe://td/ns/a%20b", r"must not contain percent-encoding \('%'\)"),
        ("spiffe://td%2e/ns/a", "must not contain percent-encoding"),
        # scheme
        ("SPIFFE://td/ns/a", "the scheme must be lowercase 'spiffe://'"),
        ("Spiffe://td/ns/a", "the scheme must be lowercase"),
        ("https://td/ns/a", "must start with 'spiffe://'"),
        ("spiffe:/td/ns/a", "must start with 'spiffe://'"),
        ("td/ns/a", "must start with 'spiffe://'"),
        ("", "must start with 'spiffe://'"),
    ],
)
def test_each_rule_is_rejected_with_a_message_naming_it(text: str, message: str):
    with pytest.raises(SpiffeIdError, match=message) as info:
        parse(text)
    if text:
        assert repr(text) in str(info.value), "the message names the input"
    assert isinstance(info.value, InputError), "a bad ID is bad input: the CLI exits 2"
    assert "\n" not in str(info.value)


def test_an_id_longer_than_2048_bytes_is_refused():
    at_limit = "spiffe://td/" + "a" * (MAX_ID_LENGTH - len("spiffe://td/"))
    assert len(at_limit) == MAX_ID_LENGTH
    assert str(parse(at_limit)) == at_limit
    with pytest.raises(SpiffeIdError, match="longer than 2048 bytes"):
        parse(at_limit + "a")


def test_a_trust_domain_longer_than_255_characters_is_refused():
    assert validate_trust_domain("a" * 255) == "a" * 255
    with pytest.raises(SpiffeIdError, match="longer than 255 characters"):
        parse("spiffe://" + "a" * 256 + "/x")


def test_a_workload_id_needs_a_path_when_asked():
    assert parse("spiffe://td").path == ""
    with pytest.raises(SpiffeIdError, match=r"has no path: use spiffe://td/ns/NAMESPACE/sa/NAME"):
        parse("spiffe://td", require_path=True)


def test_an_empty_trust_domain_is_refused():
    with pytest.raises(SpiffeIdError, match="trust domain is empty"):
        validate_trust_domain("")


# ---- properties ---------------------------------------------------------------------------

trust_domains = st.text(TD_ALPHABET, min_size=1, max_size=60)
segments = st.text(SEGMENT_ALPHABET, min_size=1, max_size=20).filter(lambda s: s not in {".", ".."})
paths = st.lists(segments, max_size=6)


@given(trust_domains, paths)
def test_generated_valid_ids_always_parse_and_round_trip(td: str, segs: list[str]):
    text = "spiffe://" + td + "".join("/" + s for s in segs)
    sid = parse(text)
    assert str(sid) == text
    assert sid.trust_domain == td
    assert sid.segments == tuple(segs)
    assert parse(str(sid)) == sid


forbidden_in_segment = st.characters(
    exclude_characters=SEGMENT_ALPHABET + "/", exclude_categories=("Cs",)
)


@given(trust_domains, st.lists(segments, min_size=1, max_size=6), st.data())
def test_a_forbidden_character_in_any_segment_always_raises(
    td: str, segs: list[str], data: st.DataObject
):
    which = data.draw(st.integers(0, len(segs) - 1), label="segment")
    where = data.draw(st.integers(0, len(segs[which])), label="position")
    bad = data.draw(forbidden_in_segment, label="character")
    segs[which] = segs[which][:where] + bad + segs[which][where:]
    with pytest.raises(SpiffeIdError):
        parse("spiffe://" + td + "".join("/" + s for s in segs))


forbidden_in_trust_domain = st.characters(
    exclude_characters=TD_ALPHABET + "/", exclude_categories=("Cs",)
)


@given(trust_domains, paths, st.data())
def test_a_forbidden_character_in_the_trust_domain_always_raises(
    td: str, segs: list[str], data: st.DataObject
):
    where = data.draw(st.integers(0, len(td)), label="position")
    bad = data.draw(forbidden_in_trust_domain, label="character")
    text = "spiffe://" + td[:where] + bad + td[where:] + "".join("/" + s for s in segs)
    with pytest.raises(SpiffeIdError):
        parse(text)
