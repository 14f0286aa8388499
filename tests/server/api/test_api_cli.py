"""server/cli.py: flags -> settings and engine arguments, init-model, and serve's start-up sequence."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from mcserve.server import cli
from mcserve.server.errors import ConfigError
from mcserve.server.settings import ApiSettings
from tests.server.api.conftest import free_port
from tests.server.api.fake_engine import FakeEngine
from tests.server.api.tiny_tokenizer import TinyTokenizer


def test_serve_flags_become_settings_and_engine_kwargs(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# one key a line\n\nc\n b \n")
    args = cli.build_parser().parse_args(
        [
            "serve",
            str(tmp_path),
            "--api-key",
            "a",
            "--api-key",
            "b",
            "--port",
            "9001",
            "--max-num-seqs",
            "8",
            "--state-memory",
            "4GiB",
            "--mc-aggregation",
            "ssc",
            "--mc-top-k",
            "2",
            "--device",
            "cpu",
            "--no-prefix-caching",
            "--checkpoint-memory",
            "0.25",
            "--threads",
            "3",
            "--slow-step-s",
            "2.5",
            "--tensor-parallel-size",
            "2",
            "--async-scheduling",
            "--api-key-file",
            str(key_file),
            "--allowed-origins",
            "https://a.example,https://b.example",
            "--allowed-origins",
            "http://localhost:3000",
            "--log-requests",
        ]
    )
    settings = cli.settings_from_args(args, tmp_path)
    assert (settings.api_keys, settings.port, settings.served_model_name) == (("a", "b", "c"), 9001, tmp_path.name)
    assert settings.allowed_origins == ("https://a.example", "https://b.example", "http://localhost:3000")
    assert settings.log_requests and settings.threads == 3 and settings.slow_step_s == 2.5
    assert cli.engine_kwargs(args, settings) == {
        "max_num_seqs": 8,
        "state_memory": 4 * 2**30,
        "checkpoint_memory": 0.25,
        "mc_aggregation": "ssc",
        "mc_top_k": 2,
        "device": "cpu",
        "enable_prefix_caching": False,
        "served_model_name": tmp_path.name,
        "threads": 3,
        "slow_step_s": 2.5,
        "tensor_parallel_size": 2,
        "async_scheduling": True,
    }


def test_async_scheduling_flags_and_their_default(tmp_path: Path, capsys) -> None:
    """Neither flag: the engine's auto (async with the CUDA runner on a CUDA device); each flag one
    explicit value; both at once refused."""
    parser = cli.build_parser()
    settings = ApiSettings()

    def kwargs(*flags: str) -> dict:
        return cli.engine_kwargs(parser.parse_args(["serve", str(tmp_path), *flags]), settings)

    assert "async_scheduling" not in kwargs()
    assert kwargs("--async-scheduling")["async_scheduling"] is True
    assert kwargs("--no-async-scheduling")["async_scheduling"] is False
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--async-scheduling", "--no-async-scheduling"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-async-scheduling" in text and "default: on where the CUDA runner serves a CUDA device" in text


def test_decode_matmul_flag(tmp_path: Path, capsys) -> None:
    """--decode-matmul reaches the runner options; unset leaves the engine's auto; a bad value refused."""
    from mcserve.server.engine.args import EngineArgs
    from mcserve.server.errors import ConfigError

    parser = cli.build_parser()

    def kwargs(*flags: str) -> dict:
        return cli.engine_kwargs(parser.parse_args(["serve", str(tmp_path), *flags]), ApiSettings())

    assert "decode_matmul" not in kwargs() and EngineArgs().runner_options().decode_matmul == "auto"
    assert kwargs("--decode-matmul", "cublas")["decode_matmul"] == "cublas"
    assert EngineArgs(decode_matmul="cublas").runner_options().decode_matmul == "cublas"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--decode-matmul", "fast"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="decode_matmul"):
        EngineArgs(decode_matmul="fast")


def test_engine_flags_are_engine_args() -> None:
    """Every flag serve passes is a keyword that the engine's EngineArgs accepts."""
    import dataclasses

    from mcserve.server.engine.args import EngineArgs

    accepted = {f.name for f in dataclasses.fields(EngineArgs)}
    assert set(cli.ENGINE_FLAGS) | {"served_model_name"} <= accepted


@pytest.mark.parametrize(
    "text,value",
    [("4GiB", 4 * 2**30), ("512MB", 512 * 10**6), ("1024", 1024), ("0.3", 0.3), ("1.5 GiB", int(1.5 * 2**30))],
)
def test_parse_memory(text: str, value: float) -> None:
    assert cli.parse_memory(text) == value


@pytest.mark.parametrize("text", ["lots", "4XB", "-1GiB", "0GiB"])
def test_parse_memory_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
        cli.parse_memory(text)


def test_init_model_writes_a_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "m"
    assert (
        cli.main(
            [
                "init-model",
                str(out),
                "--preset",
                "tiny",
                "--mc-aggregation",
                "ssc",
                "--top-k",
                "2",
                "--segment-size",
                "32",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["memory_caching"]["aggregation"] == "ssc"
    assert (config["memory_caching"]["top_k"], config["memory_caching"]["segment_size"]) == (2, 32)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_serve_listens_while_loading_then_serves(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    settings = ApiSettings(port=free_port(), served_model_name="tiny", log_level="warning", model_notice="random")
    release = threading.Event()
    servers = []

    def loader(model_dir: Path, kwargs: dict, metrics: object) -> FakeEngine:
        assert kwargs == {"max_num_seqs": 4} and metrics is not None
        release.wait(10)
        return FakeEngine(TinyTokenizer(), model_name="tiny")

    result = []
    thread = threading.Thread(
        target=lambda: result.append(
            asyncio.run(
                cli.serve(
                    tmp_path,
                    {"max_num_seqs": 4},
                    settings,
                    engine_loader=loader,
                    tokenizer_loader=lambda _: TinyTokenizer(),
                    on_ready=servers.append,
                )
            )
        )
    )
    thread.start()
    base = f"http://127.0.0.1:{settings.port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                status = httpx.get(base + "/health").status_code
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not start listening"
                time.sleep(0.02)
        assert status == 503
        assert httpx.post(base + "/v1/completions", json={"prompt": "a"}).status_code == 503
        release.set()
        while not servers:
            assert time.monotonic() < deadline, "model never became ready"
            time.sleep(0.02)
        assert httpx.get(base + "/health").status_code == 200
        r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 2
        assert httpx.get(base + "/v1/models").json()["data"][0]["notice"] == "random"
    finally:
        release.set()
        deadline = time.monotonic() + 10
        while not servers and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        for s in servers:
            s.should_exit = True
        thread.join(10)
    assert result == [0]
    err = capsys.readouterr().err
    assert "NOTE: random" in err and f"OpenAI base URL: http://127.0.0.1:{settings.port}/v1" in err


def test_serve_reports_a_failed_load_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def loader(*_: object) -> None:
        raise ConfigError("max_num_seqs (512) state slots need 9.0 GiB, only 2.0 GiB budgeted")

    settings = ApiSettings(port=free_port(), log_level="warning")
    status = asyncio.run(
        cli.serve(tmp_path, {}, settings, engine_loader=loader, tokenizer_loader=lambda _: TinyTokenizer())
    )
    assert status == 1
    err = capsys.readouterr().err
    assert "could not load" in err and "9.0 GiB" in err
