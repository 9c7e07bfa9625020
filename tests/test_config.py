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
        ("port = 'abc'", ["tokenrelay.toml, port:", "valid integer"]),
        ("nonsense = 1", ["unknown setting", "nonsense"]),
        ("upstream_ur = 'http://h/v1'", ["tokenrelay.toml, upstream_ur: unknown setting", "did you mean upstream_url?"]),
        ("port = ", ["not valid TOML"]),
        ("log_level = 'loud'", ["tokenrelay.toml, log_level:", "must be one of"]),
        ("[[routes]]\npattern = 'x'\nkind = 'bedrock'\nurl = 'http://h/v1'", ["tokenrelay.toml, routes.0.kind:"]),
        ('upstream_key = "sk-x\\n"', ["tokenrelay.toml, upstream_key: the value ends with a newline"]),
    ],
)
def test_bad_file_names_the_file_and_key(tmp_path, contents: str, words: list[str]) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text(contents + "\n")
    with pytest.raises(SettingsError) as info:
        load_settings(config)
    for word in words:
        assert word in str(info.value)
    assert "TOKENRELAY_" not in str(info.value)
    assert "Value error" not in str(info.value)


def test_a_bad_value_names_the_source_it_came_from(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text("port = 70000\n")
    monkeypatch.setenv("TOKENRELAY_PORT", "80000")
    with pytest.raises(SettingsError) as info:
        load_settings(config)
    assert str(info.value) == "invalid setting TOKENRELAY_PORT: Input should be less than or equal to 65535"
    with pytest.raises(SettingsError) as info:
        load_settings(config, port=90000)
    assert [(p.source, p.where) for p in info.value.problems] == [("flag", "--port")]


def test_an_upstream_key_is_read_from_its_two_variables_only(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-unrelated")
    assert load_settings().upstream_key is None
    config = tmp_path / "tokenrelay.toml"
    config.write_text('upstream_key = "sk-from-file"\n')
    assert load_settings(config).upstream_key.get_secret_value() == "sk-from-file"
    assert load_settings(config, upstream_key="sk-flag").upstream_key.get_secret_value() == "sk-flag"


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    from tokenrelay.config import unknown_env

    assert unknown_env({
        "TOKENRELAY_UPSTREM_URL": "http://h/v1", "tokenrelay_hearbeat_interval": "1", "TOKENRELAY_XYZZY": "1",
        "TOKENRELAY_PORT": "1", "OPENAI_API_KEY": "k", "HOME": "/",
    }) == [
        "TOKENRELAY_UPSTREM_URL is not a tokenrelay setting and is ignored; did you mean TOKENRELAY_UPSTREAM_URL?",
        "TOKENRELAY_XYZZY is not a tokenrelay setting and is ignored",
        "tokenrelay_hearbeat_interval is not a tokenrelay setting and is ignored; "
        "did you mean TOKENRELAY_HEARTBEAT_INTERVAL?",
    ]


def test_every_variable_tokenrelay_reads_is_known() -> None:
    """A TOKENRELAY_* name in the code that is neither a setting nor listed in OTHER_ENV would
    draw the 'not a setting' warning from those who set it."""
    import re
    from pathlib import Path

    import tokenrelay
    from tokenrelay.config import unknown_env

    source = Path(tokenrelay.__file__).parent
    names = {name for path in source.rglob("*.py")
             for name in re.findall(r"TOKENRELAY_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8"))}
    assert {"TOKENRELAY_API_KEY", "TOKENRELAY_URL", "TOKENRELAY_CONFIG_FILE", "TOKENRELAY_SERVE_PROCESSES"} <= names
    assert unknown_env(dict.fromkeys(names, "x")) == []


def test_every_setting_is_described_once() -> None:
    from tokenrelay.config import SECTIONS, Settings

    assert set(SECTIONS) <= set(Settings.model_fields)
    assert [name for name, field in Settings.model_fields.items() if not field.description] == []


SECRET = "sk-do-not-print-7f3a"


@pytest.mark.parametrize(
    ("env", "setting", "flaw"),
    [
        ({"TOKENRELAY_UPSTREAM_KEY": SECRET + "\n"}, "TOKENRELAY_UPSTREAM_KEY", "ends with a newline"),
        ({"OPENAI_API_KEY": SECRET + "\r\n"}, "OPENAI_API_KEY", "ends with a newline"),
        ({"OPENAI_API_KEY": SECRET + "\r"}, "OPENAI_API_KEY", "ends with a carriage return"),
        ({"TOKENRELAY_UPSTREAM_KEY": " " + SECRET}, "TOKENRELAY_UPSTREAM_KEY", "starts with a space"),
        ({"TOKENRELAY_UPSTREAM_KEY": SECRET[:5] + "\t" + SECRET[5:]}, "TOKENRELAY_UPSTREAM_KEY",
         "contains a tab (character 6)"),
        ({"TOKENRELAY_UPSTREAM_KEY": "sk-…"}, "TOKENRELAY_UPSTREAM_KEY", "non-ASCII character U+2026"),
        ({"TOKENRELAY_API_KEYS": f"tr-one,{SECRET}\n"}, "TOKENRELAY_API_KEYS", "ends with a newline"),
        ({"TOKENRELAY_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n"}, "TOKENRELAY_WEBHOOK_SECRET",
         "ends with a newline"),
        ({"ROUTE_KEY": SECRET + "\n",
          "TOKENRELAY_ROUTES": '[{"pattern": "gpt-*", "url": "http://h/v1", "key_env": "ROUTE_KEY"}]'},
         "TOKENRELAY_ROUTES", "route 'gpt-*': the key in ROUTE_KEY: the value ends with a newline"),
    ],
)
def test_a_secret_with_a_stray_character_is_refused_unseen(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                           setting: str, flaw: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(f"invalid setting {setting}: ")
    assert flaw in message
    assert SECRET not in message and "MfKQ9r8" not in message


@pytest.mark.parametrize(("secret", "words"), [
    ("whsec_abc", ["holds 2 bytes", "24 to 64", "tokenrelay webhooks secret"]),
    ("whsec_" + "A" * 100, ["holds 75 bytes"]),
    ("whsec_not*base64!", ["'whsec_' and base64"]),
])
def test_a_weak_webhook_secret_is_refused(monkeypatch: pytest.MonkeyPatch, secret: str, words: list[str]) -> None:
    monkeypatch.setenv("TOKENRELAY_WEBHOOK_SECRET", secret)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert str(info.value).startswith("invalid setting TOKENRELAY_WEBHOOK_SECRET: ")
    for word in words:
        assert word in str(info.value)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(SettingsError, match="is not a file"):
        load_settings(tmp_path)
