"""wandb=online is checked before any work: a missing key or an unreachable server is one line within seconds."""

from __future__ import annotations

import socket
import time

import pytest

from pretrain.config import WandbConfig
from pretrain.errors import ConfigError
from pretrain.tracking import check_wandb_online


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_offline_and_disabled_are_not_checked(no_credentials):
    check_wandb_online(WandbConfig(mode="offline"))
    check_wandb_online(WandbConfig(mode="disabled"))


def test_online_without_a_key_is_one_line(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match=r"wandb=online needs an API key .* use wandb=offline"):
        check_wandb_online(WandbConfig(mode="online"))


def test_online_with_a_key_but_no_server_is_one_line_within_seconds(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"wandb=online cannot reach 127.0.0.1:\d+ .* use wandb=offline"):
        check_wandb_online(WandbConfig(mode="online"))
    assert time.monotonic() - started < 10


def test_a_key_in_netrc_counts(no_credentials, monkeypatch, tmp_path):
    port = free_port()
    (tmp_path / "netrc").write_text("machine 127.0.0.1 login user password " + "k" * 40 + "\n")
    (tmp_path / "netrc").chmod(0o600)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    with socket.socket() as server:  # a server that accepts: the check passes
        server.bind(("127.0.0.1", port))
        server.listen()
        check_wandb_online(WandbConfig(mode="online"))
