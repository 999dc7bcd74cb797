"""Tests for llmbatch.config: built-in profiles, llmbatch.toml overrides, prices."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmbatch.config import (
    BUILTIN_PROFILES,
    ModelProfile,
    config_file,
    load_profiles,
    profile_for,
)
from llmbatch.limits import Limits
from llmbatch.models import Usage


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
    assert (Limits(max_concurrency=16), 0.0) == (llama.limits, llama.output_price)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models."gpt-4o"]\nrpm = 5\n', "model names are 'provider/model'"),
        ('[models."openai/x"]\napi_key = "sk-123"\n', "unknown settings"),
        ('[models."openai/x"]\nrpm = 0\n', "Limits.rpm must be positive"),
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
