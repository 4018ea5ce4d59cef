"""schemathesis from the command line, as a user runs it: `st run URL --checks all` against `relat serve` on a tiny
model, driven by the document the server serves. It may report only the exceptions docs/api.md documents (the
rules no JSON schema can state); anything else is a document that promises too much or a server that breaks it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest

from .conftest import save_tiny
from .server_support import KEY, free_port, wait_for

# The flags of tests/test_openapi.py's SERVED: every generated request takes milliseconds on the tiny model.
SERVE_FLAGS = ["--device", "cpu", "--torch-threads", "1", "--max-concurrency", "2", "--request-timeout", "60",
               "--batch-window", "0", "--max-tokens", "4", "--method", "latent", "--steps", "1", "--latent-steps", "1",
               "--max-steps", "2", "--max-latent-steps", "2", "--max-rank", "4", "--max-agent-tokens", "4",
               "--max-num-steps", "3", "--max-model-len", "48"]
ST_FLAGS = ["--checks", "all", "--max-examples", "10", "--seed", "12", "--workers", "1", "--request-timeout", "60",
            "--suppress-health-check", "too_slow"]


def documented(check: str, status: int, body: dict, error: dict) -> bool:
    """The exceptions of docs/api.md ("What schemathesis still finds"): a schema-valid request refused for a rule no
    JSON schema states, or the 504 of a deadline the request set itself."""
    if check == "not_a_server_error" and status == 504:
        options = body.get("relat") if isinstance(body.get("relat"), dict) else body
        return options.get("timeout") is not None
    if check != "positive_data_acceptance":
        return False
    param = error.get("param") or ""
    if error.get("code") == "context_length_exceeded":  # the prompt, or the prompt and the answer, over the context
        return status in (400, 413)
    return status == 400 and (
        param == "messages"  # the last message must be the user's question (or tool results after one)
        or param in ("response_format", "tools"))  # a JSON schema the grammar backend cannot compile


def failures(report: str) -> list[tuple[str, int, dict, dict]]:
    """Each failed check of an `st run --report ndjson` report: the check, the status, the body sent, the error."""
    found = []
    with open(report) as lines:
        for line in lines:
            finished = json.loads(line).get("ScenarioFinished")
            if not finished:
                continue
            recorder = finished["recorder"]
            for case_id, checks in recorder.get("checks", {}).items():
                for check in checks:
                    if check["status"] == "success":
                        continue
                    interaction = recorder.get("interactions", {}).get(case_id) or {}
                    response = interaction.get("response") or {}
                    sent = (interaction.get("request") or {}).get("body") or {}
                    content = (response.get("content") or {}).get("$base64", "")
                    body = json.loads(base64.b64decode(sent["$base64"])) if "$base64" in sent else {}
                    try:
                        error = json.loads(base64.b64decode(content)).get("error") or {}
                    except (ValueError, AttributeError):
                        error = {}
                    found.append((check["name"], response.get("status_code", 0),
                                  body if isinstance(body, dict) else {}, error))
    return found


# The CLI beside this interpreter (`make test` runs the venv's python without the venv on PATH), else on PATH.
ST = shutil.which("st", path=os.path.dirname(sys.executable)) or shutil.which("st")


@pytest.mark.skipif(ST is None, reason="the schemathesis CLI is not installed")
def test_st_run_finds_only_the_documented_exceptions(tmp_path, tokenizer):
    model = save_tiny(tmp_path / "tiny-qwen3", tokenizer, seed=3)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RELAT_API_KEYS": KEY}
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "relat_server", "serve", "--model", str(model),
                                   "--port", str(port), *SERVE_FLAGS], env=env, stdout=log, stderr=log)
    try:
        def ready() -> bool:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"{url}/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, "relat serve to become ready", limit=300)
        report = tmp_path / "st.ndjson"
        run = subprocess.run([ST, "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {KEY}", *ST_FLAGS,
                              "--report", "ndjson", "--report-ndjson-path", str(report)],
                             capture_output=True, text=True, timeout=500, cwd=tmp_path)
        assert "Tested: 9" in run.stdout, run.stdout + run.stderr  # it reached every operation
        found = failures(str(report))
        assert "FatalError" not in report.read_text(), run.stdout  # an error is not a pass either
        assert run.returncode == 0 or found, run.stdout + run.stderr  # a failed run names its failures
        undocumented = [(check, status, error) for check, status, body, error in found
                        if not documented(check, status, body, error)]
        assert not undocumented, f"{undocumented}\n{run.stdout}"
    finally:
        server.terminate()
        server.wait(60)
