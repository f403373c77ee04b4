"""SPIFFE ID parsing and segment-wise pattern matching (TH-09).

``GO_SPIFFE_*`` below and ``TestByteSweep`` are go-spiffe's own cases, transcribed (inputs and expected
error texts verbatim) from spiffe/go-spiffe at commit e9973f6314a3fa0e36eb1f00fbfe37bdc1554b96 (v2
module): ``spiffeid/id_test.go`` (TestFromString, TestFromURI), ``spiffeid/trustdomain_test.go``
(TestTrustDomainFromString) and ``spiffeid/path_test.go`` (TestValidatePath). The broker is stricter in
two ways go-spiffe is not (a 2048-byte ID and a 255-byte trust domain, from the SPIFFE ID spec); no
transcribed case reaches either limit.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import ConfigError, InvalidIdentity
from broker.identity import SpiffeId, SpiffePattern
from broker.identity.spiffe_id import spiffe_problem

TD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-._"
PATH_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._"

# An independent oracle, written from the SPIFFE spec rather than from the parser.
_ORACLE = re.compile(r"spiffe://[a-z0-9._-]{1,255}(?:/(?!\.{1,2}(?:/|\Z))[A-Za-z0-9._-]+)*")


def oracle_ok(text: str) -> bool:
    return _ORACLE.fullmatch(text) is not None and len(text.encode("utf-8", "surrogatepass")) <= 2048


VALID = [
    ("spiffe://trustdomain", "trustdomain", ""),
    ("spiffe://trustdomain/path", "trustdomain", "/path"),
    ("spiffe://trustdomain/path/element", "trustdomain", "/path/element"),
    (f"spiffe://{TD_CHARS}", TD_CHARS, ""),
    (f"spiffe://trustdomain/{PATH_CHARS}", "trustdomain", f"/{PATH_CHARS}"),
    ("spiffe://example.org/agent/support-1", "example.org", "/agent/support-1"),
    ("spiffe://example.org/...", "example.org", "/..."),
    ("spiffe://example.org/.hidden/a..b", "example.org", "/.hidden/a..b"),
    ("spiffe://" + "a" * 255, "a" * 255, ""),
]

INVALID = [
    ("", "cannot be empty"),
    ("s", "scheme is missing or invalid"),
    ("spiffe", "scheme is missing or invalid"),
    ("spiffe:/", "scheme is missing or invalid"),
    ("spiffe:/trustdomain/path", "scheme is missing or invalid"),
    ("SPIFFE://trustdomain/path", "scheme is missing or invalid"),
    ("Spiffe://trustdomain/path", "scheme is missing or invalid"),
    ("https://trustdomain/path", "scheme is missing or invalid"),
    (" spiffe://trustdomain/path", "scheme is missing or invalid"),
    ("spiffe://", "trust domain is missing"),
    ("spiffe:///", "trust domain is missing"),
    ("spiffe:///path", "trust domain is missing"),
    ("spiffe://Trustdomain/path", "trust domain characters"),
    ("spiffe://TRUSTDOMAIN", "trust domain characters"),
    ("spiffe://trustdomain:8080/path", "trust domain characters"),
    ("spiffe://user@trustdomain/path", "trust domain characters"),
    ("spiffe://user:pw@trustdomain/path", "trust domain characters"),
    ("spiffe://trustdomain?query", "trust domain characters"),
    ("spiffe://trustdomain#fragment", "trust domain characters"),
    ("spiffe://trust%64omain", "trust domain characters"),
    ("spiffe://еxample.org/agent", "trust domain characters"),  # Cyrillic 'е' homoglyph
    ("spiffe://trustdomain/", "trailing slash"),
    ("spiffe://trustdomain//", "empty segments"),
    ("spiffe://trustdomain//path", "empty segments"),
    ("spiffe://trustdomain/path/", "trailing slash"),
    ("spiffe://trustdomain/path//element", "empty segments"),
    ("spiffe://trustdomain/.", "dot segments"),
    ("spiffe://trustdomain/./path", "dot segments"),
    ("spiffe://trustdomain/path/./element", "dot segments"),
    ("spiffe://trustdomain/..", "dot segments"),
    ("spiffe://trustdomain/../path", "dot segments"),
    ("spiffe://trustdomain/path/..", "dot segments"),
    ("spiffe://trustdomain/%2e", "segment characters"),
    ("spiffe://trustdomain/%2e%2e/admin", "segment characters"),
    ("spiffe://trustdomain/path%2Fadmin", "segment characters"),
    ("spiffe://trustdomain/path?query", "segment characters"),
    ("spiffe://trustdomain/path#fragment", "segment characters"),
    ("spiffe://trustdomain/pa th", "segment characters"),
    ("spiffe://trustdomain/path\x00", "segment characters"),
    ("spiffe://trustdomain/päth", "segment characters"),
    ("spiffe://trustdomain/path\\x", "segment characters"),
    ("spiffe://" + "a" * 256, "trust domain is too long"),
    ("spiffe://td/" + "a" * 2040, "longer than 2048 bytes"),
]


_BAD_TD = "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores"
_BAD_PATH = "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
# go-spiffe spiffeid/id_test.go TestFromString (and TestFromURI's string forms): (input, trust domain, path).
GO_SPIFFE_OK = [
    ("spiffe://trustdomain", "trustdomain", ""),
    ("spiffe://trustdomain/path", "trustdomain", "/path"),
    ("spiffe://trustdomain/.path", "trustdomain", "/.path"),
    ("spiffe://trustdomain/..path", "trustdomain", "/..path"),
    ("spiffe://trustdomain/...", "trustdomain", "/..."),
]
# (input, go-spiffe's error text). id_test.go TestFromString/TestFromURI, trustdomain_test.go "reject bad ids".
GO_SPIFFE_FAIL = [
    ("", "cannot be empty"),
    ("s", "scheme is missing or invalid"),
    ("spiffe:/", "scheme is missing or invalid"),
    ("Spiffe://", "scheme is missing or invalid"),
    ("SPIFFE://trustdomain", "scheme is missing or invalid"),
    ("spiffe:/trustdomain/path", "scheme is missing or invalid"),
    ("spiffe://", "trust domain is missing"),
    ("spiffe:///", "trust domain is missing"),
    ("spiffe:///path", "trust domain is missing"),
    ("spiffe://trustdomain/", "path cannot have a trailing slash"),
    ("spiffe://trustdomain//", "path cannot contain empty segments"),
    ("spiffe://trustdomain//path", "path cannot contain empty segments"),
    ("spiffe://trustdomain/path/", "path cannot have a trailing slash"),
    ("spiffe://trustdomain/.", "path cannot contain dot segments"),
    ("spiffe://trustdomain/./path", "path cannot contain dot segments"),
    ("spiffe://trustdomain/path/./other", "path cannot contain dot segments"),
    ("spiffe://trustdomain/path/..", "path cannot contain dot segments"),
    ("spiffe://trustdomain/..", "path cannot contain dot segments"),
    ("spiffe://trustdomain/../path", "path cannot contain dot segments"),
    ("spiffe://trustdomain/path/../other", "path cannot contain dot segments"),
    ("spiffe://%F0%9F%A4%AF/path", _BAD_TD),
    ("spiffe://trustdomain/%F0%9F%A4%AF", _BAD_PATH),
    ("spiffe://%62%61%64/path", _BAD_TD),
    ("spiffe://trustdomain/%62%61%64", _BAD_PATH),
    ("spiffe://trust$domain", _BAD_TD),
    ("spiffe://trustdomain/path$", _BAD_PATH),
]
# go-spiffe spiffeid/path_test.go TestValidatePath: (path, error text or None).
GO_SPIFFE_PATHS = [
    ("", None),
    ("/", "path cannot have a trailing slash"),
    ("/a", None),
    ("/a/b", None),
    ("/.", "path cannot contain dot segments"),
    ("/..", "path cannot contain dot segments"),
    ("/a/", "path cannot have a trailing slash"),
    ("//", "path cannot contain empty segments"),
    ("/a//b", "path cannot contain empty segments"),
    ("/$", _BAD_PATH),
    ("a", "path must have a leading slash"),
]


class TestGoSpiffeTranscript:
    @pytest.mark.parametrize(("text", "td", "path"), GO_SPIFFE_OK)
    def test_accepted(self, text: str, td: str, path: str) -> None:
        """What go-spiffe accepts parses into the same trust domain and path."""
        sid = SpiffeId.parse(text)
        assert (sid.trust_domain, sid.path, str(sid)) == (td, path, text)

    @pytest.mark.parametrize(("text", "why"), GO_SPIFFE_FAIL)
    def test_refused_with_go_spiffes_reason(self, text: str, why: str) -> None:
        """What go-spiffe refuses is refused, with go-spiffe's error text as the reason."""
        with pytest.raises(InvalidIdentity) as exc:
            SpiffeId.parse(text)
        assert exc.value.reason == f"malformed SPIFFE ID: {why}"

    @pytest.mark.parametrize(("path", "why"), GO_SPIFFE_PATHS)
    def test_validate_path(self, path: str, why: str | None) -> None:
        """go-spiffe's ValidatePath cases, through the same rule the parser uses."""
        assert spiffe_problem("trustdomain", path) == why


class TestSpiffeIdParse:
    @pytest.mark.parametrize(("text", "td", "path"), VALID)
    def test_valid(self, text: str, td: str, path: str) -> None:
        """Valid IDs parse into trust domain and path and print back unchanged."""
        sid = SpiffeId.parse(text)
        assert (sid.trust_domain, sid.path) == (td, path)
        assert str(sid) == text

    @pytest.mark.parametrize(("text", "why"), INVALID)
    def test_invalid(self, text: str, why: str) -> None:
        """Invalid IDs raise InvalidIdentity with go-spiffe's reason, and the oracle agrees."""
        with pytest.raises(InvalidIdentity) as exc:
            SpiffeId.parse(text)
        assert exc.value.reason.startswith("malformed SPIFFE ID: ")
        assert why in exc.value.reason
        assert not oracle_ok(text)

    def test_exactly_2048_bytes_is_accepted(self) -> None:
        """The 2048-byte limit is inclusive."""
        text = "spiffe://td/" + "a" * (2048 - len("spiffe://td/"))
        assert len(text) == 2048
        assert str(SpiffeId.parse(text)) == text

    def test_not_a_string(self) -> None:
        """A non-string is malformed, not a TypeError."""
        with pytest.raises(InvalidIdentity):
            SpiffeId.parse(b"spiffe://td/x")  # type: ignore[arg-type]

    def test_constructor_validates(self) -> None:
        """SpiffeId(...) cannot be built invalid: construction runs the same rules as parse."""
        with pytest.raises(InvalidIdentity):
            SpiffeId("Example.org", "/a")
        with pytest.raises(InvalidIdentity):
            SpiffeId("example.org", "a")
        with pytest.raises(InvalidIdentity):
            SpiffeId("example.org", "/a/../b")

    def test_value_semantics(self) -> None:
        """Equal IDs are equal and hash alike; the object is frozen."""
        a, b = SpiffeId.parse("spiffe://td/x"), SpiffeId("td", "/x")
        assert a == b and hash(a) == hash(b)
        with pytest.raises(AttributeError):
            a.path = "/y"  # type: ignore[misc]

    def test_reason_never_echoes_the_input(self) -> None:
        """The reason names the rule, not the offending text (it may come from a token)."""
        with pytest.raises(InvalidIdentity) as exc:
            SpiffeId.parse("spiffe://td/<script>")
        assert "<script>" not in exc.value.reason


class TestByteSweep:
    """go-spiffe's sweep of code points 0-255 (TestFromString, TestTrustDomainFromString), same inputs and texts."""

    @pytest.mark.parametrize("byte", [b for b in range(256) if b != ord("/")])
    def test_trust_domain_byte(self, byte: int) -> None:
        """``spiffe://trustdomain<c>/path`` parses exactly when go-spiffe's tdChars holds c, else go-spiffe's reason."""
        c = chr(byte)
        text = f"spiffe://trustdomain{c}/path"
        if c in TD_CHARS:
            assert SpiffeId.parse(text).trust_domain == f"trustdomain{c}"
        else:
            with pytest.raises(InvalidIdentity) as exc:
                SpiffeId.parse(text)
            assert exc.value.reason == f"malformed SPIFFE ID: {_BAD_TD}"

    @pytest.mark.parametrize("byte", [b for b in range(256) if b != ord("/")])
    def test_path_byte(self, byte: int) -> None:
        """``spiffe://trustdomain/path<c>`` parses exactly when go-spiffe's pathChars holds c, else go-spiffe's reason."""
        c = chr(byte)
        text = f"spiffe://trustdomain/path{c}"
        if c in PATH_CHARS:
            assert SpiffeId.parse(text).path == f"/path{c}"
        else:
            with pytest.raises(InvalidIdentity) as exc:
                SpiffeId.parse(text)
            assert exc.value.reason == f"malformed SPIFFE ID: {_BAD_PATH}"

    @pytest.mark.parametrize("byte", range(256))
    def test_bare_trust_domain_byte(self, byte: int) -> None:
        """A configured trust domain name ``trustdomain<c>`` is valid exactly when go-spiffe's
        TrustDomainFromString accepts it (all 256 code points, "/" included)."""
        c = chr(byte)
        assert spiffe_problem(f"trustdomain{c}", "") == (None if c in TD_CHARS else _BAD_TD)


_ID_ALPHABET = st.sampled_from([*list("aZ09._-/:@?#%.A "), "spiffe://", "..", "//"])


class TestDifferential:
    @settings(max_examples=400, deadline=None)
    @given(st.lists(_ID_ALPHABET, max_size=12).map("".join))
    def test_parser_agrees_with_oracle(self, tail: str) -> None:
        """Parser and independent regex oracle agree on arbitrary spiffe:// strings."""
        text = "spiffe://" + tail
        try:
            SpiffeId.parse(text)
            ok = True
        except InvalidIdentity:
            ok = False
        assert ok == oracle_ok(text)

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=40))
    def test_any_text_is_parsed_or_rejected(self, text: str) -> None:
        """Any string either parses (and agrees with the oracle) or raises InvalidIdentity, nothing else."""
        try:
            SpiffeId.parse(text)
            assert oracle_ok(text)
        except InvalidIdentity:
            assert not oracle_ok(text)


def _m(pattern: str, sid: str) -> bool:
    return SpiffePattern.parse(pattern).matches(SpiffeId.parse(sid))


class TestSpiffePattern:
    @pytest.mark.parametrize(
        ("pattern", "sid"),
        [
            ("spiffe://example.org/agent/support-*", "spiffe://example.org/agent/support-1"),
            ("spiffe://example.org/agent/support-*", "spiffe://example.org/agent/support-"),
            ("spiffe://example.org/agent/*", "spiffe://example.org/agent/x"),
            ("spiffe://example.org/*/reader", "spiffe://example.org/ns1/reader"),
            ("spiffe://example.org/agent/*-bot-*", "spiffe://example.org/agent/a-bot-1"),
            ("spiffe://example.org/agents/a", "spiffe://example.org/agents/a"),
            ("spiffe://example.org", "spiffe://example.org"),
            ("spiffe://example.org/a.b", "spiffe://example.org/a.b"),
        ],
    )
    def test_matches(self, pattern: str, sid: str) -> None:
        """Patterns match the IDs they name."""
        assert _m(pattern, sid)

    @pytest.mark.parametrize(
        ("pattern", "sid"),
        [
            # prefix confusion
            ("spiffe://example.org/agents/a", "spiffe://example.org/agents/a-evil"),
            ("spiffe://example.org/agents/a", "spiffe://example.org/agents/a/b"),
            ("spiffe://example.org/agents/a", "spiffe://example.org/agents"),
            ("spiffe://example.org/agent/support-*", "spiffe://example.org/agent/support-1/x"),
            ("spiffe://example.org/agent/support-*", "spiffe://example.org/agent/support"),
            ("spiffe://example.org/agent/support-*", "spiffe://example.org/agent/supportx1"),
            ("spiffe://example.org/agent/*", "spiffe://example.org/agent/x/y"),
            ("spiffe://example.org/agent/*", "spiffe://example.org/agent"),
            ("spiffe://example.org/*", "spiffe://example.org"),
            # trust domain is exact
            ("spiffe://example.org/agent/x", "spiffe://example.org.evil/agent/x"),
            ("spiffe://example.org/agent/x", "spiffe://evil-example.org/agent/x"),
            ("spiffe://example.org/agent/x", "spiffe://org/agent/x"),
            # exact segments compare exactly (case, regex metacharacters)
            ("spiffe://example.org/agent/X", "spiffe://example.org/agent/x"),
            ("spiffe://example.org/a.b", "spiffe://example.org/aXb"),
            ("spiffe://example.org/agent/s-*", "spiffe://example.org/agent/S-1"),
        ],
    )
    def test_does_not_match(self, pattern: str, sid: str) -> None:
        """No prefix, cross-segment, cross-trust-domain or regex-metacharacter confusion."""
        assert not _m(pattern, sid)

    @pytest.mark.parametrize(
        "pattern",
        [
            "",
            "example.org/agent/*",
            "SPIFFE://example.org/agent",
            "spiffe://*.org/agent",
            "spiffe://Example.org/agent",
            "spiffe://example.org/agent/",
            "spiffe://example.org//agent",
            "spiffe://example.org/agent/?",
            "spiffe://example.org/agent/[ab]",
            "spiffe://example.org/agent/..",
            "spiffe://example.org/agent/.",
            "spiffe://example.org/agent/%2a",
            "spiffe://example.org/agent/**/x/.*",
        ],
    )
    def test_invalid_patterns(self, pattern: str) -> None:
        """Malformed patterns are a ConfigError naming the pattern."""
        with pytest.raises(ConfigError):
            SpiffePattern.parse(pattern)

    def test_str_and_equality(self) -> None:
        """A pattern prints as configured and compares by its text."""
        text = "spiffe://example.org/agent/support-*"
        assert str(SpiffePattern.parse(text)) == text
        assert SpiffePattern.parse(text) == SpiffePattern.parse(text)
        assert len({SpiffePattern.parse(text), SpiffePattern.parse(text)}) == 1

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.text(alphabet="ab-", min_size=1, max_size=4), min_size=1, max_size=3),
        st.lists(st.text(alphabet="ab-", min_size=1, max_size=4), min_size=1, max_size=3),
    )
    def test_star_never_crosses_a_slash(self, pattern_segs: list[str], id_segs: list[str]) -> None:
        """A pattern never matches an ID with a different number of segments, whatever its stars."""
        pattern = SpiffePattern.parse("spiffe://td/" + "/".join(s + "*" for s in pattern_segs))
        sid = SpiffeId.parse("spiffe://td/" + "/".join(id_segs))
        expected = len(pattern_segs) == len(id_segs) and all(
            i.startswith(p) for p, i in zip(pattern_segs, id_segs, strict=False)
        )
        assert pattern.matches(sid) == expected
