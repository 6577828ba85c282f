from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from joycap_queue.config import TINY_MODEL_MARKER, Settings, is_tiny_model, mask_url, tiny_model_info


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@redis.example:6379/0", "redis://:***@redis.example:6379/0"),
        ("rediss://default:s3cret@redis.example:6380/1", "rediss://default:***@redis.example:6380/1"),
        ("redis://s3cret@redis.example:6379/0", "redis://***@redis.example:6379/0"),
        ("postgresql+psycopg://joy:pa%40ss@db:5432/joy", "postgresql+psycopg://joy:***@db:5432/joy"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_mask_url_hides_passwords(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert "s3cret" not in mask_url(url) and "pa%40ss" not in mask_url(url)


def test_settings_read_the_joycap_env_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JOYCAP_BROKER_URL", "redis://elsewhere:6379/2")
    monkeypatch.setenv("JOYCAP_MAX_NEW_TOKENS", "77")
    monkeypatch.setenv("JOYCAP_TOP_P", "none")
    monkeypatch.setenv("JOYCAP_DATA_DIR", str(tmp_path))
    settings = Settings()
    assert settings.broker_url == "redis://elsewhere:6379/2"
    assert settings.max_new_tokens == 77
    assert settings.top_p is None
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'joycap.db'}"


def test_visibility_timeout_must_exceed_the_task_time_limit() -> None:
    with pytest.raises(ValidationError, match="visibility_timeout_s"):
        Settings(task_time_limit_s=3600, visibility_timeout_s=3000)


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(max_new_tokens=0)
    with pytest.raises(ValidationError):
        Settings(dtype="int3")  # type: ignore[arg-type]


def test_tiny_model_marker(tmp_path: Path) -> None:
    assert not is_tiny_model(str(tmp_path))
    assert not is_tiny_model("fancyfeast/llama-joycaption-beta-one-hf-llava")
    (tmp_path / TINY_MODEL_MARKER).write_text('{"profile": "alpha-two"}')
    assert is_tiny_model(str(tmp_path))
    assert tiny_model_info(str(tmp_path)) == {"profile": "alpha-two"}


def test_batch_size_takes_a_number_or_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().batch_size == 0  # auto is the default
    assert Settings(batch_size="auto").batch_size == 0  # type: ignore[arg-type]
    assert Settings(batch_size=" 16 ").batch_size == 16  # type: ignore[arg-type]
    monkeypatch.setenv("JOYCAP_BATCH_SIZE", "AUTO")
    assert Settings().batch_size == 0
    with pytest.raises(ValidationError, match="a number of images or 'auto'"):
        Settings(batch_size="lots")  # type: ignore[arg-type]
    # With -b auto the engine decides; the paths without it run batches of 8.
    assert Settings().effective_batch_size == 8
    assert Settings(engine="generate").uses_engine is False
    assert Settings(backend="null").uses_engine is False
    assert Settings().uses_engine is True
