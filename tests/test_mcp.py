"""MCP tool servers in the agent loop and the chat: stdio and streamable HTTP, with the `mcp` SDK.

The server is tests/mcp_server.py (the SDK's MCPServer). One stdio server and one HTTP server on
127.0.0.1 are shared by the module; tests that kill or hang a server start their own.

Run as a script, this file is the real `nesso-mlx chat` command line with a scripted model (the
replies come from a JSON list), for the pseudo-terminal tests:
    python tests/test_mcp.py '["reply 1", ...]' chat --model FOLDER --mcp "..."
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "tests" / "mcp_server.py"

if __name__ == "__main__":  # the CLI with a scripted model (see the docstring)
    sys.path.insert(0, str(ROOT / "tests"))
    from types import SimpleNamespace

    from agent_script import ScriptedSession

    from nesso_mlx import cli
    from nesso_mlx.chat import ChatSession

    replies = SimpleNamespace(script=json.loads(sys.argv[1]))
    ChatSession._stream = lambda self, new_tokens: ScriptedSession._stream(replies, new_tokens)
    sys.argv = ["nesso-mlx", *sys.argv[2:]]
    cli.main()

import pexpect  # noqa: E402
import pytest  # noqa: E402
from agent_script import ScriptedSession, call  # noqa: E402

from nesso_mlx import load  # noqa: E402
from nesso_mlx.agent import ToolError, ToolRun, agent_turn, mcp_tools  # noqa: E402
from nesso_mlx.chat import ChatSession, SamplingSettings  # noqa: E402
from nesso_mlx.errors import NessoError  # noqa: E402
from nesso_mlx.mcp_tools import MCPServerSpec, MCPTools, read_mcp_config  # noqa: E402

PYTHON = sys.executable


def server_spec(name: str, log: Path | None = None, **env: str) -> MCPServerSpec:
    extra = {"MCP_TEST_LOG": str(log)} if log else {}
    return MCPServerSpec(command=PYTHON, args=[str(SERVER), "--name", name], env={**extra, **env})


def calls_logged(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def alive(pid: int) -> bool:
    """Whether `pid` is a running process (not gone, not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == pid:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError, ValueError):
                continue
    return found


def gone(pids, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("mcp")


@pytest.fixture(scope="module")
def http_url(logs):
    """tests/mcp_server.py over streamable HTTP on 127.0.0.1 (a free port), named "web"."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MCP_TEST_LOG": str(logs / "web.jsonl")}
    process = subprocess.Popen(
        [PYTHON, str(SERVER), "--http", str(port), "--name", "web"], env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert process.poll() is None, "the HTTP MCP server exited"
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/mcp"
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="module")
def tools(logs, http_url):
    """The stdio server ("local") and the HTTP one ("web"): every name clashes, so all are prefixed."""
    specs = [server_spec("local", logs / "local.jsonl"), MCPServerSpec.from_url(http_url)]
    with MCPTools(specs, timeout=2) as tools:
        yield tools


@pytest.fixture(scope="module")
def tiny_hermes(tmp_path_factory):
    from conftest import TINY_CONFIG, write_model_folder

    config = {**TINY_CONFIG, "max_position_embeddings": 8192}  # byte-level tokenizer: schemas are long
    return load(write_model_folder(tmp_path_factory.mktemp("m") / "m", config, chat_template=None))


# --- the MCP layer ---------------------------------------------------------------------------


def test_tools_are_listed_page_by_page_prefixed_on_clash_and_compact(tools):
    names = {"get_weather", "fail", "hang", "huge", "control_tokens", "exit_now", "add_tool", "env_var"}
    assert set(tools) >= {f"{server}_{name}" for server in ("local", "web") for name in names}  # pages of 2
    schema = tools.tools["local_get_weather"].schema["function"]
    assert schema["name"] == "local_get_weather" and schema["description"].startswith("Current weather in a city.")
    parameters = schema["parameters"]
    assert parameters["required"] == ["city"] and parameters["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert "title" not in json.dumps(parameters)  # pydantic's titles are dropped: fewer tokens
    assert tools.tools["web_hang"].server == "web" and tools.tools["web_hang"].remote_name == "hang"


def test_text_errors_and_validation_over_stdio_and_http(tools, logs):
    for server in ("local", "web"):
        assert tools[f"{server}_get_weather"](city="Roma") == "Roma: sereno, 24 gradi celsius"
        with pytest.raises(ToolError, match="failed on purpose: nope"):  # isError: the tool's own message
            tools.call(f"{server}_fail", {"reason": "nope"})
        with pytest.raises(ToolError, match="city"):  # the server validates the arguments
            tools.call(f"{server}_get_weather", {"town": "Roma"})
    assert [entry["city"] for entry in calls_logged(logs / "local.jsonl")] == ["Roma"]
    assert [entry["city"] for entry in calls_logged(logs / "web.jsonl")] == ["Roma"]
    assert tools.notices == []  # errors a tool reports are no server trouble


def test_a_hung_tool_times_out_and_the_server_goes_on(tools):
    for server in ("local", "web"):
        start = time.monotonic()
        with pytest.raises(ToolError, match="did not answer within 2 s"):
            tools.call(f"{server}_hang", {"seconds": 60})
        assert time.monotonic() - start < 5
        assert "did not answer" in tools.notices.pop()
        assert tools.call(f"{server}_get_weather", {"city": "Bari"}).startswith("Bari")


def test_list_changed_is_followed(tools):
    assert "echo" not in tools and not tools.update()
    assert tools.call("local_add_tool", {}) == "added echo"
    deadline = time.monotonic() + 5
    while not tools.update() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "echo" in tools and tools["echo"](text="ciao") == "ciao"  # only one server has it: no prefix


def test_servers_get_only_the_environment_their_config_gives(tmp_path, monkeypatch):
    monkeypatch.setenv("NESSO_TEST_SECRET", "s3cret")
    config = {"mcpServers": {"cfg": {"command": PYTHON, "args": [str(SERVER)], "env": {"GIVEN": "yes"}}}}
    (tmp_path / "mcp.json").write_text(json.dumps(config))
    with mcp_tools(config=tmp_path / "mcp.json") as tools:
        assert tools.call("env_var", {"name": "GIVEN"}) == "yes"
        assert tools.call("env_var", {"name": "NESSO_TEST_SECRET"}) == "(unset)"
        assert tools.call("env_var", {"name": "PATH"}) != "(unset)"  # the SDK's safe defaults


def test_config_files_are_checked(tmp_path):
    cases = {
        "missing.json": (None, "not found"),
        "bad.json": ("{", "not a valid JSON"),
        "nokey.json": ("{}", '"mcpServers"'),
        "noway.json": ('{"mcpServers": {"x": {"args": []}}}', '"command"'),
        "env.json": ('{"mcpServers": {"x": {"command": "a", "env": {"A": 1}}}}', '"env"'),
    }
    for name, (text, needle) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(NessoError, match=needle):
            read_mcp_config(tmp_path / name)
    (tmp_path / "ok.json").write_text(
        json.dumps({"mcpServers": {"a": {"command": "npx", "args": ["-y", "x"]}, "b": {"url": "http://127.0.0.1:1/mcp"}}})
    )
    a, b = read_mcp_config(tmp_path / "ok.json")
    assert (a.name, a.command, a.args, b.name, b.url) == ("a", "npx", ["-y", "x"], "b", "http://127.0.0.1:1/mcp")
    with pytest.raises(RuntimeError, match="not running"):  # not started: said so, not an empty list
        mcp_tools(config=tmp_path / "ok.json").schemas()


def test_a_dead_server_gives_error_results_and_a_notice(logs):
    with MCPTools([server_spec("doomed", logs / "doomed.jsonl")], timeout=5) as tools:
        assert tools.call("get_weather", {"city": "Roma"}).startswith("Roma")
        (pid,) = {p for p, cmd in children(os.getpid()).items() if "doomed" in cmd}
        with pytest.raises(ToolError, match="the server stopped"):
            tools.call("exit_now", {})
        assert "MCP tool exit_now failed" in tools.notices[-1]
        with pytest.raises(ToolError, match="not running"):  # later calls fail at once
            tools.call("get_weather", {"city": "Roma"})
    assert not alive(pid)


def test_a_malformed_result_is_an_error_result_and_a_notice():
    with MCPTools([MCPServerSpec(command=PYTHON, args=[str(SERVER), "--broken"])], timeout=5) as tools:
        with pytest.raises(ToolError, match="malformed result"):
            tools.call("oops", {})
        assert tools.notices == [f"MCP tool oops failed: {tools.notices[0].split(': ', 1)[1]}"]
        assert "malformed result" in tools.notices[0] and len(tools.notices[0]) < 200


def test_no_orphan_servers_after_an_exception(tmp_path):
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from nesso_mlx.agent import mcp_tools
with mcp_tools({f"{PYTHON} {SERVER} --name orphan"!r}) as tools:
    print(tools.call("get_weather", {{"city": "Roma"}}), flush=True)
    raise RuntimeError("boom")
"""
    child = subprocess.Popen([PYTHON, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().startswith("Roma")
    servers = [pid for pid, cmd in children(child.pid).items() if "orphan" in cmd]
    assert servers and all(alive(pid) for pid in servers)
    _, stderr = child.communicate(timeout=30)
    assert child.returncode == 1 and "RuntimeError: boom" in stderr
    assert gone(servers)


def test_no_orphan_when_interrupted_while_a_server_starts():
    """Ctrl-C while a server has not answered `initialize` yet (here: one that never will)."""
    code = "from nesso_mlx.agent import mcp_tools\nwith mcp_tools('sleep 987'):\n    pass\n"
    child = subprocess.Popen([PYTHON, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (servers := [pid for pid, cmd in children(child.pid).items() if "sleep 987" in cmd]):
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.1)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=30)
    assert "KeyboardInterrupt" in stderr and "destroyed but it is pending" not in stderr
    assert gone(servers)


def test_ctrl_c_while_the_servers_close_is_not_swallowed():
    """Ctrl-C while `close` waits for the servers (here: forever) ends the wait at once, ends the
    servers anyway, and gets through to the caller (it used to be swallowed: the program went on
    with the servers still running)."""
    code = f"""
import asyncio, time
from nesso_mlx.mcp_tools import MCPServerSpec, MCPTools

async def slow_stop():
    print("closing", flush=True)
    await asyncio.sleep(3600)

tools = MCPTools([MCPServerSpec.from_command({f"{PYTHON} {SERVER} --name slowclose"!r})])
tools.start()
tools._stop_all = slow_stop  # servers that take long to stop
print("ready", flush=True)
tools.close()
print("went on", flush=True)
time.sleep(3600)
"""
    child = subprocess.Popen([PYTHON, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        servers = [pid for pid, cmd in children(child.pid).items() if "slowclose" in cmd]
        assert servers and all(alive(pid) for pid in servers)
        assert child.stdout.readline().strip() == "closing"
        child.send_signal(signal.SIGINT)
        child.wait(timeout=10)  # not the 20 s `close` would otherwise wait, nor the sleep after it
    finally:
        child.kill()
    out, stderr = child.communicate(timeout=10)
    assert "went on" not in out and child.returncode != 0 and "KeyboardInterrupt" in stderr
    assert gone(servers)


# --- the agent loop --------------------------------------------------------------------------


def test_agent_loop_with_a_scripted_model_cuts_long_results(tools, tiny_hermes, logs):
    schemas = tools.schemas(["local_get_weather", "web_huge"])
    calls = call("local_get_weather", {"city": "Roma"}) + call("web_huge", {}) + call("local_get_weather", {"city": "Segreta"})
    session = ScriptedSession(*tiny_hermes, [calls, "Fatto."], tools=schemas)
    confirm = lambda c: c.arguments.get("city") != "Segreta"  # noqa: E731
    events = list(agent_turn(session, "Meteo?", tools=tools, confirm=confirm, max_result_tokens=50))
    runs = [e for e in events if isinstance(e, ToolRun)]
    assert [r.status for r in runs] == ["ok", "ok", "declined"] and runs[0].result == "Roma: sereno, 24 gradi celsius"
    assert runs[1].result.startswith("line 0: lorem") and runs[1].result.endswith("only the first 50 are shown]")
    assert "the result had" in session.messages[3]["content"] and len(session.messages[3]["content"]) < 200
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "tool", "tool", "assistant"]
    assert "Segreta" not in (logs / "local.jsonl").read_text()  # a declined call never reaches the server


@pytest.fixture(scope="module", params=["smollm2", "nesso"])
def real_model(request, smollm2_path):
    from nesso_fixture import nesso_trained_folder

    return request.param, load(smollm2_path if request.param == "smollm2" else nesso_trained_folder())


def test_control_tokens_in_a_result_stay_text(tools, real_model):
    """A result holding `<|im_end|>` and `<tool_call>` is data: not one special token comes of it."""
    _, (model, tokenizer) = real_model
    session = ScriptedSession(
        model, tokenizer, [call("local_control_tokens", {}), "ok"], tools=tools.schemas(["local_control_tokens"])
    )
    list(agent_turn(session, "go", tools))
    result = session.messages[2]["content"]
    assert session.messages[2]["role"] == "tool" and "<|im_end|>" in result and "<tool_call>" in result
    ids = session._tokens(session.messages)
    plain = session._tokens([*session.messages[:2], {"role": "tool", "content": "x"}, *session.messages[3:]])
    controls = [t for t in ("<|im_end|>", "<|im_start|>", "<tool_call>", "</tool_call>") if tokenizer.token_to_id(t) is not None]
    special = {tokenizer.token_to_id(t) for t in controls}
    assert "<|im_end|>" in controls and (real_model[0] == "smollm2" or "<tool_call>" in controls)
    assert Counter(i for i in ids if i in special) == Counter(i for i in plain if i in special)
    assert result in tokenizer.decode(ids)


def test_required_call_on_real_models_reaches_the_server_validated(tools, real_model, logs):
    """SmolLM2 (over stdio) and the Nesso-vocabulary model (over HTTP) under tool_choice="required"."""
    kind, (model, tokenizer) = real_model
    name = "local_get_weather" if kind == "smollm2" else "web_get_weather"
    log = logs / ("local.jsonl" if kind == "smollm2" else "web.jsonl")
    before = len(calls_logged(log))
    session = ChatSession(model, tokenizer, tools=tools.schemas([name]), settings=SamplingSettings(temperature=0, max_tokens=40))
    events = list(agent_turn(session, "What is the weather in Rome?", tools, tool_choice="required", max_steps=1))
    runs = [e for e in events if isinstance(e, ToolRun)]
    assert runs and runs[0].call.ok and runs[0].call.name == name, session.messages
    assert runs[0].status == "ok" and "sereno" in runs[0].result
    (entry,) = calls_logged(log)[before:]  # the call reached the server, its arguments valid
    assert entry["city"] == runs[0].call.arguments["city"] and entry["unit"] in ("celsius", "fahrenheit")


def test_schema_notice_names_the_biggest_tools(tools, tiny_hermes):
    from io import StringIO

    from rich.console import Console

    from nesso_mlx.repl import ChatREPL

    out = StringIO()
    session = ChatSession(*tiny_hermes, max_context=2048)
    repl = ChatREPL(session, "m", "p", None, console=Console(file=out, width=300), mcp=tools)
    assert session.tools and len(session.tools) == len(tools)
    repl.context_notice()
    assert "of the 2048 tokens of the context window" in out.getvalue() and "web_get_weather (" in out.getvalue()
    for name in list(tools):
        repl.command(f"/tools off {name}")
    assert session.tools is None and repl.tools_tokens() == 0
    repl.command("/tools on web_get_weather")
    assert [t["function"]["name"] for t in session.tools] == ["web_get_weather"]
    assert 0 < repl.tools_tokens() < 1024


# --- the command line and the REPL -----------------------------------------------------------


def chat_args(model: Path, *args: str) -> list[str]:
    return ["chat", "--model", str(model), "--max-context", "4096", *args]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--mcp", "''"], "--mcp needs a command"),
        (["--mcp-url", "ftp://x"], "not an http:// or https:// URL"),
        (["--mcp-config", "/nonexistent/mcp.json"], "MCP config file not found"),
        (["--mcp", f"{PYTHON} -c 'import sys; sys.stderr.write(\"no way\\n\"); sys.exit(3)'"], "failed to start"),
        (["--mcp-timeout", "0"], "--mcp-timeout must be"),
    ],
)
def test_bad_mcp_options_are_one_line_errors(args, needle):
    out = subprocess.run(
        ["nesso-mlx", "chat", "--model", "/nonexistent/model", *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode in (1, 2) and out.stderr.startswith("error:") and needle in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    if "no way" in args[-1]:
        assert "it said: no way" in out.stderr


def test_repl_with_mcp_servers(tmp_path):
    """`chat --mcp` twice (clashing names), /tools, a confirmed call, a killed server, Ctrl-C in a
    hung call, /stats, /exit: the servers are gone afterwards."""
    from nesso_fixture import nesso_folder

    script = [
        call("alpha_get_weather", {"city": "Roma"}),
        "Sereno a Roma.",
        call("beta_get_weather", {"city": "Milano"}),
        "Il server non risponde.",
        call("alpha_hang", {"seconds": 60}),
    ]
    env = {**os.environ, "NO_COLOR": "1", "NESSO_MLX_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    args = chat_args(nesso_folder("added"), "--mcp", f"{PYTHON} {SERVER} --name alpha", "--mcp", f"{PYTHON} {SERVER} --name beta")
    child = pexpect.spawn(
        PYTHON, [__file__, json.dumps(script), *args], env=env, encoding="utf-8", timeout=60, dimensions=(50, 250)
    )
    child.logfile_read = (tmp_path / "repl.log").open("w")  # to read when it fails
    try:
        child.expect("Type /help")
        child.expect(r"(\d+) tools: alpha_get_weather")
        assert int(child.match.group(1)) == 16
        servers = children(child.pid)
        alpha = [pid for pid, cmd in servers.items() if "alpha" in cmd]
        beta = [pid for pid, cmd in servers.items() if "beta" in cmd]
        assert len(alpha) == len(beta) == 1
        child.sendline("/tools")
        child.expect(r"beta_huge\s+│\s+MCP beta\s+│\s+(\d+)\s+│ yes")
        assert int(child.match.group(1)) > 10
        child.expect(r"the tools that are on take (\d+) of the 4096 tokens")
        child.sendline("/tools off beta_huge")
        child.expect("beta_huge is off")
        child.sendline("Meteo a Roma?")
        child.expect(r"run alpha_get_weather\(\{\"city\": \"Roma\"\}\)\? \[y/N\]")
        child.sendline("y")
        child.expect(r"→ ok.{0,9}\(\d+\.\d+ s\)\S*: Roma: sereno, 24 gradi celsius")  # (rich styles even with NO_COLOR)
        child.expect("Sereno a Roma.")
        child.sendline("/stats")
        child.expect(r"tools: 1 calls, \d+\.\d+ s in all")
        os.kill(beta[0], signal.SIGKILL)
        child.sendline("E a Milano?")
        child.expect(r"run beta_get_weather")
        child.sendline("y")
        child.expect("→ error")
        child.expect("Il server non risponde.")
        child.expect("note: MCP tool beta_get_weather failed: the server stopped")
        child.sendline("Aspetta")
        child.expect(r"run alpha_hang")
        child.sendline("y")
        child.expect("running alpha_hang")
        time.sleep(0.5)
        child.sendintr()
        child.expect("interrupted")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        assert gone(alpha + beta)
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)


def test_ctrl_c_at_the_prompt_stops_the_servers(tmp_path):
    """With --tools and --mcp-config; the MCP tool named like a Python one gets its server's name."""
    from nesso_fixture import nesso_folder

    env = {**os.environ, "NO_COLOR": "1", "NESSO_MLX_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    (tmp_path / "mcp.json").write_text(json.dumps({"mcpServers": {"cfg": {"command": PYTHON, "args": [str(SERVER)]}}}))
    tools_file = str(ROOT / "examples" / "tools.py")
    args = chat_args(nesso_folder("added"), "--tools", tools_file, "--mcp-config", str(tmp_path / "mcp.json"))
    child = pexpect.spawn(PYTHON, [__file__, "[]", *args], env=env, encoding="utf-8", timeout=60, dimensions=(50, 250))
    try:
        child.expect(r"11 tools: get_weather, calculator, convert_units, cfg_get_weather, fail,")
        child.expect("nesso-vocab-added ›")
        servers = list(children(child.pid))
        assert len(servers) == 1 and alive(servers[0])
        child.sendintr()
        child.expect("bye")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0 and gone(servers)
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)


def test_sigterm_stops_the_servers(tmp_path):
    """`kill` (SIGTERM) at the prompt leaves through the chat's clean-up: no orphan server."""
    from nesso_fixture import nesso_folder

    env = {**os.environ, "NO_COLOR": "1", "NESSO_MLX_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    args = chat_args(nesso_folder("added"), "--mcp", f"{PYTHON} {SERVER}")
    child = pexpect.spawn(PYTHON, [__file__, "[]", *args], env=env, encoding="utf-8", timeout=60, dimensions=(50, 250))
    try:
        child.expect("nesso-vocab-added ›")
        servers = list(children(child.pid))
        assert len(servers) == 1 and alive(servers[0])
        child.kill(signal.SIGTERM)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 128 + signal.SIGTERM and gone(servers)
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)
