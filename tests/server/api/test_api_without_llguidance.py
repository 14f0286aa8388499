"""Without llguidance installed the server still starts and serves (logprobs with exact bytes
included); a request that needs a grammar is a 400 naming the missing package. Run in a fresh
interpreter where `import llguidance` fails as it does when the package is absent."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[3]
ASK = [{"role": "user", "content": "hello"}]


def _serve_without_llguidance() -> None:
    assert "llguidance" not in sys.modules or sys.modules["llguidance"] is None
    sys.modules["llguidance"] = None  # type: ignore[assignment]  # `import llguidance` -> ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError):
        import llguidance  # noqa: F401

    from tests.server.api.tiny_live import MODEL, client, tiny_server

    with tempfile.TemporaryDirectory() as tmp, tiny_server(Path(tmp) / "model") as base:
        c = client(base)
        r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, logprobs=True, top_logprobs=2,
                                      extra_body={"ignore_eos": True})
        content = r.choices[0].logprobs.content
        assert r.choices[0].finish_reason == "length" and len(content) == 6
        assert b"".join(bytes(t.bytes) for t in content) == r.choices[0].message.content.encode()
        r = c.completions.create(model=MODEL, prompt="héllo", max_tokens=3, echo=True, logprobs=1)
        assert r.choices[0].text.startswith("héllo")
        for kwargs in (
            {"response_format": {"type": "json_object"}},
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
             "tool_choice": "required"},
        ):
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kwargs)
            assert e.value.body["code"] == "structured_outputs_unavailable", e.value.body
            assert "llguidance" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"guided_regex": "[a-z]+"})
        assert e.value.body["param"] == "guided_regex" and "llguidance" in e.value.body["message"]
        # tools without forcing need no grammar: rendered and parsed as usual
        r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
        assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    assert sys.modules["llguidance"] is None, "nothing imported the real package"
    # Every module of the server, clients and kernels imports without it, but the two that use it.
    import importlib

    failed = []
    for path in sorted(p for top in ("server", "clients", "kernels") for p in (ROOT / top).rglob("*.py")):
        name = ".".join(("mcserve", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            failed.append((name, e.name))
    assert sorted(failed) == [("mcserve.server.engine.structured.compiler", "llguidance"),
                              ("mcserve.server.engine.structured.masks", "llguidance")], failed


def test_the_server_serves_without_llguidance() -> None:
    code = ("import tests.server.api.test_api_without_llguidance as t; t._serve_without_llguidance(); "
            "print('served without llguidance')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "served without llguidance" in proc.stdout, proc.stdout + proc.stderr
    assert "llguidance package is not installed" in proc.stderr  # the start-up warning
