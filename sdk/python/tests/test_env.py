"""Defaults a deployment sets through the environment (the Helm sidecar app pod)."""

from __future__ import annotations

from pathlib import Path

import pytest

from chime_sdk import Worker


def test_deliveries_and_token_file_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("sidecar-token-0123456789\n")
    monkeypatch.setenv("CHIME_DELIVERIES", "http://127.0.0.1:7071")
    monkeypatch.setenv("CHIME_DELIVERIES_TOKEN_FILE", str(token))
    w = Worker()
    assert w._deliveries is not None and w._deliveries.url == "http://127.0.0.1:7071"
    assert w._token.get() == "sidecar-token-0123456789"


def test_an_empty_token_file_setting_means_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHIME_DELIVERIES", "http://127.0.0.1:7071")
    monkeypatch.setenv("CHIME_DELIVERIES_TOKEN_FILE", "")
    w = Worker()
    assert w._token.metadata() == ()
    assert Worker(deliveries="http://127.0.0.1:7071", token_file="")._token.get() is None


def test_without_the_environment_a_worker_needs_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHIME_DELIVERIES", raising=False)
    with pytest.raises(ValueError):
        Worker()
