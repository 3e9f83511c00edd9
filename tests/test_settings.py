"""Settings: sources, precedence and validation, built inside each test."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from nexus_proxy.credentials import fingerprint, load_api_key
from nexus_proxy.errors import ConfigError
from nexus_proxy.settings import Settings, describe

ROOT = Path(__file__).resolve().parent.parent


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nexus-proxy.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("flags", "env", "toml", "expected"),
    [
        pytest.param([], {}, "", 8080, id="default"),
        pytest.param([], {}, "port = 1", 1, id="toml"),
        pytest.param([], {"NEXUS_PROXY_PORT": "2"}, "port = 1", 2, id="env-over-toml"),
        pytest.param(["--port", "3"], {"NEXUS_PROXY_PORT": "2"}, "port = 1", 3, id="flag-over-env"),
    ],
)
def test_settings_precedence(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    env: dict[str, str],
    toml: str,
    expected: int,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    settings = Settings.load(["--config", str(_toml(tmp_path, toml)), *flags])

    assert settings.port == expected


def test_settings_config_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXUS_PROXY_CONFIG", str(_toml(tmp_path, 'environment = "dcts"')))

    settings = Settings.load([])

    assert settings.upstream == "https://api.dcts.io"


def test_settings_missing_config_file_is_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config: no such file"):
        Settings.load(["--config", str(tmp_path / "absent.toml")])


def test_settings_unknown_toml_key_is_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings.load(["--config", str(_toml(tmp_path, "prot = 1"))])

    assert caught.value.errors()[0]["loc"] == ("prot",)


@pytest.mark.parametrize(
    ("environment", "upstream"),
    [
        pytest.param("test", "https://testapi.quantoznexus.com", id="test"),
        pytest.param("production", "https://api.quantoznexus.com", id="production"),
        pytest.param("dcts", "https://api.dcts.io", id="dcts"),
    ],
)
def test_settings_environment_urls(environment: str, upstream: str) -> None:
    assert Settings(environment=environment).upstream == upstream


def test_settings_upstream_url_overrides_environment() -> None:
    settings = Settings(environment="production", upstream_url="http://127.0.0.1:9/base/")

    assert settings.upstream == "http://127.0.0.1:9/base"


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("ftp://nexus.example", id="scheme"),
        pytest.param("https://", id="no-host"),
        pytest.param("https://nexus.example/?a=1", id="query"),
        pytest.param("https://user:pw@nexus.example", id="userinfo"),
    ],
)
def test_settings_rejects_bad_upstream_url(url: str) -> None:
    with pytest.raises(ValidationError):
        Settings(upstream_url=url)


def test_settings_repr_hides_key() -> None:
    settings = Settings(api_key="nx-secret-value")

    assert "nx-secret-value" not in repr(settings)
    assert "nx-secret-value" not in str(settings.model_dump())


def test_settings_errors_hide_input() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(api_key="nx-secret-value", port="nx-secret-value")

    assert "nx-secret-value" not in str(caught.value)


def test_describe_shows_fingerprint_only() -> None:
    settings = Settings(api_key="nx-secret-value")
    key = load_api_key(settings)

    described = describe(settings, {"api_key": fingerprint(key)})

    assert described["api_key"] == f"sha256:{fingerprint(key)}"
    assert "nx-secret-value" not in str(described)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("nx-key", "nx-key", id="plain"),
        pytest.param("  nx-key\n", "nx-key", id="stripped"),
        pytest.param("nx-key\r\n", "nx-key", id="crlf"),
    ],
)
def test_load_api_key_strips(raw: str, expected: str) -> None:
    assert load_api_key(Settings(api_key=raw)).get_secret_value() == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("", id="empty"),
        pytest.param(" \n", id="blank"),
        pytest.param("nx key", id="inner-space"),
        pytest.param("nx-key\x00", id="nul"),
        pytest.param("nx-kéy", id="non-ascii"),
        pytest.param("nx\r\nX-Injected: 1", id="header-injection"),
    ],
)
def test_load_api_key_rejects(raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_api_key(Settings(api_key=raw))

    assert "NEXUS_PROXY_API_KEY" in str(caught.value) or "api_key" in str(caught.value)
    if raw.strip():
        assert raw.strip() not in str(caught.value)


def test_load_api_key_missing_names_both_ways() -> None:
    with pytest.raises(ConfigError) as caught:
        load_api_key(Settings())

    assert "NEXUS_PROXY_API_KEY" in str(caught.value)
    assert "api_key_file" in str(caught.value)


def test_example_config_documents_every_key() -> None:
    text = (ROOT / "config.example.toml").read_text()
    active = tomllib.loads(text)

    for name in Settings.model_fields:
        if name == "config":
            continue
        assert f"{name} =" in text or f"[{name}]" in text, name
    assert Settings(**active).model_dump() == Settings().model_dump()


def test_settings_rejects_lower_case_methods() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(allow_methods=["GET", "post"])

    assert "'POST'" in str(caught.value)


def test_access_token_file_skips_comments(tmp_path: Path) -> None:
    from nexus_proxy.access import load_access_tokens

    path = tmp_path / "tokens"
    path.write_text("# team A\nalpha-token\n\n  # team B\nbeta-token\n")

    tokens = load_access_tokens(Settings(access_token_file=path))

    assert len(tokens) == 2
    assert tokens.refusal([(b"authorization", b"Bearer beta-token")]) is None
