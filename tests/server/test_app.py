"""The app's lifespan, limits and the `compound` command line."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import pytest
from litestar.testing import TestClient

from engine import EngineError, SamplingParams
from server.app import create_app
from server.cli import build_parser, main
from server.config import ModelConfig, ServerConfig
from tests.server.conftest import MODEL, RecordingEngine
from tests.server.test_openai_api import assert_error, events

REPO = Path(__file__).resolve().parents[2]


def test_lifespan_loads_models_skips_missing_and_shuts_down(
    config: ServerConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = ModelConfig(name="later", path=str(tmp_path / "not-built-yet"))
    config = msgspec.structs.replace(config, models=(*config.models, missing))
    with caplog.at_level(logging.WARNING), TestClient(create_app(config)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ok", "models": [MODEL]}
        engine = client.app.state.engine
    assert "not-built-yet" in caplog.text
    with pytest.raises(EngineError, match="shut down"):
        engine.generate(["x"], SamplingParams(max_tokens=1), model=MODEL)


def test_a_given_engine_outlives_the_app(config: ServerConfig, engine: RecordingEngine) -> None:
    with TestClient(create_app(config, engine)) as client:
        assert client.get("/readyz").status_code == 200
    assert engine.generate(["x"], SamplingParams(max_tokens=1), model=MODEL)[0].token_ids


def test_request_timeout(config: ServerConfig, engine: RecordingEngine) -> None:
    limits = msgspec.structs.replace(config.limits, request_timeout_s=0.05)
    app = create_app(msgspec.structs.replace(config, limits=limits), engine)
    body = {"model": MODEL, "prompt": "the", "max_tokens": 4000, "ignore_eos": True}
    with TestClient(app) as client:
        error = assert_error(client.post("/v1/completions", json=body), 504, code="timeout")
        assert "0.05" in error["message"]
        streamed = events(client.post("/v1/completions", json={**body, "stream": True}).text)
        assert streamed[-1]["error"]["code"] == "timeout"
    assert engine.wait_idle(timeout_s=10.0)


def test_parser_has_serve_with_overrides() -> None:
    args = build_parser().parse_args(["serve", "--port", "9000"])
    assert (args.command, args.config, args.host, args.port) == (
        "serve",
        "compound.yaml",
        None,
        9000,
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_serve_with_a_bad_config_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits: {max_tokens: lots}\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "limits.max_tokens" in caplog.text


def test_compound_serve_subprocess(tiny_model_dir: Path, tmp_path: Path) -> None:
    file = tmp_path / "compound.yaml"
    file.write_text(
        "engine: {device: cpu, memory_budget_bytes: 1073741824}\n"
        f"models:\n  - {{name: {MODEL}, path: {tiny_model_dir}}}\n"
    )
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(file), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        ready = _wait_ready(f"http://127.0.0.1:{port}/readyz", proc, timeout_s=40)
        assert ready == {"status": "ok", "models": [MODEL]}
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, output
    assert "engine shut down" in output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen[str], timeout_s: float) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"compound serve exited: {proc.communicate()[0]}")
        try:
            return httpx.get(url, timeout=1).json()
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail("compound serve did not become ready")
