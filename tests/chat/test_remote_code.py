"""chat, serve and eval on a model that needs its own code: never transformers' [y/N] prompt on
stdin; without --trust-remote-code one line naming the flag; with it (or recorded with the
model) they run, piped input answered."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
from remote_code_checkpoint import make_remote_code_model
from waits import drain, limit, wait_for
from waits import tuneforge as run_tuneforge

from tuneforge.models.load import write_meta
from tuneforge.train.parallel import free_port


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory, bundled_path):
    return make_remote_code_model(tmp_path_factory.mktemp("remote"), bundled_path)


def tuneforge(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return run_tuneforge(*args, input=stdin, seconds=300)


@pytest.mark.parametrize("command", [["chat"], ["serve", "--port", "0"],
                                     ["eval", "identity", "--name", "龙", "--no-compare"]])
def test_without_the_flag_each_command_stops_with_one_line(remote_dir, command):
    at = 1 if command[0] != "eval" else 2
    args = command[:at] + [str(remote_dir)] + command[at:]
    proc = tuneforge(*args, stdin="y\ny\nWho are you?\n")  # a "y" on stdin must not be taken as consent
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--trust-remote-code" in lines[0], proc.stderr
    assert "[y/N]" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_chat_answers_piped_questions_with_the_flag(remote_dir):
    proc = tuneforge("chat", str(remote_dir), "--trust-remote-code", "--max-new-tokens", "5",
                     stdin="你是谁？\nWho are you?\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count(">>> Assistant:") == 2
    assert "[y/N]" not in proc.stdout + proc.stderr


def test_the_flag_recorded_with_a_model_is_used_by_every_command(remote_dir, tmp_path):
    write_meta(remote_dir, trust_remote_code=True)
    try:
        proc = tuneforge("chat", str(remote_dir), "--prompt", "hi", "--max-new-tokens", "4")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.count(">>> Assistant:") == 1
        proc = tuneforge("eval", "identity", str(remote_dir), "--name", "龙", "--name-en", "Long",
                         "--no-compare", "--max-new-tokens", "4", "--json", str(tmp_path / "r.json"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads((tmp_path / "r.json").read_text())
        assert all(result[lang]["identity_n"] >= 30 for lang in ("zh", "en")), result
    finally:
        (remote_dir / "tuneforge_model.json").unlink()


def _health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=limit(5)) as r:
            return r.status == 200
    except OSError:
        return False


def test_serve_runs_a_remote_code_model_with_the_flag(remote_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", str(remote_dir), "--trust-remote-code",
                             "--port", str(port)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _health(port), 240, f"serve to answer /health on port {port}", proc=proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=limit(30)) as r:
            name = json.loads(r.read())["data"][0]["id"]
        body = json.dumps({"model": name, "max_tokens": 4,
                           "messages": [{"role": "user", "content": "Who are you?"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=limit(120)) as r:
            reply = json.loads(r.read())
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=limit(30))
    assert "[y/N]" not in drain(proc)
