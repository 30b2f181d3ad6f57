"""Start `python -m nesso_mlx.server` in a subprocess on a free loopback port, for tests and benchmarks.

`ServerProcess.nesso` starts the server with `--port 0`: it binds a free port itself and prints
which, so two test workers starting servers at once can never race for one port."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


class ServerProcess:
    """A server process; `url` is its base (http://127.0.0.1:PORT), its output goes to `log_path`.

    With `port` 0 the server picks its port and prints it; `wait_ready` reads it from the log."""

    def __init__(self, command: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.log_path = Path(tempfile.mkstemp(prefix="nesso-server-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("the server has not said its port yet: call wait_ready() first")
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def nesso(cls, model: str | Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
        command = [sys.executable, "-m", "nesso_mlx.server", "--model", str(model), "--port", "0", "--log-level", "warning"]
        return cls([*command, *args], 0, env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _find_port(self) -> bool:
        if not self.port and (found := LISTENING.search(self.log())):
            self.port = int(found.group(1))
        return bool(self.port)

    def wait_ready(self, timeout: float = 180.0, path: str = "/health") -> None:
        """Wait until GET `path` answers 200; raises with the server's output if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if not self._find_port():
                time.sleep(0.2)
                continue
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer {path} within {timeout:.0f} s:\n{self.log()[-3000:]}")

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


def post(
    url: str, body: bytes | dict | list | str, headers: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, dict]:
    """POST raw JSON (or bytes as they are); returns (status, parsed JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextlib.contextmanager
def running(*servers: ServerProcess):
    """Wait until every server is ready (they load side by side), and stop them all at the end."""
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def asgi(app, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[int, dict, bytes]:
    """One request straight through an ASGI app: (status, headers, body)."""
    import asyncio

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
    }
    sent, messages = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, b"".join(m.get("body", b"") for m in sent[1:])
