"""The interactive chat: line editing and history, slash commands, streamed Markdown replies."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.markup import escape
from rich.table import Table

from .agent import StepLimit, ToolRun, agent_turn
from .chat import ChatSession
from .errors import NessoError
from .reply import GenerationChunk
from .tools import ToolCall, parse_tool_calls, tool_schemas

if TYPE_CHECKING:
    from .mcp_tools import MCPTools

HELP = """\
Type a message and press Enter. Multi-line: start and end with \"\"\", or end lines with \\.
  /system TEXT     set the system prompt (no text: show it)
  /set NAME VALUE  temperature, top_p, top_k, min_p, repetition_penalty, repetition_context_size, max_tokens, seed
  /show            model, precision, settings and context use
  /stats           statistics of the last reply (and of the tool calls so far)
  /tools           the tools the model may call, with the tokens their schemas take
  /tools off NAME  hide a tool from the model (/tools on NAME shows it again)
  /retry           regenerate the last reply
  /undo            remove the last exchange
  /reset           start a new conversation (keeps the system prompt)
  /save FILE       save the conversation as JSON
  /load FILE       load a saved conversation
  /help            this help
  /exit            quit (also Ctrl-D; Ctrl-C stops a reply)"""


class StreamingMarkdown:
    """The reply so far, rendered as Markdown only when the display refreshes.

    Appending a token is a string concatenation. The blocks that are complete (up to the last
    blank line outside a code fence) are printed once, above the live area, by `print_complete`;
    only the block being written is parsed again at each refresh. So drawing stays cheap however
    long the reply grows (re-parsing a 3 KB reply on every token took longer than a decode step
    on a Mac). In agent mode, tool-call blocks are hidden and the (short) reply is redrawn whole.
    """

    def __init__(self, hide_tool_calls: bool) -> None:
        self.hide_tool_calls = hide_tool_calls
        self.text = ""
        self._printed = 0  # characters of `text` already printed for good
        self._rendered: tuple[str, Markdown] | None = None

    def print_complete(self, console: Console) -> None:
        """Print the blocks completed since the last call (after the last blank line outside a code fence)."""
        if self.hide_tool_calls:
            return
        cut = self.text.rfind("\n\n", self._printed)
        while cut != -1 and self.text.count("```", 0, cut) % 2:
            cut = self.text.rfind("\n\n", self._printed, cut)
        if cut != -1:
            console.print(Markdown(self.text[self._printed : cut]))
            self._printed = cut + 2

    def __rich_console__(self, console: Console, options: Any) -> Iterator[Markdown]:
        text = parse_tool_calls(self.text)[0] if self.hide_tool_calls else self.text[self._printed :]
        if self._rendered is None or self._rendered[0] != text:
            self._rendered = (text, Markdown(text))
        yield self._rendered[1]


class ChatREPL:
    refresh_per_second = 12

    def __init__(
        self,
        session: ChatSession,
        model_name: str,
        precision: str,
        history_file: Path | None,
        console: Console | None = None,
        functions: dict[str, Callable[..., Any]] | None = None,
        yes: bool = False,
        max_steps: int = 5,
        mcp: MCPTools | None = None,
        max_result_tokens: int | None = None,
    ) -> None:
        self.session = session
        self.python_functions, self.mcp = dict(functions or {}), mcp
        self.yes, self.max_steps, self.max_result_tokens = yes, max_steps, max_result_tokens
        self.model_name = model_name
        self.precision = precision
        self.console = console or Console(highlight=False)
        self.read_line = self._make_reader(history_file)
        self.functions: dict[str, Callable[..., Any]] = {}  # the tools the model sees now
        self.schemas: dict[str, dict[str, Any]] = {}  # every tool's schema, on or off
        self.disabled: set[str] = set()
        self.tool_calls, self.tool_seconds = 0, 0.0
        self._mcp_version = -1
        if self.python_functions or mcp is not None:
            self.sync_tools()

    # --- tools ------------------------------------------------------------------------------

    def sync_tools(self) -> None:
        """Give the session the tools that are on (Python functions, then MCP tools), after an
        MCP server changed its list or a tool was turned on or off."""
        if self.mcp is not None:
            self.mcp.update()
            self._mcp_version = self.mcp.version
        every: dict[str, Callable[..., Any]] = dict(self.python_functions)
        schemas = dict(zip(self.python_functions, tool_schemas(list(self.python_functions.values())) or [], strict=True))
        if self.mcp is not None:
            for name, tool in self.mcp.tools.items():
                every[name], schemas[name] = self.mcp[name], tool.schema
        self.schemas = schemas
        self.functions = {name: f for name, f in every.items() if name not in self.disabled}
        self.session.tools = [schemas[name] for name in self.functions] or None

    def schema_tokens(self, name: str) -> int:
        """About how many tokens a tool's schema takes in the prompt (its JSON, as templates write it)."""
        text = json.dumps(self.schemas[name], ensure_ascii=False)
        return len(self.session.tokenizer.encode(text, add_special_tokens=False, parse_special=False))

    def tools_tokens(self) -> int:
        """The tokens the tools that are on add to every prompt (rendered by the chat template)."""
        if not self.session.tools:
            return 0
        probe = [{"role": "user", "content": "hi"}]
        with_tools = self.session.tokenizer.apply_chat_template(probe, tools=self.session.tools)
        return len(with_tools) - len(self.session.tokenizer.apply_chat_template(probe))

    def context_notice(self) -> None:
        """Warn when the tools' schemas alone take more than half the context window."""
        used, window = self.tools_tokens(), self.session.max_context
        if used * 2 > window:
            biggest = sorted(self.functions, key=self.schema_tokens, reverse=True)[:3]
            named = ", ".join(f"{name} ({self.schema_tokens(name)})" for name in biggest)
            self.console.print(
                f"[yellow]note:[/yellow] the tools' schemas take {used} of the {window} tokens of the context window, "
                f"leaving little room for the conversation. The biggest: {named}. Hide some with /tools off NAME.",
                highlight=False,
            )

    def _make_reader(self, history_file: Path | None) -> Callable[[str], str]:
        if not sys.stdin.isatty():

            def read_plain(prompt: str) -> str:
                line = sys.stdin.readline()
                if not line:
                    raise EOFError
                return line.rstrip("\n")

            return read_plain
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        history = InMemoryHistory()
        if history_file is not None:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(history_file))
        prompt_session = PromptSession(history=history)  # bracketed paste keeps pasted newlines
        return lambda prompt: prompt_session.prompt(prompt)

    def read_message(self) -> str:
        """One message: a line, a \"\"\"-delimited block, or lines continued with a backslash."""
        prompt = f"{self.model_name} › "
        line = self.read_line(prompt)
        if line.lstrip().startswith('"""'):
            lines = [line.lstrip()[3:]]
            while not lines[-1].rstrip().endswith('"""') or (len(lines) == 1 and lines[0].strip() == ""):
                lines.append(self.read_line("... "))
            lines[-1] = lines[-1].rstrip()[:-3]
            return "\n".join(lines).strip("\n")
        parts = [line]
        while parts[-1].endswith("\\"):
            parts[-1] = parts[-1][:-1]
            parts.append(self.read_line("... "))
        return "\n".join(parts)

    def run(self) -> int:
        self.console.print(
            f"[bold]nesso-mlx[/bold] chat with [cyan]{self.model_name}[/cyan] ({self.precision}). Type /help for commands."
        )
        if self.schemas:
            self.console.print(f"{len(self.functions)} tools: {', '.join(self.functions)}", markup=False)
            self.context_notice()
        while True:
            try:
                text = self.read_message()
            except (EOFError, KeyboardInterrupt):
                self.console.print("bye")
                return 0
            if not text.strip():
                continue
            if text.startswith("/"):
                if not self.command(text):
                    self.console.print("bye")
                    return 0
                continue
            if self.mcp is not None and (self.mcp.update() or self.mcp.version != self._mcp_version):
                self.sync_tools()
                self.console.print(f"the tools changed: {', '.join(self.functions) or 'none'}", markup=False)
            if self.functions:
                self.reply(
                    agent_turn(
                        self.session,
                        text,
                        self.functions,
                        self.confirm,
                        self.max_steps,
                        max_result_tokens=self.max_result_tokens,
                        on_call=self.running,
                    )
                )
            else:
                self.reply(self.session.send(text))

    # --- replies ----------------------------------------------------------------------------

    def reply(self, events: Iterator[Any]) -> None:
        """Render reply chunks (and, in agent mode, tool runs) as they arrive."""
        live = None
        try:
            for event in events:
                if isinstance(event, GenerationChunk):
                    if live is None:
                        shown = StreamingMarkdown(bool(self.functions))
                        live = Live(
                            shown, console=self.console, refresh_per_second=self.refresh_per_second, vertical_overflow="visible"
                        )
                        live.start()
                    shown.text += event.text  # drawn by Live's own refresh, at most refresh_per_second times a second
                    if "\n" in event.text:
                        shown.print_complete(live.console)
                    if event.finish_reason is not None:  # stop drawing before any confirmation prompt
                        live.stop()  # one last refresh: the whole reply is shown
                        live = None
                elif isinstance(event, ToolRun):
                    self.show_tool_run(event)
                elif isinstance(event, StepLimit):
                    self.console.print(f"[yellow]stopped after {event.steps} rounds of tool calls[/yellow]")
        except KeyboardInterrupt:
            if live is not None:
                live.stop()
            events.close()
            if self.functions and self.session.messages and self.session.messages[-1]["role"] == "tool":
                kept = " (the tool was stopped; the model will be told)"
            else:
                kept = " (the partial reply is kept)" if self.session.last.generated_tokens else ""
            self.console.print(f"[yellow]⏹ interrupted[/yellow]{kept}")
        except NessoError as e:
            if live is not None:
                live.stop()
            events.close()
            self.console.print(f"error: {e}", markup=False, style="red")
        notices = self.session.notices + (self.mcp.notices if self.mcp is not None else [])
        for notice in notices:
            self.console.print(f"[yellow]note:[/yellow] {notice}", highlight=False)
        self.session.notices.clear()
        if self.mcp is not None:
            self.mcp.notices.clear()
        s = self.session.last
        self.console.print(
            f"[dim]{s.generated_tokens} tokens · {s.generation_tps:.1f} tok/s · first token "
            f"{s.time_to_first_token:.2f} s · context {self.session.context_used()}/{self.session.max_context}[/dim]"
        )

    def running(self, call: ToolCall) -> Any:
        """A spinner with the tool's name while it runs."""
        return self.console.status(f"running {call.name}…", spinner="dots")

    def show_tool_run(self, run: ToolRun) -> None:
        call = run.call
        if run.status != "declined":
            self.tool_calls += 1
            self.tool_seconds += run.seconds
        arguments = json.dumps(call.arguments, ensure_ascii=False) if call.ok else call.raw
        style = {"ok": "green", "error": "red", "declined": "yellow"}[run.status]
        took = f" [dim]({run.seconds:.2f} s)[/dim]" if run.status != "declined" else ""
        self.console.print(f"[bold]🔧 {escape(call.name or '(malformed call)')}[/bold] {escape(arguments)}", highlight=False)
        lines = run.result.splitlines() or [""]
        short = "\n     ".join(line[:200] for line in lines[:3]) + (
            f"\n     … ({len(lines) - 3} more lines)" if len(lines) > 3 else ""
        )
        self.console.print(f"   → [{style}]{run.status}[/{style}]{took}: {escape(short)}", highlight=False)

    def confirm(self, call: ToolCall) -> bool:
        if self.yes:
            return True
        arguments = json.dumps(call.arguments, ensure_ascii=False)
        try:
            answer = self.read_line(f"run {call.name}({arguments})? [y/N] ")
        except (EOFError, KeyboardInterrupt):
            return False
        return answer.strip().lower() in ("y", "yes", "s", "si", "sì")

    # --- slash commands ---------------------------------------------------------------------

    def tools_command(self, rest: str) -> None:
        """/tools, /tools off NAME, /tools on NAME."""
        if self.mcp is not None and self.mcp.update():
            self.sync_tools()
        action, _, name = rest.partition(" ")
        name = name.strip()
        if not rest:
            if not self.schemas:
                self.console.print("no tools (start the chat with --tools FILE or --mcp COMMAND)")
                return
            table = Table("tool", "from", "tokens", "on")
            for tool in self.schemas:
                origin = f"MCP {self.mcp.tools[tool].server}" if self.mcp is not None and tool in self.mcp.tools else "Python"
                table.add_row(tool, origin, str(self.schema_tokens(tool)), "no" if tool in self.disabled else "yes")
            self.console.print(table)
            self.console.print(
                f"the tools that are on take {self.tools_tokens()} of the {self.session.max_context} tokens of the window",
                markup=False,
            )
        elif action in ("on", "off") and name:
            if name not in self.schemas:
                self.console.print(f"no tool named {name!r}; /tools lists them", markup=False, style="red")
                return
            (self.disabled.discard if action == "on" else self.disabled.add)(name)
            self.sync_tools()
            self.console.print(f"{name} is {action}", markup=False)
        else:
            self.console.print("usage: /tools, /tools off NAME, /tools on NAME", markup=False, style="red")

    def command(self, line: str) -> bool:
        """Run a slash command; returns False to exit."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        session = self.session
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            self.console.print(HELP, markup=False)
        elif name == "/system":
            if rest:
                session.system = rest
                self.console.print("system prompt set")
            else:
                self.console.print(f"system prompt: {session.system!r}", markup=False)
        elif name == "/set":
            try:
                param, value = shlex.split(rest)
                session.settings.set(param, value)
                self.console.print(f"{param} = {getattr(session.settings, param)}", markup=False)
            except ValueError as e:
                message = str(e) if rest.count(" ") == 1 else "usage: /set NAME VALUE (e.g. /set temperature 0.2)"
                self.console.print(f"[red]{message}[/red]")
        elif name == "/show":
            table = Table(show_header=False)
            table.add_row("model", self.model_name)
            table.add_row("precision", self.precision)
            table.add_row("system prompt", repr(session.system))
            for key, value in vars(session.settings).items():
                table.add_row(key, str(value))
            table.add_row("context", f"{session.context_used()}/{session.max_context} tokens")
            table.add_row("messages", str(len(session.messages)))
            self.console.print(table)
        elif name == "/stats":
            s = session.last
            self.console.print(
                f"prompt {s.prompt_tokens} tokens: {s.prefilled_tokens} prefilled, "
                f"{s.prompt_tokens - s.prefilled_tokens} reused from the cache; {s.generated_tokens} generated "
                f"at {s.generation_tps:.1f} tok/s; prefill {s.prompt_tps:.1f} tok/s; finish: {s.finish_reason}",
                markup=False,
            )
            if self.schemas:
                self.console.print(f"tools: {self.tool_calls} calls, {self.tool_seconds:.2f} s in all", markup=False)
        elif name == "/tools":
            self.tools_command(rest)
        elif name == "/retry":
            try:
                self.reply(session.retry())
            except NessoError as e:
                self.console.print(f"[red]{e}[/red]")
        elif name == "/undo":
            self.console.print("removed the last exchange" if session.undo() else "nothing to undo")
        elif name == "/reset":
            session.reset()
            self.console.print("new conversation")
        elif name in ("/save", "/load"):
            if not rest:
                self.console.print(f"[red]usage: {name} FILE[/red]")
            else:
                try:
                    if name == "/save":
                        self.console.print(f"saved to {session.save(rest)}", markup=False)
                    else:
                        session.load(rest)
                        self.console.print(f"loaded {len(session.messages)} messages from {rest}", markup=False)
                except NessoError as e:
                    self.console.print(f"error: {e}", markup=False, style="red")
        else:
            self.console.print(f"unknown command {name} — type /help for the list", markup=False, style="red")
        return True
