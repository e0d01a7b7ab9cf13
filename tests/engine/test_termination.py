"""``serve`` says why it could not start: one line on stderr and in the termination-message file."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from kvcache_engine import termination
from kvcache_engine.cli import main
from kvcache_engine.contract import ConfigError
from kvcache_engine.core.tiers import PoolAllocationError


@pytest.mark.parametrize(
    ("exc", "reason", "code"),
    [
        (PoolAllocationError("cannot allocate the block pool: 9 GiB asked"), "PoolAllocationFailed", 2),
        (ConfigError("config.maxTokens: must be >= 16"), "InvalidConfig", 2),
        (RuntimeError("Found no NVIDIA driver on your system."), "CudaUnavailable", 1),
        (AssertionError("Torch not compiled with CUDA enabled"), "CudaUnavailable", 1),
        (OSError(errno.EADDRINUSE, "address already in use"), "ListenFailed", 1),
        (KeyError("slot"), "EngineFailed", 1),
    ],
)
def test_classify_names_the_reason_and_exit_code(exc: BaseException, reason: str, code: int) -> None:
    failure = termination.classify(exc)
    assert (failure.reason, failure.exit_code) == (reason, code)
    assert failure.expected == (reason != "EngineFailed")
    assert failure.line.startswith(f"{reason}: ")


def test_a_multi_line_detail_becomes_one_capped_line() -> None:
    failure = termination.classify(ConfigError("config.a: bad\n\nconfig.b: worse\n"))
    assert failure.line == "InvalidConfig: config.a: bad; config.b: worse"
    long = termination.classify(ConfigError("é" * 5000)).line
    assert len(long.encode()) <= termination.MAX_BYTES and long.endswith("...")


def test_write_goes_to_the_env_path_and_skips_silently_when_it_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(termination.ENV_VAR, raising=False)
    assert termination.write("InvalidConfig: x") is False  # outside a pod: nothing written
    monkeypatch.setenv(termination.ENV_VAR, str(tmp_path / "termination-log"))
    assert termination.write("InvalidConfig: x") is True
    assert (tmp_path / "termination-log").read_text() == "InvalidConfig: x"
    monkeypatch.setenv(termination.ENV_VAR, str(tmp_path / "missing" / "termination-log"))
    assert termination.write("InvalidConfig: x") is False


def _serve(tmp_path: Path, config: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    path = tmp_path / "config.yaml"
    path.write_text(config)
    monkeypatch.setenv(termination.ENV_VAR, str(tmp_path / "termination-log"))
    code = main(["serve", "--config", str(path), "--host", "127.0.0.1", "--port", "0"])
    return code, (tmp_path / "termination-log").read_text()


def test_serve_with_a_pool_larger_than_memory_writes_pool_allocation_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = "numLayers: 32\nnumKvHeads: 8\nheadDim: 128\nmaxTokens: 2147483648\ndevice: cpu\n"
    code, message = _serve(tmp_path, config, monkeypatch)
    assert code == 2
    assert message.startswith(
        "PoolAllocationFailed: cannot allocate the block pool: max_tokens=2147483648 (134217728 blocks"
    )
    assert "\n" not in message
    err = capsys.readouterr().err
    assert f"kvcache-engine serve: error: {message}\n" in err and "Traceback" not in err


def test_serve_with_a_bad_config_file_writes_invalid_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, message = _serve(tmp_path, "maxTokenz: 3\n", monkeypatch)
    assert code == 2
    assert (
        message
        == f"InvalidConfig: {tmp_path / 'config.yaml'}.maxTokenz: Extra inputs are not permitted (got 3)"
    )
    assert capsys.readouterr().err.endswith(f"kvcache-engine serve: error: {message}\n")
