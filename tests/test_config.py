"""Tests for llmbatch.config: built-in profiles, llmbatch.toml overrides, prices."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from llmbatch.config import (
    BUILTIN_PROFILES,
    LimiterSettings,
    ModelProfile,
    config_file,
    limiter_settings,
    load_profiles,
    profile_for,
)
from llmbatch.errors import redact
from llmbatch.limits import Limits
from llmbatch.models import Usage
from llmbatch.providers.local import DEFAULT_MODEL, DEFAULT_N_CTX, LocalProvider


def test_builtin_profile_and_unknown_model() -> None:
    """Known models have limits and prices; unknown ones learn their limits, unpriced."""
    known = profile_for("openai", "gpt-4o-mini", profiles=BUILTIN_PROFILES)
    assert (500, 200_000, 0.15, 0.60) == (
        known.limits.rpm,
        known.limits.tpm,
        known.input_price,
        known.output_price,
    )
    unknown = profile_for("openai", "my-finetune", profiles=BUILTIN_PROFILES)
    assert (True, None) == (unknown.limits.learn, unknown.input_price)


@pytest.mark.parametrize(
    ("name", "window"),
    [
        ("openai/gpt-4o-mini", 128_000),
        ("openai/gpt-4o", 128_000),
        ("openai/gpt-4.1", 1_047_576),
        ("openai/gpt-4.1-mini", 1_047_576),
        ("openai/text-embedding-3-small", 8_191),
        ("openai/text-embedding-3-large", 8_191),
        ("anthropic/claude-haiku-4-5", 200_000),
        ("anthropic/claude-sonnet-4-5", 200_000),
        (f"local/{DEFAULT_MODEL}", DEFAULT_N_CTX),
    ],
)
def test_builtin_context_windows(name: str, window: int) -> None:
    """Every built-in profile knows its model's context window (the local model's is the
    window LocalProvider gives llama.cpp by default); a model without one has None."""
    assert window == BUILTIN_PROFILES[name].context_window
    assert profile_for("openai", "my-finetune", profiles=BUILTIN_PROFILES).context_window is None


def test_the_local_window_is_the_providers_default_n_ctx() -> None:
    """The local profile's window follows LocalProvider's n_ctx default, not a copy of it."""
    default = inspect.signature(LocalProvider).parameters["n_ctx"].default
    assert (DEFAULT_N_CTX, DEFAULT_N_CTX) == (
        default,
        BUILTIN_PROFILES[f"local/{DEFAULT_MODEL}"].context_window,
    )


@pytest.mark.parametrize(
    ("text", "name", "window"),
    [
        ('[models."openai/gpt-4o-mini"]\ncontext_window = 64000\n', "openai/gpt-4o-mini", 64_000),
        ('[models."vllm/llama-3-8b"]\ncontext_window = 8192\n', "vllm/llama-3-8b", 8_192),
        ('[models."openai/gpt-4o"]\nrpm = 7\n', "openai/gpt-4o", 128_000),
    ],
)
def test_toml_sets_the_context_window(tmp_path: Path, text: str, name: str, window: int) -> None:
    """``context_window`` is set in llmbatch.toml like the prices; other settings keep it."""
    config = tmp_path / "llmbatch.toml"
    config.write_text(text)
    profile = load_profiles(config)[name]
    assert (window, int) == (profile.context_window, type(profile.context_window))


def test_environment_json_sets_the_context_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLMBATCH_PROFILES sets it too, as a whole number."""
    config = tmp_path / "llmbatch.toml"
    config.write_text('[models."openai/gpt-4o"]\ncontext_window = 64000\n')
    monkeypatch.setenv("LLMBATCH_PROFILES", '{"openai/gpt-4o": {"context_window": 32000}}')
    assert 32_000 == load_profiles(config)["openai/gpt-4o"].context_window


@pytest.mark.parametrize(
    ("usage", "batch", "expected"),
    [
        (Usage(input_tokens=1_000_000, output_tokens=0), False, 2.0),
        (Usage(input_tokens=0, output_tokens=1_000_000), False, 8.0),
        (Usage(input_tokens=1_000_000, output_tokens=1_000_000), True, 5.0),  # half price
        (Usage(input_tokens=1_000_000, cached_tokens=500_000), False, 1.25),
    ],
)
def test_cost(usage: Usage, batch: bool, expected: float) -> None:
    """Cost = uncached input + cached input + output, per million; batch discount applied."""
    profile = ModelProfile(
        provider="p", model="m", input_price=2.0, output_price=8.0, cached_input_price=0.5
    )
    assert expected == pytest.approx(profile.cost(usage, batch=batch))


def test_cost_is_unknown_without_prices() -> None:
    """No prices: no made-up cost."""
    assert ModelProfile(provider="p", model="m").cost(Usage(input_tokens=5)) is None


def test_toml_overrides_and_adds_models(tmp_path: Path) -> None:
    """llmbatch.toml changes a built-in model's limits and adds a new model."""
    config = tmp_path / "llmbatch.toml"
    config.write_text(
        '[models."openai/gpt-4o-mini"]\nrpm = 5000\ntpm = 2000000\n\n'
        '[models."vllm/llama-3-8b"]\nmax_concurrency = 16\ninput_price = 0\noutput_price = 0\n'
    )
    profiles = load_profiles(config)
    mini = profiles["openai/gpt-4o-mini"]
    assert (5000, 2_000_000, 0.15) == (mini.limits.rpm, mini.limits.tpm, mini.input_price)
    llama = profiles["vllm/llama-3-8b"]
    # a configured profile is a starting estimate: reported limits replace it
    assert (Limits(max_concurrency=16, learn=True), 0.0) == (llama.limits, llama.output_price)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models."gpt-4o"]\nrpm = 5\n', "model names are 'provider/model'"),
        ('[models."openai/x"]\napi_key = "sk-123"\n', "unknown settings"),
        ('[models."openai/x"]\nrpm = 0\n', "Limits.rpm must be positive"),
        ('[models."openai/x"]\ncontext_window = 0\n', "context_window .*at least 1"),
        ('[models."openai/x"]\ncontext_window = 1.5e5\n', "context_window .* whole number"),
        ('[models."openai/x"]\ncontext_window = "128k"\n', "context_window .* whole number"),
        ('[models."openai/x"]\ncontext_window = true\n', "context_window .* whole number"),
    ],
)
def test_bad_toml_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    """Misnamed models, unknown keys (API keys included) and bad limits are refused."""
    config = tmp_path / "llmbatch.toml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_profiles(config)


def test_config_file_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LLMBATCH_CONFIG names the file; a missing named file is an error."""
    config = tmp_path / "custom.toml"
    config.write_text('[models."openai/gpt-4o"]\nrpm = 7\n')
    monkeypatch.setenv("LLMBATCH_CONFIG", str(config))
    assert 7 == load_profiles()["openai/gpt-4o"].limits.rpm
    monkeypatch.setenv("LLMBATCH_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ValueError, match="configuration file not found"):
        load_profiles()


def test_environment_json_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LLMBATCH_PROFILES (JSON) overrides the file and the built-ins; bad JSON is an error."""
    config = tmp_path / "llmbatch.toml"
    config.write_text('[models."openai/gpt-4o"]\nrpm = 7\n')
    monkeypatch.setenv("LLMBATCH_PROFILES", '{"openai/gpt-4o": {"rpm": 9, "output_price": 1}}')
    profile = load_profiles(config)["openai/gpt-4o"]
    assert (9, 1.0, 2.5) == (profile.limits.rpm, profile.output_price, profile.input_price)
    monkeypatch.setenv("LLMBATCH_PROFILES", "{rpm: 9")
    with pytest.raises(ValueError, match="LLMBATCH_PROFILES is not valid JSON"):
        load_profiles(config)


def test_pyproject_tool_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without llmbatch.toml, ``[tool.llmbatch.models]`` in pyproject.toml is read."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMBATCH_CONFIG", raising=False)
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n[tool.llmbatch.models."openai/gpt-4o-mini"]\nrpm = 7\n'
    )
    found = config_file()
    assert found is not None
    assert tmp_path / "pyproject.toml" == found.absolute()
    assert 7 == load_profiles()["openai/gpt-4o-mini"].limits.rpm
    (tmp_path / "llmbatch.toml").write_text('[models."openai/gpt-4o-mini"]\nrpm = 9\n')
    assert 9 == load_profiles()["openai/gpt-4o-mini"].limits.rpm


def test_pyproject_without_a_tool_table_is_not_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pyproject.toml with no ``[tool.llmbatch]`` leaves the built-ins alone."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMBATCH_CONFIG", raising=False)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert config_file() is None
    assert 500 == load_profiles()["openai/gpt-4o-mini"].limits.rpm


# -- where quotas are kept ----------------------------------------------------------------


def test_quotas_stay_in_the_process_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No environment and no [limiter] table: in-process quotas."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMBATCH_LIMITER_URL", raising=False)
    assert LimiterSettings() == limiter_settings()
    assert (False, "in-process") == (limiter_settings().shared, limiter_settings().describe())


def test_limiter_table_in_llmbatch_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[limiter] url and namespace in llmbatch.toml select a shared Redis quota."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMBATCH_LIMITER_URL", raising=False)
    monkeypatch.delenv("LLMBATCH_LIMITER_NAMESPACE", raising=False)
    (tmp_path / "llmbatch.toml").write_text(
        '[limiter]\nurl = "redis://10.0.0.5:6379/2"\nnamespace = "team-a"\n'
    )
    expected = LimiterSettings(url="redis://10.0.0.5:6379/2", namespace="team-a")
    assert expected == limiter_settings()


def test_limiter_table_in_pyproject(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[tool.llmbatch.limiter] in pyproject.toml works the same way."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMBATCH_LIMITER_URL", raising=False)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.llmbatch.limiter]\nurl = "unix:///run/redis.sock"\n'
    )
    assert "unix:///run/redis.sock" == limiter_settings().url


def test_the_environment_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLMBATCH_LIMITER_URL and LLMBATCH_LIMITER_NAMESPACE win over the file; "memory"
    turns sharing off."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llmbatch.toml").write_text('[limiter]\nurl = "redis://a:6379/0"\n')
    monkeypatch.setenv("LLMBATCH_LIMITER_URL", "rediss://b:6380/1")
    monkeypatch.setenv("LLMBATCH_LIMITER_NAMESPACE", "batch-jobs")
    assert LimiterSettings(url="rediss://b:6380/1", namespace="batch-jobs") == limiter_settings()
    monkeypatch.setenv("LLMBATCH_LIMITER_URL", "memory")
    assert None is limiter_settings().url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://:s3cret-pass@cache:6379", "unsupported limiter URL 'http://:***@cache:6379'"),
        ("127.0.0.1:6379", "unsupported limiter URL '127.0.0.1:6379'"),
        ("memcached://x", "use redis://host:port/db"),
    ],
)
def test_a_bad_limiter_url_is_a_clear_error_without_its_password(url: str, message: str) -> None:
    """Anything but redis://, rediss://, unix:// or "memory" is refused, and the message
    never shows a password."""
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace("?", r"\?")) as info:
        LimiterSettings.parse(url)
    assert "s3cret" not in str(info.value)


def test_unknown_limiter_settings_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo in [limiter] is an error naming it, not a silently in-process quota."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMBATCH_LIMITER_URL", raising=False)
    (tmp_path / "llmbatch.toml").write_text('[limiter]\nuri = "redis://a:6379/0"\n')
    with pytest.raises(ValueError, match=r"unknown \[limiter\] settings: \['uri'\]"):
        limiter_settings()


def test_a_password_never_shows_in_the_settings() -> None:
    """The repr and describe() of settings with a password in the URL hide it."""
    settings = LimiterSettings.parse("redis://:hunter2-secret@10.1.1.1:6379/0")
    assert "redis://:***@10.1.1.1:6379/0" == settings.describe()
    assert "hunter2" not in repr(settings)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:pw12345@h:6379/0", "redis://:***@h:6379/0"),
        ("failed: rediss://user:p%40ss@h:1/2 refused", "failed: rediss://user:***@h:1/2 refused"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:p@ss@h:6379/0", "redis://:***@h:6379/0"),  # an unencoded "@" in it
        ("redis://h:6379/0?password=s3cr3t&db=1", "redis://h:6379/0?password=***&db=1"),
        ("unix:///run/redis.sock?db=0&password=s3cr3t", "unix:///run/redis.sock?db=0&password=***"),
        ("http://example.com/a:b@c", "http://example.com/a:b@c"),  # no password there
        ("key sk-abcdefghijklmnop1234", "key sk-…1234"),
    ],
)
def test_redact_hides_url_passwords_and_keys(text: str, expected: str) -> None:
    """errors.redact(): URL passwords become ***; API keys keep a 4-character hint."""
    assert expected == redact(text)


def test_a_client_reads_the_configuration_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLMClient takes its model profiles and where quotas are kept from one reading of
    llmbatch.toml, not one per setting."""
    import llmbatch.config as config_module
    from llmbatch.client import LLMClient
    from llmbatch.providers.fake import FakeProvider

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMBATCH_LIMITER_URL", raising=False)
    (tmp_path / "llmbatch.toml").write_text(
        '[limiter]\nurl = "redis://10.0.0.9:6379/0"\n[models."fake/m"]\nrpm = 7\n'
    )
    reads: list[Path | None] = []
    read = config_module._settings

    def counting(path: str | Path | None) -> tuple[Path | None, dict[str, Any]]:
        found, data = read(path)
        reads.append(found)
        return found, data

    monkeypatch.setattr(config_module, "_settings", counting)
    client = LLMClient(FakeProvider(lambda request: "ok"), model="m")
    assert [Path("llmbatch.toml")] == reads
    assert ("redis://10.0.0.9:6379/0", 7) == (
        client.limiter_settings.url,
        client.profile("m").limits.rpm,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[models."openai/o3"]\ntimeout = 600\n', 600.0),
        ('[models."openai/o3"]\ntimeout = 2.5\n', 2.5),
        ('[models."openai/o3"]\nrpm = 10\n', None),
    ],
)
def test_toml_sets_a_models_timeout(tmp_path: Path, text: str, expected: float | None) -> None:
    """A model's ``timeout`` (seconds one attempt may wait) is set in llmbatch.toml."""
    config = tmp_path / "llmbatch.toml"
    config.write_text(text)
    assert expected == load_profiles(config)["openai/o3"].timeout


@pytest.mark.parametrize("bad", ["0", "-1", '"slow"', "true"])
def test_a_bad_timeout_is_refused(tmp_path: Path, bad: str) -> None:
    """A timeout that is not a positive number is a clear configuration error."""
    config = tmp_path / "llmbatch.toml"
    config.write_text(f'[models."openai/o3"]\ntimeout = {bad}\n')
    with pytest.raises(ValueError, match="timeout for 'openai/o3' must be a positive number"):
        load_profiles(config)
