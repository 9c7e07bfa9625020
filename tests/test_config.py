from __future__ import annotations

import pytest

from tokenrelay.config import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("TOKENRELAY_") or name == "OPENAI_API_KEY":
            monkeypatch.delenv(name)


def test_defaults_run_on_the_simulator() -> None:
    settings = load_settings()
    assert settings.simulated
    assert settings.default_model == "sim"
    assert settings.upstream_label == "simulator"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)


def test_upstream_key_falls_back_to_openai_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback")
    assert load_settings().upstream_key.get_secret_value() == "sk-fallback"
    monkeypatch.setenv("TOKENRELAY_UPSTREAM_KEY", "sk-own")
    assert load_settings().upstream_key.get_secret_value() == "sk-own"
    assert "sk-own" not in repr(load_settings())


def test_environment_beats_file_and_flags_beat_environment(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text('port = 7000\nmodel = "from-file"\nupstream_url = "http://127.0.0.1:9/v1/"\n')
    monkeypatch.setenv("TOKENRELAY_MODEL", "from-env")
    settings = load_settings(config)
    assert settings.port == 7000
    assert settings.model == "from-env"
    assert settings.upstream_url == "http://127.0.0.1:9/v1"
    assert load_settings(config, port=7100).port == 7100


def test_label_hides_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_UPSTREAM_URL", "https://user:pw@api.example.com:8443/v1?key=x")
    assert load_settings().upstream_label == "https://api.example.com:8443/v1"


@pytest.mark.parametrize(
    ("contents", "words"),
    [
        ("port = 'abc'", ["TOKENRELAY_PORT"]),
        ("nonsense = 1", ["unknown setting", "nonsense"]),
        ("port = ", ["not valid TOML"]),
        ("log_level = 'loud'", ["TOKENRELAY_LOG_LEVEL"]),
    ],
)
def test_bad_file_names_the_setting(tmp_path, contents: str, words: list[str]) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text(contents + "\n")
    with pytest.raises(SettingsError) as info:
        load_settings(config)
    for word in words:
        assert word in str(info.value)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nope.toml")
