"""The HEALTHCHECK command (utils/ops/healthcheck.py): where it probes, what it says, HEALTH_PORT=0."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from utils.base.exit_codes import HEALTHY, UNHEALTHY
from utils.ops import healthcheck
from utils.ops.healthcheck import bot_process_alive, probe_url, run


@pytest.mark.parametrize(("env", "url"), [
    ({}, "http://127.0.0.1:8080/health"),
    ({"HEALTH_HOST": "0.0.0.0", "HEALTH_PORT": "9000"}, "http://127.0.0.1:9000/health"),
    ({"HEALTH_HOST": "::", "HEALTH_PORT": "9000"}, "http://[::1]:9000/health"),
    ({"HEALTH_HOST": "10.0.0.5"}, "http://10.0.0.5:8080/health"),
    ({"HEALTH_HOST": "fd00::5"}, "http://[fd00::5]:8080/health"),
    ({"HEALTH_HOST": "bot.internal", "HEALTH_PORT": " 81 "}, "http://bot.internal:81/health"),
    ({"HEALTH_PORT": ""}, "http://127.0.0.1:8080/health"),
    ({"HEALTH_PORT": "0"}, None),
])
def test_probe_url_follows_health_host_and_port(env: dict[str, str], url: str | None) -> None:
    assert probe_url(env, "/health") == url


@pytest.mark.parametrize("port", ["x", "-1", "65536"])
def test_a_port_the_bot_would_refuse_is_unhealthy(port: str) -> None:
    code, message = run([], {"HEALTH_PORT": port})
    assert code == UNHEALTHY and "HEALTH_PORT" in message


def test_usage() -> None:
    assert run(["health"], {})[0] == UNHEALTHY
    assert run(["/health", "/ready"], {})[0] == UNHEALTHY


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = {"/health": (200, {"mode": "passive", "epoch": 0}),
                        "/ready": (503, {"ready": False})}.get(self.path, (404, {}))
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield int(httpd.server_address[1])
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def test_endpoint_answers(server: int) -> None:
    env = {"HEALTH_HOST": "0.0.0.0", "HEALTH_PORT": str(server)}
    assert run([], env) == (HEALTHY, f"healthy: http://127.0.0.1:{server}/health mode=passive epoch=0")
    code, message = run(["/ready"], env)
    assert code == UNHEALTHY and "answered 503" in message


def test_nothing_listening_is_unhealthy(server: int) -> None:
    code, message = run([], {"HEALTH_PORT": "1"})
    assert code == UNHEALTHY and "127.0.0.1:1/health" in message


def fake_proc(root: Path, processes: dict[int, tuple[list[str], str]]) -> Path:
    for pid, (argv, state) in processes.items():
        entry = root / str(pid)
        entry.mkdir(parents=True)
        (entry / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (entry / "stat").write_text(f"{pid} (python (x)) {state} 1 1 1")
    (root / "self").mkdir()
    return root


def test_health_port_0_checks_that_the_bot_lives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = fake_proc(tmp_path / "a", {1: (["catatonit", "--", "python", "main.py"], "S"),
                                      6: (["python", "main.py"], "S"),
                                      9: (["python", "-m", "utils.ops.healthcheck"], "R")})
    assert bot_process_alive(proc, own_pid=9) == 6
    monkeypatch.setattr(healthcheck, "PROC", proc)
    code, message = run([], {"HEALTH_PORT": "0"})
    assert code == HEALTHY and "liveness only" in message and "pid 6" in message


def test_health_port_0_a_dead_bot_is_unhealthy(tmp_path: Path) -> None:
    zombie = fake_proc(tmp_path / "z", {1: (["python", "main.py"], "Z")})
    assert bot_process_alive(zombie, own_pid=9) is None
    other = fake_proc(tmp_path / "o", {1: (["python", "other.py"], "S")})
    assert bot_process_alive(other, own_pid=9) is None

