"""Request policy, access tokens and the gate's framing checks as tables: no sockets."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from nexus_proxy import access, errors
from nexus_proxy.access import AccessTokens, check_exposure, is_loopback, load_access_tokens
from nexus_proxy.errors import ConfigError
from nexus_proxy.gate import Gate
from nexus_proxy.policy import RequestRules, canonical_path
from nexus_proxy.settings import Settings

pytestmark = pytest.mark.timeout(30)

TOKENS = ("local-token-a1b2", "local-token-c3d4")
DENY_TOKEN = ["/token/**"]


def _tokens(*values: str) -> AccessTokens:
    return AccessTokens(SecretStr(value) for value in values)


def _settings(**options: Any) -> Settings:
    return Settings(upstream_url="http://127.0.0.1:9", **options)


def _secret_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    path.chmod(mode)
    return path


# Methods


@pytest.mark.parametrize(
    ("method", "allowed"),
    [
        pytest.param("GET", True, id="get"),
        pytest.param("HEAD", True, id="head"),
        pytest.param("OPTIONS", True, id="options"),
        pytest.param("POST", False, id="post"),
        pytest.param("PUT", False, id="put"),
        pytest.param("PATCH", False, id="patch"),
        pytest.param("DELETE", False, id="delete"),
        pytest.param("TRACE", False, id="trace"),
        pytest.param("PROPFIND", False, id="webdav"),
        pytest.param("get", False, id="lower-case-get"),
        pytest.param("Get", False, id="mixed-case-get"),
        pytest.param("head", False, id="lower-case-head"),
        pytest.param("GET ", False, id="trailing-space"),
    ],
)
def test_read_only_forwards_safe_methods(method: str, allowed: bool) -> None:
    refusal = RequestRules(read_only=True).check(method, b"/customer")

    assert (refusal is None) is allowed


def test_read_only_refusal_names_rule() -> None:
    refusal = RequestRules(read_only=True).check("POST", b"/customer")

    assert refusal is not None
    assert refusal.forbidden
    assert "read_only" in refusal.rule


@pytest.mark.parametrize(
    ("method", "allowed"),
    [
        pytest.param("GET", True, id="get"),
        pytest.param("POST", True, id="post"),
        pytest.param("DELETE", False, id="delete"),
        pytest.param("post", False, id="lower-case-post"),
        pytest.param("HEAD", False, id="head-not-implied"),
    ],
)
def test_allow_methods_is_exact(method: str, allowed: bool) -> None:
    rules = RequestRules(allow_methods=["GET", "POST"])

    assert (rules.check(method, b"/customer") is None) is allowed


def test_allow_methods_cannot_widen_read_only() -> None:
    rules = RequestRules(read_only=True, allow_methods=["POST"])

    refusal = rules.check("POST", b"/customer")

    assert refusal is not None
    assert "read_only" in refusal.rule


def test_allow_methods_empty_rejects_all() -> None:
    refusal = RequestRules(allow_methods=[]).check("GET", b"/customer")

    assert refusal is not None
    assert refusal.forbidden


# Paths: globs


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        pytest.param("/customer/*", b"/customer/abc", True, id="star-one-segment"),
        pytest.param("/customer/*", b"/customer/abc/def", False, id="star-not-two-segments"),
        pytest.param("/accounts/*/balance", b"/accounts/X1/balance", True, id="star-inside"),
        pytest.param("/accounts/*/balance", b"/accounts/X/Y/balance", False, id="star-no-slash"),
        pytest.param("/token/*", b"/token/payments", True, id="star-token"),
        pytest.param("/token/**", b"/token", True, id="double-star-covers-base"),
        pytest.param("/token/**", b"/token/", True, id="double-star-base-slash"),
        pytest.param("/token/**", b"/token/payments", True, id="double-star-one"),
        pytest.param("/token/**", b"/token/a/b/c", True, id="double-star-deep"),
        pytest.param("/token/**", b"/tokens", False, id="double-star-not-prefix"),
        pytest.param("/token/**", b"/tokenx/payments", False, id="double-star-not-sibling"),
        pytest.param("/a/**/z", b"/a/b/c/z", True, id="double-star-middle"),
        pytest.param("/a/**/z", b"/a/z", True, id="double-star-middle-empty"),
        pytest.param("/customer*", b"/customers", True, id="star-suffix"),
        pytest.param("/customer", b"/customer/x", False, id="exact-no-children"),
        pytest.param("token/**", b"/token/x", True, id="pattern-without-leading-slash"),
        pytest.param("/Token/**/", b"/token/x", True, id="pattern-case-and-slash"),
        pytest.param("/a.b/*", b"/aXb/c", False, id="dot-is-literal"),
        pytest.param("/a+b", b"/aab", False, id="plus-is-literal"),
        pytest.param("/**", b"/anything/at/all", True, id="everything"),
    ],
)
def test_path_globs_match(pattern: str, path: bytes, matches: bool) -> None:
    rules = RequestRules(allow_paths=[pattern])

    assert (rules.check("GET", path) is None) is matches


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(b"/token/payments", id="plain"),
        pytest.param(b"/TOKEN/PAYMENTS", id="upper-case"),
        pytest.param(b"/Token/Payments/", id="mixed-case-trailing-slash"),
        pytest.param(b"//token/payments", id="leading-double-slash"),
        pytest.param(b"/token//payments", id="inner-double-slash"),
        pytest.param(b"///token///payments///", id="many-slashes"),
        pytest.param(b"/t%6Fken/payments", id="escaped-letter"),
        pytest.param(b"/t%6fken/payments", id="escaped-letter-lower-hex"),
        pytest.param(b"/%74%6F%6B%65%6E/payments", id="escaped-segment"),
        pytest.param(b"/%54OKEN/payments", id="escaped-upper-letter"),
        pytest.param(b"/token", id="base"),
        pytest.param(b"/token/", id="base-trailing-slash"),
    ],
)
def test_deny_paths_matches_every_spelling(path: bytes) -> None:
    refusal = RequestRules(deny_paths=DENY_TOKEN).check("GET", path)

    assert refusal is not None
    assert refusal.forbidden
    assert "deny_paths '/token/**'" in refusal.rule


def test_deny_wins_over_allow() -> None:
    rules = RequestRules(allow_paths=["/token/**"], deny_paths=["/token/payments"])

    refusal = rules.check("GET", b"/token/payments")

    assert refusal is not None
    assert "deny_paths" in refusal.rule


def test_deny_leaves_other_allowed_paths() -> None:
    rules = RequestRules(allow_paths=["/token/**"], deny_paths=["/token/payments"])

    assert rules.check("GET", b"/token/balances") is None


def test_allow_paths_rejects_unmatched() -> None:
    refusal = RequestRules(allow_paths=["/customer/**"]).check("GET", b"/token/payments")

    assert refusal is not None
    assert refusal.forbidden
    assert "allow_paths" in refusal.rule


def test_method_checked_before_path() -> None:
    rules = RequestRules(read_only=True, allow_paths=["/customer/**"])

    refusal = rules.check("POST", b"/customer")

    assert refusal is not None
    assert "read_only" in refusal.rule


# Paths: ambiguous spellings


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(b"/token%2Fpayments", id="encoded-slash"),
        pytest.param(b"/token%2fpayments", id="encoded-slash-lower"),
        pytest.param(b"/x%5C..%5Ctoken", id="encoded-backslash"),
        pytest.param(b"/x%5c..%5ctoken", id="encoded-backslash-lower"),
        pytest.param(b"/%2E%2E/token", id="encoded-dot-dot"),
        pytest.param(b"/x/%2e/token", id="encoded-dot-lower"),
        pytest.param(b"/.%2e/token", id="half-encoded-dot-dot"),
        pytest.param(b"/%252e%252e/token", id="double-encoded-dot"),
        pytest.param(b"/t%2500oken", id="encoded-percent"),
        pytest.param(b"/t%00oken", id="encoded-nul"),
        pytest.param(b"/x\\..\\token", id="raw-backslash"),
        pytest.param(b"/x/../token", id="dot-dot-segment"),
        pytest.param(b"/./token", id="dot-segment"),
        pytest.param(b"/token/.", id="trailing-dot"),
        pytest.param(b"/x/..", id="trailing-dot-dot"),
        pytest.param(b"/token;a=b/payments", id="semicolon-parameter"),
        pytest.param(b"/token/payments;", id="trailing-semicolon"),
        pytest.param(b"/x%C0%AE%C0%AE/token", id="overlong-utf8-dot"),
        pytest.param(b"/x%FF/token", id="invalid-utf8"),
        pytest.param(b"/x\xff/token", id="raw-non-ascii"),
    ],
)
def test_path_rules_reject_ambiguous_path(path: bytes) -> None:
    refusal = RequestRules(deny_paths=["/nothing"]).check("GET", path)

    assert refusal is not None
    assert not refusal.forbidden


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(b"/token%%32%66payments", id="percent-then-escaped-2f"),
        pytest.param(b"/token%2%66payments", id="half-escape-then-escaped-f"),
        pytest.param(b"/x%%35%63..%%35%63token", id="percent-then-escaped-5c"),
    ],
)
def test_path_rules_reject_decoded_escape(path: bytes) -> None:
    refusal = RequestRules(deny_paths=["/nothing"]).check("GET", path)

    assert refusal is not None


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(b"/a%2Fb", id="encoded-slash"),
        pytest.param(b"/a/../b", id="dot-dot"),
        pytest.param(b"/a;b", id="semicolon"),
    ],
)
def test_method_rules_alone_pass_any_path(path: bytes) -> None:
    assert RequestRules(read_only=True).check("GET", path) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"/", "/", id="root"),
        pytest.param(b"//", "/", id="root-double"),
        pytest.param(b"/Customer/", "/customer", id="case-and-slash"),
        pytest.param(b"/a//b///c", "/a/b/c", id="repeated-slashes"),
        pytest.param(b"/t%6Fken", "/token", id="escape"),
        pytest.param(b"/caf%C3%A9", "/caf\u00e9", id="utf8-escape"),
        pytest.param(b"/a/.../b", "/a/.../b", id="three-dots-is-a-name"),
        pytest.param(b"/a/..b", "/a/..b", id="dots-in-name"),
        pytest.param(b"/a%2Fb", None, id="encoded-slash"),
        pytest.param(b"/a/./b", None, id="dot"),
    ],
)
def test_canonical_path(raw: bytes, expected: str | None) -> None:
    assert canonical_path(raw) == expected


@pytest.mark.parametrize(
    ("rules", "empty"),
    [
        pytest.param({}, True, id="none"),
        pytest.param({"read_only": True}, False, id="read-only"),
        pytest.param({"allow_methods": ["GET"]}, False, id="methods"),
        pytest.param({"allow_methods": []}, False, id="no-methods"),
        pytest.param({"allow_paths": ["/x"]}, False, id="allow"),
        pytest.param({"deny_paths": ["/x"]}, False, id="deny"),
    ],
)
def test_rules_is_empty(rules: dict[str, Any], empty: bool) -> None:
    assert RequestRules(**rules).is_empty is empty


# Access tokens


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param([], "missing", id="none"),
        pytest.param([(b"x-authorization", b"Bearer " + TOKENS[0].encode())], "missing", id="x"),
        pytest.param(
            [(b"proxy-authorization", b"Bearer " + TOKENS[0].encode())], "missing", id="proxy"
        ),
        pytest.param([(b"authorization", b"Bearer " + TOKENS[0].encode())], None, id="first"),
        pytest.param([(b"authorization", b"Bearer " + TOKENS[1].encode())], None, id="second"),
        pytest.param([(b"authorization", b"Bearer ")], "malformed", id="empty"),
        pytest.param([(b"authorization", b"Bearer")], "malformed", id="scheme-only"),
        pytest.param([(b"authorization", b"")], "malformed", id="blank"),
        pytest.param([(b"authorization", TOKENS[0].encode())], "malformed", id="no-scheme"),
        pytest.param([(b"authorization", b"Basic bG9jYWw6dG9rZW4=")], "malformed", id="basic"),
        pytest.param(
            [(b"authorization", b"Token " + TOKENS[0].encode())], "malformed", id="other-scheme"
        ),
        pytest.param(
            [(b"authorization", b"Bearer " + TOKENS[0].encode())] * 2,
            "malformed",
            id="two-valid",
        ),
        pytest.param(
            [
                (b"authorization", b"Bearer wrong"),
                (b"authorization", b"Bearer " + TOKENS[0].encode()),
            ],
            "malformed",
            id="wrong-then-valid",
        ),
        pytest.param([(b"authorization", b"Bearer wrong")], "not recognised", id="wrong"),
        pytest.param(
            [(b"authorization", b"Bearer " + TOKENS[0][:-1].encode())],
            "not recognised",
            id="prefix",
        ),
        pytest.param(
            [(b"authorization", b"Bearer " + TOKENS[0].encode() + b"x")],
            "not recognised",
            id="longer",
        ),
        pytest.param(
            [(b"authorization", b"Bearer " + TOKENS[0].upper().encode())],
            "not recognised",
            id="other-case",
        ),
        pytest.param(
            [(b"authorization", b"Bearer  " + TOKENS[0].encode())],
            "not recognised",
            id="two-spaces",
        ),
        pytest.param(
            [(b"authorization", b"Bearer " + TOKENS[0].encode() + b" ")],
            "not recognised",
            id="trailing-space",
        ),
        pytest.param(
            [(b"authorization", b"Bearer " + ",".join(TOKENS).encode())],
            "not recognised",
            id="both-in-one",
        ),
    ],
)
def test_access_tokens_refusal(headers: list[tuple[bytes, bytes]], expected: str | None) -> None:
    assert _tokens(*TOKENS).refusal(headers) == expected


def test_access_tokens_compare_each_token(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    compare_digest = hmac.compare_digest

    def counting_compare(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return compare_digest(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", counting_compare)

    _tokens(*TOKENS).refusal([(b"authorization", b"Bearer " + TOKENS[0].encode())])

    assert len(calls) == len(TOKENS)


def test_access_tokens_repr_hides_values() -> None:
    text = repr(_tokens(*TOKENS))

    assert all(token not in text for token in TOKENS)
    assert "count=2" in text


def test_access_tokens_none_configured_is_falsy() -> None:
    assert not _tokens()


def test_load_tokens_from_settings() -> None:
    tokens = load_access_tokens(_settings(access_tokens=list(TOKENS)))

    assert len(tokens) == 2


def test_load_tokens_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXUS_PROXY_ACCESS_TOKENS", f" {TOKENS[0]} ,{TOKENS[1]},")

    tokens = load_access_tokens(_settings())

    assert len(tokens) == 2
    assert tokens.refusal([(b"authorization", b"Bearer " + TOKENS[1].encode())]) is None


def test_load_tokens_file_skips_blanks(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, f"\n{TOKENS[0]}\n\n   \n{TOKENS[1]}  \n\n")

    tokens = load_access_tokens(_settings(access_token_file=path))

    assert len(tokens) == 2
    assert tokens.refusal([(b"authorization", b"Bearer " + TOKENS[1].encode())]) is None


def test_load_tokens_adds_file(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, TOKENS[1])

    tokens = load_access_tokens(_settings(access_tokens=[TOKENS[0]], access_token_file=path))

    assert len(tokens) == 2


def test_load_tokens_empty_file_is_none(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, "\n\n")

    assert not load_access_tokens(_settings(access_token_file=path))


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("inner space-9f8e", id="space"),
        pytest.param("tab\there-9f8e", id="tab"),
        pytest.param("caf\u00e9-9f8e", id="non-ascii"),
        pytest.param("nul\x00-9f8e", id="control"),
    ],
)
def test_load_tokens_rejects_unsendable(token: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_access_tokens(_settings(access_tokens=[token]))

    assert "access_tokens" in str(caught.value)
    assert token not in str(caught.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660], ids=oct)
def test_load_tokens_rejects_loose_file(tmp_path: Path, mode: int) -> None:
    path = _secret_file(tmp_path, TOKENS[0], mode)

    with pytest.raises(ConfigError) as caught:
        load_access_tokens(_settings(access_token_file=path))

    assert f"chmod 600 {path}" in str(caught.value)
    assert TOKENS[0] not in str(caught.value)


# Listening beyond loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        pytest.param("127.0.0.1", True, id="ipv4"),
        pytest.param("127.8.9.10", True, id="ipv4-range"),
        pytest.param("::1", True, id="ipv6"),
        pytest.param("[::1]", True, id="ipv6-brackets"),
        pytest.param("localhost", True, id="localhost"),
        pytest.param("0.0.0.0", False, id="ipv4-any"),
        pytest.param("::", False, id="ipv6-any"),
        pytest.param("", False, id="empty"),
        pytest.param("192.0.2.10", False, id="ipv4-other"),
        pytest.param("2001:db8::1", False, id="ipv6-other"),
        pytest.param("proxy.example", False, id="name"),
        pytest.param("127.0.0.1.example", False, id="name-like-loopback"),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_exposure_rejected_without_tokens(host: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_exposure(_settings(host=host), _tokens())

    assert "access_tokens" in str(caught.value)
    assert "allow_unauthenticated_remote" in str(caught.value)


@pytest.mark.parametrize(
    ("options", "tokens"),
    [
        pytest.param({"host": "127.0.0.1"}, (), id="loopback"),
        pytest.param({"host": "::1"}, (), id="loopback-ipv6"),
        pytest.param({"host": "0.0.0.0"}, TOKENS, id="with-tokens"),
        pytest.param({"host": "0.0.0.0", "unix_socket": "proxy.sock"}, (), id="unix-socket"),
    ],
)
def test_exposure_allowed(options: dict[str, Any], tokens: tuple[str, ...]) -> None:
    # Settings only: nothing listens, so the socket path need not exist.
    check_exposure(_settings(**options), _tokens(*tokens))


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"access_tokens": [" ", ""]}, id="blank-tokens"),
        pytest.param({"access_tokens": ","}, id="empty-list"),
    ],
)
def test_exposure_blank_tokens_count_as_none(options: dict[str, Any]) -> None:
    settings = _settings(host="0.0.0.0", **options)

    with pytest.raises(ConfigError):
        check_exposure(settings, load_access_tokens(settings))


def test_exposure_allowed_on_purpose_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nexus_proxy")

    check_exposure(_settings(host="0.0.0.0", allow_unauthenticated_remote=True), _tokens())

    assert "0.0.0.0" in caplog.text
    assert "allow_unauthenticated_remote" in caplog.text


def test_exposure_loopback_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nexus_proxy")

    check_exposure(_settings(allow_unauthenticated_remote=True), _tokens())

    assert caplog.records == []


# The gate


def _scope(*headers: tuple[bytes, bytes], method: str = "POST") -> dict[str, Any]:
    return {"method": method, "headers": list(headers), "client": ("127.0.0.1", 50000)}


def _gate(
    tokens: tuple[str, ...] = (), rules: RequestRules | None = None, max_body_size: int = 0
) -> Gate:
    return Gate(_tokens(*tokens), rules or RequestRules(), max_body_size)


CL = b"content-length"
TE = b"transfer-encoding"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(CL, b"5"), (TE, b"chunked")], id="length-and-chunked"),
        pytest.param([(TE, b"chunked"), (CL, b"5")], id="chunked-and-length"),
        pytest.param([(CL, b"5"), (CL, b"6")], id="two-lengths"),
        pytest.param([(CL, b"5"), (CL, b"5")], id="two-equal-lengths"),
        pytest.param([(CL, b"5, 5")], id="length-list"),
        pytest.param([(CL, b"abc")], id="length-not-digits"),
        pytest.param([(CL, b"-1")], id="length-negative"),
        pytest.param([(CL, b"+5")], id="length-plus"),
        pytest.param([(CL, b"0x5")], id="length-hex"),
        pytest.param([(CL, b"")], id="length-empty"),
        pytest.param([(CL, "\u0665".encode())], id="length-non-ascii-digit"),
        pytest.param([(TE, b"gzip, chunked")], id="gzip-chunked"),
        pytest.param([(TE, b"chunked, gzip")], id="chunked-gzip"),
        pytest.param([(TE, b"chunked, chunked")], id="chunked-twice-in-list"),
        pytest.param([(TE, b"chunked"), (TE, b"chunked")], id="chunked-twice"),
        pytest.param([(TE, b"identity")], id="identity"),
        pytest.param([(TE, b"xchunked")], id="xchunked"),
        pytest.param([(TE, b"")], id="empty"),
    ],
)
def test_gate_rejects_ambiguous_framing(headers: list[tuple[bytes, bytes]]) -> None:
    assert _gate().refusal(_scope(*headers), b"/x") is errors.BAD_FRAMING


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([], id="no-body"),
        pytest.param([(CL, b"5")], id="length"),
        pytest.param([(CL, b"0")], id="zero"),
        pytest.param([(TE, b"chunked")], id="chunked"),
        pytest.param([(TE, b"Chunked")], id="chunked-any-case"),
    ],
)
def test_gate_passes_clear_framing(headers: list[tuple[bytes, bytes]]) -> None:
    assert _gate().refusal(_scope(*headers), b"/x") is None


@pytest.mark.parametrize(
    ("length", "max_body_size", "expected"),
    [
        pytest.param(b"100", 100, None, id="at-limit"),
        pytest.param(b"101", 100, errors.BODY_TOO_LARGE, id="over-limit"),
        pytest.param(b"0000101", 100, errors.BODY_TOO_LARGE, id="leading-zeros"),
        pytest.param(b"9" * 40, 100, errors.BODY_TOO_LARGE, id="huge"),
        pytest.param(b"9" * 40, 0, None, id="unlimited"),
    ],
)
def test_gate_declared_length(
    length: bytes, max_body_size: int, expected: errors.ProxyError | None
) -> None:
    gate = _gate(max_body_size=max_body_size)

    assert gate.refusal(_scope((CL, length)), b"/x") is expected


def test_gate_body_too_large_is_unsent() -> None:
    assert errors.BODY_TOO_LARGE.upstream_reached is False


def test_gate_authenticates_before_framing() -> None:
    gate = _gate(tokens=TOKENS)

    rejected = gate.refusal(_scope((CL, b"5"), (TE, b"chunked")), b"/x")

    assert rejected is errors.UNAUTHORIZED


def test_gate_checks_framing_before_policy() -> None:
    gate = _gate(rules=RequestRules(read_only=True))

    rejected = gate.refusal(_scope((CL, b"5"), (TE, b"chunked")), b"/x")

    assert rejected is errors.BAD_FRAMING


@pytest.mark.parametrize(
    ("rules", "path", "expected"),
    [
        pytest.param(RequestRules(read_only=True), b"/x", errors.FORBIDDEN, id="method"),
        pytest.param(RequestRules(deny_paths=DENY_TOKEN), b"/token", errors.FORBIDDEN, id="deny"),
        pytest.param(
            RequestRules(deny_paths=DENY_TOKEN), b"/a/../token", errors.AMBIGUOUS_PATH, id="dots"
        ),
    ],
)
def test_gate_maps_policy_refusals(
    rules: RequestRules, path: bytes, expected: errors.ProxyError
) -> None:
    assert _gate(rules=rules).refusal(_scope(), path) is expected


def test_gate_passes_valid_token() -> None:
    authorization = (b"authorization", b"Bearer " + TOKENS[1].encode())

    assert _gate(tokens=TOKENS).refusal(_scope(authorization), b"/x") is None


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param([], "access token missing", id="missing"),
        pytest.param([(b"authorization", b"Basic eDp5")], "access token malformed", id="basic"),
        pytest.param(
            [(b"authorization", b"Bearer wrong-4c1d")], "access token not recognised", id="wrong"
        ),
    ],
)
def test_gate_logs_reason_not_value(
    caplog: pytest.LogCaptureFixture, headers: list[tuple[bytes, bytes]], reason: str
) -> None:
    caplog.set_level(logging.DEBUG)

    _gate(tokens=TOKENS).authenticate(_scope(*headers))

    assert reason in caplog.text
    assert "wrong-4c1d" not in caplog.text
    assert "eDp5" not in caplog.text
    assert all(token not in caplog.text for token in TOKENS)


def test_gate_logs_policy_rule(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nexus_proxy")

    _gate(rules=RequestRules(deny_paths=DENY_TOKEN)).refusal(_scope(method="GET"), b"/token/x")

    assert "deny_paths '/token/**'" in caplog.text


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(errors.UNAUTHORIZED, id="unauthorized"),
        pytest.param(errors.FORBIDDEN, id="forbidden"),
        pytest.param(errors.AMBIGUOUS_PATH, id="ambiguous-path"),
        pytest.param(errors.BAD_FRAMING, id="framing"),
        pytest.param(errors.BAD_REQUEST, id="target"),
        pytest.param(errors.HEADERS_TOO_LARGE, id="headers"),
        pytest.param(errors.HEADER_TIMEOUT, id="header-timeout"),
    ],
)
def test_early_errors_mark_upstream_unreached(error: errors.ProxyError) -> None:
    assert error.upstream_reached is False
