"""MCP (Model Context Protocol) tool servers as tools for the agent loop, with the `mcp` SDK.

`MCPTools` starts stdio servers (a command line) and connects to streamable-HTTP ones (a URL),
lists their tools (following pagination and `notifications/tools/list_changed`) and calls them.
The SDK is asynchronous; `MCPTools` runs it on an event loop in a background thread, so scripts
and the REPL use it synchronously:

    with MCPTools([MCPServerSpec.from_command("python server.py")]) as tools:
        session = ChatSession(model, tokenizer, tools=tools.schemas())
        for event in agent_turn(session, "...", tools):
            ...

`MCPTools` is a read-only mapping from tool name to a callable (the form `agent_turn` takes for
Python functions). A call that fails in any way (the server reports an error, dies, hangs past
the timeout, or answers something malformed) raises `ToolError`, whose message goes to the model
as the result; the user gets a one-line notice in `notices`. Nothing here raises past a call.

Servers get only the environment variables their config names (over the SDK's small default set:
HOME, PATH, USER, ...), never the rest of the user's environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shlex
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .errors import NessoError, ToolError

START_TIMEOUT = 120.0  # seconds for a server to start and list its tools (npx may download it first)


@dataclass
class MCPServerSpec:
    """How to reach one MCP server: a command (stdio) or a URL (streamable HTTP)."""

    name: str | None = None  # None: the name the server gives itself
    command: str | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_command(cls, line: str, name: str | None = None) -> MCPServerSpec:
        """A stdio server from a shell-style command line, e.g. "npx -y @scope/server DIR"."""
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise NessoError(f"--mcp {line!r}: cannot be split into words ({e})") from None
        if not words or not words[0]:
            raise NessoError('--mcp needs a command, e.g. --mcp "python server.py"')
        return cls(name=name, command=words[0], args=[str(Path(w).expanduser()) if w.startswith("~") else w for w in words[1:]])

    @classmethod
    def from_url(cls, url: str, name: str | None = None, headers: dict[str, str] | None = None) -> MCPServerSpec:
        """A streamable-HTTP server at `url` (http:// or https://)."""
        if not re.match(r"https?://[^/\s]+", url):
            raise NessoError(f"--mcp-url {url!r}: not an http:// or https:// URL")
        return cls(name=name, url=url, headers=dict(headers or {}))

    @property
    def label(self) -> str:
        """The server as the user gave it (for messages)."""
        return self.url or shlex.join([self.command or "", *self.args])


@contextlib.asynccontextmanager
async def _http_transport(url: str, headers: dict[str, str]) -> Any:
    """The SDK's streamable-HTTP transport; with `headers`, over an HTTP client of ours (the SDK
    leaves a client it is given open, so this closes it)."""
    from mcp.client.streamable_http import streamable_http_client

    if not headers:
        async with streamable_http_client(url) as streams:
            yield streams
        return
    from mcp.shared._httpx_utils import create_mcp_http_client  # the SDK's own defaults (timeouts, redirects)

    async with create_mcp_http_client(headers=headers) as client, streamable_http_client(url, http_client=client) as streams:
        yield streams


def read_mcp_config(path: str | Path) -> list[MCPServerSpec]:
    """The servers of a config file in Claude Desktop's format (also LM Studio's):
    `{"mcpServers": {"name": {"command": ..., "args": [...], "env": {...}} | {"url": ..., "headers": {...}}}}`."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NessoError(f"{path}: MCP config file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise NessoError(f"{path}: not a valid JSON MCP config ({e})") from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise NessoError(
            f'{path}: an MCP config needs an "mcpServers" object: {{"mcpServers": {{NAME: {{"command": ..., "args": [...]}}}}}}'
        )
    specs = []
    for name, entry in servers.items():
        where = f"{path}: server {name!r}"
        if not isinstance(entry, dict):
            raise NessoError(f"{where}: must be an object with a command or a url")
        if entry.get("disabled") is True:
            continue
        env, headers, args = entry.get("env", {}), entry.get("headers", {}), entry.get("args", [])
        if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
            raise NessoError(f'{where}: "env" must map names to strings')
        if not (isinstance(headers, dict) and all(isinstance(v, str) for v in headers.values())):
            raise NessoError(f'{where}: "headers" must map names to strings')
        if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
            raise NessoError(f'{where}: "args" must be a list of strings')
        if isinstance(entry.get("command"), str) and entry["command"]:
            cwd = entry.get("cwd")
            specs.append(MCPServerSpec(name=name, command=entry["command"], args=args, env=env, cwd=cwd))
        elif isinstance(entry.get("url"), str):
            spec = MCPServerSpec.from_url(entry["url"], name, headers)
            specs.append(spec)
        else:
            raise NessoError(f'{where}: needs "command" (a stdio server) or "url" (a streamable-HTTP server)')
    return specs


# --- results -------------------------------------------------------------------------------


def result_text(result: Any) -> tuple[str, bool]:
    """An MCP `CallToolResult` as text for the model, and whether it is an error.

    Text content is passed as is; embedded text resources give their text; other content (images,
    audio, binary resources, links) is described in one line each.
    """
    from mcp import types

    parts = []
    for item in result.content:
        if isinstance(item, types.TextContent):
            parts.append(item.text)
        elif isinstance(item, types.ImageContent | types.AudioContent):
            kind = "image" if isinstance(item, types.ImageContent) else "audio"
            parts.append(f"[{kind}: {item.mime_type}, {len(item.data) * 3 // 4} bytes, not shown]")
        elif isinstance(item, types.EmbeddedResource):
            resource = item.resource
            if isinstance(resource, types.TextResourceContents):
                parts.append(resource.text)
            else:
                parts.append(f"[resource {resource.uri}: {resource.mime_type or 'binary'}, not shown]")
        elif isinstance(item, types.ResourceLink):
            parts.append(f"[resource link: {item.uri}" + (f" ({item.description})]" if item.description else "]"))
        else:
            parts.append(f"[{getattr(item, 'type', type(item).__name__)} content, not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts), bool(result.is_error)


def compact_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """An input schema without its `title`s (pydantic's restatements of names): fewer tokens."""
    if isinstance(schema, dict):
        return {k: compact_schema(v) for k, v in schema.items() if not (k == "title" and isinstance(v, str))}
    if isinstance(schema, list):
        return [compact_schema(v) for v in schema]
    return schema


# --- servers -------------------------------------------------------------------------------


@dataclass
class MCPTool:
    """One tool of one server, under the name the model sees."""

    name: str
    server: str
    remote_name: str
    schema: dict[str, Any]  # {"type": "function", "function": {...}} as the chat template takes it


class _Server:
    """One connected server: its session lives in a task on the background loop."""

    def __init__(self, spec: MCPServerSpec) -> None:
        self.spec = spec
        self.name = spec.name or ""
        self.session: Any = None
        self.ready: asyncio.Event | None = None
        self.stop: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.error: str | None = None  # why it is down
        self.tools: list[Any] = []
        self.changed = False  # the server said its tool list changed
        self.errlog = tempfile.TemporaryFile("a+", encoding="utf-8", errors="replace")  # the server's stderr

    def stderr_tail(self) -> str:
        """The last line the server wrote on stderr (for error messages)."""
        try:
            self.errlog.flush()
            self.errlog.seek(0)
            lines = [line.strip() for line in self.errlog.read()[-4000:].splitlines() if line.strip()]
            self.errlog.seek(0, 2)
        except (OSError, ValueError):
            return ""
        return lines[-1][:200] if lines else ""


class MCPTools(Mapping[str, Callable[..., str]]):
    """The tools of some MCP servers, callable synchronously; a context manager for their lifetime.

    `timeout`: seconds a call may take before its server is considered hung (the model gets an
    error result). `reserved`: names already taken (e.g. Python tools); clashing tools are
    prefixed with their server's name, as are tools two servers both have.
    """

    def __init__(self, servers: Sequence[MCPServerSpec], timeout: float = 60.0, reserved: Sequence[str] = ()) -> None:
        self.specs = list(servers)
        self.timeout = timeout
        self.reserved = set(reserved)
        self.tools: dict[str, MCPTool] = {}
        self.notices: list[str] = []  # one-line notices for the user (a server died, hung, ...)
        self.version = 0  # bumped whenever `tools` changes
        self._servers: list[_Server] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- lifetime ----------------------------------------------------------------------------

    def __enter__(self) -> MCPTools:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        """Start (or connect to) every server and list its tools; NessoError, in one line, naming
        the server that failed (the others are stopped again)."""
        if self._loop is not None:
            raise RuntimeError("the MCP servers are already running")
        sdk_log = logging.getLogger("mcp")
        if not sdk_log.handlers:  # unless logging is set up, the SDK's warnings would garble the terminal
            sdk_log.addHandler(logging.NullHandler())
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nesso-mcp", daemon=True)
        self._thread.start()
        try:
            self._servers = [_Server(spec) for spec in self.specs]
            self._run(self._start_all(), START_TIMEOUT + 5)
            for server in self._servers:
                if server.error is not None:
                    raise NessoError(f"MCP server {server.spec.label!r} {server.error}")
            self._name_servers()
            self._refresh()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop every server (stdio servers are asked to exit, then killed) and the loop.

        A Ctrl-C while the servers close (it can take seconds) is not swallowed: their tasks are
        cancelled at once (their clean-up ends the processes), the loop stops, and the
        KeyboardInterrupt goes on to the caller."""
        if self._loop is None:
            return
        loop, self._loop = self._loop, None
        interrupted: KeyboardInterrupt | None = None
        try:
            future = asyncio.run_coroutine_threadsafe(self._stop_all(), loop)
            future.result(timeout=20)
        except KeyboardInterrupt as e:
            interrupted = e
            with contextlib.suppress(BaseException):  # a third Ctrl-C: the loop is stopped below anyway
                asyncio.run_coroutine_threadsafe(self._cancel_all(), loop).result(timeout=5)
        except Exception:  # noqa: S110 - closing: best effort, then the loop stops anyway
            pass
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not loop.is_running():
            loop.close()
        for server in self._servers:
            server.errlog.close()
        if interrupted is not None:
            raise interrupted

    def _run(self, coroutine: Any, timeout: float) -> Any:
        """Run `coroutine` on the background loop and wait for it; on any interruption
        (timeout, Ctrl-C) it is cancelled there."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout=timeout)
        except BaseException:
            future.cancel()
            raise

    async def _start_all(self) -> None:
        await asyncio.gather(*(self._start(server) for server in self._servers))

    async def _start(self, server: _Server) -> None:
        server.ready, server.stop = asyncio.Event(), asyncio.Event()
        server.task = asyncio.create_task(self._serve(server))
        done = asyncio.create_task(server.ready.wait())
        try:
            await asyncio.wait([done, server.task], timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
        if server.error is None and not server.ready.is_set():
            server.error = f"did not start within {START_TIMEOUT:.0f} s"
            server.stop.set()
            server.task.cancel()

    async def _serve(self, server: _Server) -> None:
        """Connect, initialize, list the tools, then hold the connection open until `stop`."""
        from mcp.client.session import ClientSession

        async def on_message(message: Any) -> None:
            from mcp import types

            if isinstance(message, types.ToolListChangedNotification):
                server.changed = True

        try:
            async with self._transport(server) as (read, write):
                async with ClientSession(read, write, message_handler=on_message) as session:
                    info = await session.initialize()
                    server.name = server.name or _clean_name(info.server_info.name) or "mcp"
                    server.session = session
                    server.tools = await self._list(session)
                    server.ready.set()
                    await server.stop.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - any failure of a server is reported, not raised
            tail = server.stderr_tail()
            reason = _describe(e)
            server.error = (
                f"failed to start ({reason})" + (f"; it said: {tail}" if tail else "")
                if not server.ready.is_set()
                else f"stopped ({reason})"
            )
        finally:
            server.session = None

    def _transport(self, server: _Server) -> Any:
        spec = server.spec
        if spec.url is not None:
            return _http_transport(spec.url, spec.headers)
        from mcp.client.stdio import StdioServerParameters, stdio_client

        params = StdioServerParameters(command=spec.command, args=spec.args, env=spec.env or None, cwd=spec.cwd)
        return stdio_client(params, errlog=server.errlog)

    @staticmethod
    async def _list(session: Any) -> list[Any]:
        """Every tool of a server, page after page."""
        from mcp import types

        tools, cursor, pages = [], None, 0
        while True:
            page = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
            tools.extend(page.tools)
            cursor, pages = page.next_cursor, pages + 1
            if not cursor or pages >= 1000:
                return tools

    async def _stop_all(self) -> None:
        """Ask every server's task to close its session; cancel those still starting (they do not
        wait for `stop`) or slow to close, and let their clean-up (which ends the process) run."""
        for server in self._servers:
            if server.stop is not None:
                server.stop.set()
            if server.task is not None and server.ready is not None and not server.ready.is_set():
                server.task.cancel()
        tasks = [s.task for s in self._servers if s.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=8)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=8)

    async def _cancel_all(self) -> None:
        """Cancel every server's task and give their clean-up (which ends the process) a moment."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]  # the loop is ours alone
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=4)

    # --- tools -------------------------------------------------------------------------------

    def _name_servers(self) -> None:
        seen: dict[str, int] = {}
        for server in self._servers:
            base = server.name
            seen[base] = seen.get(base, 0) + 1
            if seen[base] > 1:
                server.name = f"{base}{seen[base]}"

    def _refresh(self) -> None:
        """Rebuild `tools` from the servers' lists; a name two servers share (or a reserved one)
        gets its server's name as a prefix."""
        counts: dict[str, int] = {}
        for server in self._servers:
            for tool in server.tools:
                counts[tool.name] = counts.get(tool.name, 0) + 1
        tools = {}
        for server in self._servers:
            for tool in server.tools:
                clash = counts[tool.name] > 1 or tool.name in self.reserved
                name = f"{server.name}_{tool.name}" if clash else tool.name
                function = {"name": name, "description": (tool.description or tool.title or "").strip()}
                function["parameters"] = compact_schema(tool.input_schema or {"type": "object", "properties": {}})
                tools[name] = MCPTool(name, server.name, tool.name, {"type": "function", "function": function})
        if {n: t.schema for n, t in tools.items()} != {n: t.schema for n, t in self.tools.items()}:
            self.tools = tools
            self.version += 1

    def update(self) -> bool:
        """List again the tools of servers that said their list changed; True if `tools` changed."""
        changed = [s for s in self._servers if s.changed and s.session is not None]
        if not changed or self._loop is None:
            return False
        before = self.version
        for server in changed:
            server.changed = False
            try:
                server.tools = self._run(self._list(server.session), self.timeout)
            except Exception as e:  # noqa: BLE001 - the old list stays
                self.notices.append(f"MCP server {server.name}: cannot list its tools again ({_describe(e)})")
        self._refresh()
        return self.version != before

    def _running(self) -> None:
        """Raise unless the servers were started: before that the mapping would look empty, and
        every call would be answered "there is no tool named ..." without a word to the user."""
        if self._loop is None:
            raise RuntimeError("the MCP servers are not running: use `with mcp_tools(...) as tools:` (or call start())")

    def schemas(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The tools' schemas for the chat template (those in `names`, if given)."""
        self._running()
        return [t.schema for n, t in self.tools.items() if names is None or n in names]

    def __getitem__(self, name: str) -> Callable[..., str]:
        self._running()
        if name not in self.tools:
            raise KeyError(name)
        return lambda **arguments: self.call(name, arguments)

    def __iter__(self) -> Iterator[str]:
        self._running()
        return iter(self.tools)

    def __len__(self) -> int:
        self._running()
        return len(self.tools)

    def call(self, name: str, arguments: dict[str, Any]) -> str:
        """Call a tool; returns its text. Raises `ToolError` (with the text for the model) when the
        tool reports an error or its server is dead, hung or answers something malformed; the
        latter three also leave a one-line notice in `notices`."""
        tool = self.tools[name]
        server = next(s for s in self._servers if s.name == tool.server)
        if server.session is None or self._loop is None:
            why = server.error or "stopped"
            raise ToolError(f"the MCP server {server.name!r} is not running ({why})")
        start = time.monotonic()
        request = server.session.call_tool(tool.remote_name, arguments, read_timeout_seconds=self.timeout)
        try:
            result = self._run(request, self.timeout + 1)
        except Exception as e:
            if not isinstance(e, FutureTimeout | TimeoutError) and time.monotonic() - start < self.timeout:
                self._failed(server, name, e)
            self.notices.append(f"MCP tool {name} did not answer within {self.timeout:g} s (--mcp-timeout); the model was told")
            raise ToolError(f"the tool did not answer within {self.timeout:g} s") from None
        if not hasattr(result, "content"):
            self.notices.append(f"MCP tool {name} returned a malformed result")
            raise ToolError("the server returned a malformed result")
        text, is_error = result_text(result)
        if is_error:
            raise ToolError(text or "the tool reported an error")
        return text

    def _failed(self, server: _Server, name: str, e: Exception) -> NoReturn:
        """A call failed (not a timeout): a dead or misbehaving server. Notice, then ToolError."""
        reason = _describe(e)
        if type(e).__name__ == "ValidationError":  # pydantic's: the answer is no CallToolResult
            reason = f"the server returned a malformed result ({reason[:120]})"
        elif not self._responds(server):
            server.session, server.error = None, f"stopped ({reason})"
            tail = server.stderr_tail()
            reason = f"the server stopped ({reason})" + (f"; it said: {tail}" if tail else "")
        self.notices.append(f"MCP tool {name} failed: {reason}")
        raise ToolError(reason) from None

    def _responds(self, server: _Server) -> bool:
        """Whether the server still answers a ping (within a few seconds)."""
        if server.session is None or server.task is None or server.task.done():
            return False
        try:
            self._run(server.session.send_ping(), min(self.timeout, 5.0))
        except Exception:  # noqa: BLE001 - any failure means it does not
            return False
        return True

    @property
    def servers(self) -> list[str]:
        return [s.name for s in self._servers]


def _clean_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:40]


def _describe(e: BaseException) -> str:
    """An exception in one short line (an ExceptionGroup: its first leaf)."""
    while isinstance(getattr(e, "exceptions", None), tuple) and e.exceptions:  # an ExceptionGroup
        e = e.exceptions[0]
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


__all__ = ["MCPServerSpec", "MCPTool", "MCPTools", "compact_schema", "read_mcp_config", "result_text"]
