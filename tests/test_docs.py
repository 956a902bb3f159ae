"""The docs are tested: every code and shell block of README.md and docs/*.md runs, and the
generated sections (docs/job-record.md, docs/configuration.md) match the code.

How a page runs (docs/development.md says the same for doc writers):

- A page is one reader's terminal session: its blocks run in order, in a fresh temp directory,
  with ``.venv/bin`` first on ``PATH`` and ``REDIS_URL`` pointing at a flushed test database.
  Variables a block exports and a ``cd`` carry over to the next block; background processes a
  block starts (``flexq worker &``) live until the page ends.
- ```` ```sh ````, ```` ```bash ````, ```` ```shell ````: run with ``bash`` under ``set -e -o pipefail``.
- ```` ```console ````: ``$ `` lines are commands, the lines after one are output it must print
  (in order; a line ending in ``…`` or ``...`` matches any line starting with the rest). A command
  may exit non-zero only if the next command is ``echo $?``.
- ```` ```python ````: run with the venv's python.
- ```` ```text ````, ```` ```json ````, ```` ```jsonl ````: output and data, not run; json and jsonl
  must parse.
- ``<!-- file: NAME -->`` on the line above a block: the block is written to NAME in the page's
  directory when the page reaches it. ``<!-- expect: TEXT -->`` above a runnable block: its
  output must contain TEXT (several allowed).
- A runnable block must exit 0 and print something or change a file, and must not ``sleep``.
- Pages listed in PAGE_SERVICES get a background simulator and ``flexq worker`` from the harness.
- ``FLEXQ_DOCS_OUTPUT=DIR`` keeps each block's output in DIR, to refresh the ```` ```text ```` blocks.
- Commands that cannot run here go through REWRITES (each says why) or, for ``docker``, through
  a stand-in on ``PATH`` that checks the command against docker-compose.yml and runs nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis as sync_redis

from flexq import gendocs
from tests.conftest import require_or_skip

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PAGES = [path.relative_to(ROOT).as_posix() for path in gendocs.pages(ROOT)]
#: Redis database of these tests (conftest uses 15, tests/test_flow_store.py 13, the benchmarks 12).
DOCS_DB = 11
BLOCK_TIMEOUT_S = 60.0
README_MAX_LINES = 200

SHELL = frozenset({"sh", "bash", "shell"})
CONSOLE = frozenset({"console"})
PYTHON = frozenset({"python", "py"})
DATA = frozenset({"text", "json", "jsonl"})
RUNNABLE = SHELL | CONSOLE | PYTHON

#: Pages whose snippets need a worker they do not start themselves (a producer enqueues and waits).
PAGE_SERVICES: dict[str, tuple[str, ...]] = {
    "README.md": ("simulator", "worker"),
    "docs/producer-api.md": ("simulator", "worker"),
    "docs/job-record.md": ("simulator", "worker"),
    "docs/outputs.md": ("simulator", "worker"),
    "docs/channels.md": ("simulator", "worker"),
}

#: Blocks that cannot run as they stand, in pages owned elsewhere (flow-control, benchmarks, gemini-wire):
#: fix the page, then remove its entry (strict: a block that starts passing fails until then).
XFAIL: dict[str, str] = {}


# -- rewrites --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What a rewrite may substitute."""

    redis_url: str
    sim_port: int


@dataclass(frozen=True)
class Rewrite:
    pattern: re.Pattern[str]
    replace: Callable[[re.Match[str], Context], str]
    why: str

    def apply(self, text: str, ctx: Context) -> str:
        return self.pattern.sub(lambda m: self.replace(m, ctx), text)


_BENCH_ARGS = (
    "import sys; from bench.run import build_parser; build_parser().parse_args(sys.argv[1:]); "
    "print('bench.run accepts', sys.argv[1:])"
)

REWRITES: tuple[Rewrite, ...] = (
    Rewrite(
        re.compile(r"(?<![\w./-])make (?P<target>[a-z][\w-]*)"),
        lambda m, _c: f"make -n -C {shlex.quote(str(ROOT))} {m['target']}",
        "make targets create .venv, run the whole suite or a 30 s demo: `make -n` proves the target "
        "exists and prints its recipe",
    ),
    Rewrite(
        re.compile(r"redis://(?:localhost|127\.0\.0\.1):6379/0\b"),
        lambda _m, c: c.redis_url,
        "a reader's database 0 is the page's flushed test database",
    ),
    Rewrite(
        re.compile(r"(?:(?<=127\.0\.0\.1:)|(?<=localhost:)|(?<=--port ))8089\b"),
        lambda _m, c: str(c.sim_port),
        "port 8089 may be taken: each page gets a free port for its simulator",
    ),
    Rewrite(
        re.compile(r"(?<![\w./-])\.venv/bin/"),
        lambda _m, _c: f"{VENV_BIN}/",
        "a page runs in a temp directory, not in the clone",
    ),
    Rewrite(
        re.compile(r"(?P<python>\S*python) -m bench\.run(?P<args>[^\n#]*)"),
        lambda m, _c: (
            f"(cd {shlex.quote(str(ROOT))} && {m['python']} -c {shlex.quote(_BENCH_ARGS)}{m['args'].rstrip()})"
            + m["args"][len(m["args"].rstrip()) :]
        ),
        "benchmarks take minutes: their arguments are checked by bench.run's own parser",
    ),
    Rewrite(
        re.compile(r"(?P<python>\S*python) -m bench\.chaos(?P<args>[^\n#]*)"),
        lambda m, _c: f"(cd {shlex.quote(str(ROOT))} && {m['python']} -m bench.chaos{m['args'].rstrip()})"
        + m["args"][len(m["args"].rstrip()) :],
        "bench/ is not installed: the chaos run starts from the clone (a page only asks for its --help; "
        "tests/test_chaos.py runs it)",
    ),
)


def rewrite(text: str, ctx: Context) -> str:
    for rule in REWRITES:
        text = rule.apply(text, ctx)
    return text


# -- blocks ----------------------------------------------------------------------------------------

FENCE_RE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
DIRECTIVE_RE = re.compile(r"^\s*<!--\s*(?P<key>file|expect):\s*(?P<value>.*?)\s*-->\s*$")
ANY_DIRECTIVE_RE = re.compile(r"^\s*<!--\s*(?P<key>[a-z-]+):")
SLEEP_RE = re.compile(r"(?<![\w-])sleep\s+[\d.]")
#: Programs a page may use that a bare CI image may lack: such a block is skipped, saying why.
OPTIONAL_TOOLS = ("curl",)


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    file: str | None = None
    expect: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class Page:
    name: str
    blocks: list[Block] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def parse_page(name: str, text: str) -> Page:
    """Fenced blocks with the directives on the lines just above them; anything malformed is a problem."""
    page = Page(name)
    lines = text.splitlines()
    attached: set[int] = set()
    index = 0
    while index < len(lines):
        match = FENCE_RE.match(lines[index])
        if match is None:
            index += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        lang = match["info"].strip().split(" ")[0].lower() if match["info"].strip() else ""
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = index + 1
        while end < len(lines) and not close.match(lines[end]):
            end += 1
        if end >= len(lines):
            page.problems.append(f"{name}:{index + 1}: the fence is never closed")
            break
        body = [_dedent(line, indent) for line in lines[index + 1 : end]]
        file_name, expect = None, []
        above = index - 1
        while above >= 0 and (directive := DIRECTIVE_RE.match(lines[above])):
            attached.add(above)
            if directive["key"] == "file":
                file_name = directive["value"]
            else:
                expect.append(directive["value"])
            above -= 1
        page.blocks.append(Block(name, index + 1, lang, "\n".join(body) + "\n", file_name, tuple(reversed(expect))))
        index = end + 1
    for number, line in enumerate(lines):
        directive = ANY_DIRECTIVE_RE.match(line)
        if directive and directive["key"] not in ("file", "expect", "generated"):
            page.problems.append(f"{name}:{number + 1}: unknown directive {directive['key']!r}: {line.strip()}")
        elif directive and directive["key"] != "generated" and number not in attached:
            page.problems.append(f"{name}:{number + 1}: a directive not on the line above a block: {line.strip()}")
    return page


def _dedent(line: str, indent: int) -> str:
    strip = len(line) - len(line.lstrip(" \t"))
    return line[min(strip, indent) :]


def load_pages() -> list[Page]:
    return [parse_page(name, (ROOT / name).read_text(encoding="utf-8")) for name in PAGES]


ALL_PAGES = load_pages()
#: Output (```text) is not tested; everything else is: run, parsed, or refused for want of a language.
TESTED_BLOCKS = [b for p in ALL_PAGES for b in p.blocks if b.lang != "text"]


def _block_params() -> list[object]:
    params: list[object] = []
    for block in TESTED_BLOCKS:
        marks = [pytest.mark.redis, pytest.mark.e2e] if block.lang in RUNNABLE else []
        if block.id in XFAIL:
            marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[block.id]))
        params.append(pytest.param(block, id=block.id, marks=marks))
    return params


# -- console blocks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    text: str
    expected: tuple[str, ...]


def console_commands(block: Block) -> list[Command]:
    commands: list[Command] = []
    current: list[str] | None = None
    expected: list[str] = []
    continued = False
    for line in block.text.splitlines():
        if continued and current is not None:
            current.append(line)
            continued = line.endswith("\\")
            continue
        if line.startswith("$ "):
            if current is not None:
                commands.append(Command("\n".join(current), tuple(expected)))
            current, expected = [line[2:]], []
            continued = line.endswith("\\")
        elif line.strip():
            if current is None:
                raise AssertionError(f"{block.id}: output before the first `$ ` command: {line!r}")
            expected.append(line.rstrip())
    if current is not None:
        commands.append(Command("\n".join(current), tuple(expected)))
    return commands


def line_matches(expected: str, actual: str) -> bool:
    for ellipsis in ("…", "..."):
        if expected.endswith(ellipsis):
            return actual.startswith(expected[: -len(ellipsis)].rstrip())
    return actual == expected


def missing_lines(expected: tuple[str, ...], actual: list[str]) -> list[str]:
    """Expected lines not found in order among the actual ones."""
    position, missing = 0, []
    for want in expected:
        for offset, line in enumerate(actual[position:]):
            if line_matches(want, line):
                position += offset + 1
                break
        else:
            missing.append(want)
    return missing


# -- the docker stand-in -----------------------------------------------------------------------------

DOCKER_SHIM = '''#!{python}
"""docker, for the docs tests: checks a command against docker-compose.yml and the flexq CLI; runs nothing."""
import sys
from pathlib import Path

import yaml

ROOT = Path({root!r})
sys.path.insert(0, str(ROOT))
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PROFILES = {{p for s in SERVICES.values() for p in s.get("profiles", [])}}


def fail(message):
    print(f"docker (docs stand-in): {{message}}", file=sys.stderr)
    sys.exit(2)


def flexq_args(argv):
    """The arguments of the image's ENTRYPOINT (flexq), checked by flexq's own parsers."""
    if not argv:
        return
    if argv[0] == "simulate":
        from simulator import cli as sim_cli

        sim_cli._config_from(sim_cli._parser().parse_args(argv[1:]))  # what `simulate` checks before serving
    elif argv[0] in ("batch", "demo"):
        from flexq import batch_cmd

        batch_cmd.build_parser(f"flexq {{argv[0]}}").parse_args(argv[1:])
    else:
        from flexq import cli

        cli.build_parser().parse_args(argv)


def options(rest, flags, valued):
    """Consume leading options; return (options, positionals)."""
    seen = []
    while rest and rest[0].startswith("-"):
        opt = rest.pop(0)
        if opt in valued:
            if not rest:
                fail(f"{{opt}} needs a value")
            seen.append((opt, rest.pop(0)))
        elif opt in flags:
            seen.append((opt, None))
        else:
            fail(f"unexpected option {{opt}}")
    return seen, rest


def service(name):
    if name not in SERVICES:
        fail(f"no service {{name!r}} in docker-compose.yml (services: {{', '.join(SERVICES)}})")
    return SERVICES[name]


def compose(rest):
    globals_, rest = options(rest, set(), {{"--profile", "-f", "--file"}})
    for opt, value in globals_:
        if opt == "--profile" and value not in PROFILES:
            fail(f"no profile {{value!r}} in docker-compose.yml")
        if opt in ("-f", "--file") and value != "docker-compose.yml":
            fail(f"unexpected compose file {{value}}")
    if not rest:
        fail("compose needs a command")
    command, rest = rest[0], rest[1:]
    if command == "up":
        opts, names = options(rest, {{"-d", "--build", "--wait"}}, {{"--scale"}})
        for opt, value in opts:
            if opt == "--scale":
                name, _, count = value.partition("=")
                service(name)
                if not count.isdigit():
                    fail(f"--scale {{value}}: not SERVICE=N")
    elif command == "down":
        opts, names = options(rest, {{"-v", "--volumes", "--remove-orphans"}}, set())
    elif command == "run":
        opts, names = options(rest, {{"--rm", "--no-deps"}}, {{"-e"}})
        if not names:
            fail("run needs a service")
        spec = service(names[0])
        if spec.get("build") == ".":
            flexq_args(names[1:])
        names = names[:1]
    elif command in ("ps", "logs", "stop", "restart", "build", "pull", "config"):
        opts, names = options(rest, {{"-f", "--follow"}}, {{"--tail"}})
    else:
        fail(f"unexpected compose command {{command!r}}")
    for name in names:
        service(name)
    print(f"docker (docs stand-in): compose {{command}} checked against docker-compose.yml")


def run(rest):
    opts, rest = options(rest, {{"--rm", "-it", "-i", "-t", "-d"}}, {{"-e", "--name", "-v", "-p"}})
    if not rest:
        fail("run needs an image")
    image, argv = rest[0], rest[1:]
    if f"docker build -t {{image}} ." not in (ROOT / "Dockerfile").read_text():
        fail(f"the Dockerfile does not say how to build the image {{image!r}}")
    flexq_args(argv or ["worker"])
    print(f"docker (docs stand-in): run {{image}} {{' '.join(argv) or '(CMD: worker)'}} checked")


args = sys.argv[1:]
if not args:
    fail("no command")
if args[0] == "compose":
    compose(args[1:])
elif args[0] == "run":
    run(args[1:])
elif args[0] == "build":
    options(args[1:], set(), {{"-t"}})
    print("docker (docs stand-in): build checked")
else:
    fail(f"unexpected docker command {{args[0]!r}}")
'''


# -- running a page --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def docs_redis_url() -> str:
    base = (os.environ.get("FLEXQ_TEST_REDIS_URL") or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379")
    base = base.rstrip("/")
    head, _, tail = base.rpartition("/")
    if tail.isdigit() and head.count("/") >= 2:
        base = head
    return f"{base}/{DOCS_DB}"


def poll(check: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    """Call ``check`` until it is true; fail after ``timeout_s`` (polling, never a fixed wait)."""
    give_up = time.monotonic() + timeout_s
    delay_s = 0.02
    while not check():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(delay_s)
        delay_s = min(0.2, delay_s * 2)


def _listing(directory: Path) -> dict[str, float]:
    return {str(p.relative_to(directory)): p.stat().st_mtime for p in directory.rglob("*") if p.is_file()}


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no output)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Result:
    ok: bool
    message: str = ""


class PageRun:
    """One page's terminal: its directory, environment, background processes, results so far."""

    def __init__(self, page: Page, tmp: Path, redis_url: str, shim_dir: Path) -> None:
        self.page = page
        self.redis_url = redis_url
        self.state = tmp / "state"
        self.cwd = tmp / "cwd"
        self.state.mkdir(parents=True)
        self.cwd.mkdir()
        self.ctx = Context(redis_url=redis_url, sim_port=free_port())
        self.api_key = "docs-test-key-" + secrets.token_hex(8)
        inherited = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("FLEXQ_", "GEMINI_", "GOOGLE_", "PYTEST_")) and k not in ("REDIS_URL", "VIRTUAL_ENV")
        }
        self.env = {
            **inherited,
            "PATH": os.pathsep.join([str(VENV_BIN), str(shim_dir), inherited.get("PATH", "")]),
            "REDIS_URL": redis_url,
            "NO_PROXY": "127.0.0.1,localhost",
            "COLUMNS": "120",
            "PYTHONUNBUFFERED": "1",
        }
        self.results: dict[int, Result] = {}
        self.groups: list[int] = []
        self.services: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.steps = 0
        flush(redis_url)
        for name in PAGE_SERVICES.get(page.name, ()):
            self._start(name)
        if "simulator" in self.services:  # the worker need not be up: jobs wait for it in Redis
            poll(self._simulator_up, timeout_s=30, what=f"the simulator on port {self.ctx.sim_port}")

    # services -----------------------------------------------------------------------------------

    def _start(self, name: str) -> None:
        log = self.state / f"{name}.log"
        if name == "simulator":
            argv = [str(VENV_BIN / "flexq"), "simulate", "--port", str(self.ctx.sim_port)]
            env = self.env
        else:
            argv = [str(VENV_BIN / "flexq"), "worker"]
            env = {
                **self.env, "GEMINI_API_KEY": self.api_key, "FLEXQ_LOG_FORMAT": "json",
                "GEMINI_BASE_URL": f"http://127.0.0.1:{self.ctx.sim_port}",
            }
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                argv, cwd=self.state, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.services[name] = (proc, log)

    def _alive(self, name: str) -> None:
        proc, log = self.services[name]
        if proc.poll() is not None:
            raise AssertionError(f"the harness's {name} exited with {proc.returncode}:\n{_tail(log)}")

    def _simulator_up(self) -> bool:
        self._alive("simulator")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ctx.sim_port}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    # blocks -------------------------------------------------------------------------------------

    def run_through(self, target: Block) -> Result:
        """Run every earlier block of the page not run yet (writing file blocks), then ``target``."""
        for block in self.page.blocks:
            if block.line > target.line:
                break
            if block.line in self.results:
                continue
            if block.file is not None:
                path = self.cwd / block.file
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(block.text, encoding="utf-8")
            if block.lang in RUNNABLE:
                for name in self.services:
                    self._alive(name)
                self.results[block.line] = self._run(block)
            elif block.line != target.line:
                self.results[block.line] = Result(True)
        return self.results.get(target.line, Result(True))

    def earlier_failures(self, target: Block) -> list[str]:
        return [f"{self.page.name}:{line}" for line, r in self.results.items() if line < target.line and not r.ok]

    def _run(self, block: Block) -> Result:
        if SLEEP_RE.search(block.text):
            return Result(False, "the block sleeps: wait for something instead (flexq wait, curl --retry, ...)")
        self.steps += 1
        before = _listing(self.cwd)
        if block.lang in PYTHON:
            result = self._python(block)
        elif block.lang in CONSOLE:
            result = self._console(block)
        else:
            result = self._shell(block)
        if not result.ok:
            return result
        output = result.message
        changed = _listing(self.cwd) != before
        if not output.strip() and not changed:
            return Result(False, "the block printed nothing and changed no file: it shows nothing")
        absent = [text for text in block.expect if text not in output]
        if absent:
            return Result(False, f"expected output missing: {absent!r}\n--- output ---\n{output[-4000:]}")
        return Result(True, output)

    def _spawn(self, argv: list[str], tag: str) -> tuple[int, str]:
        out = self.state / f"{tag}.out"
        with out.open("wb") as sink:
            proc = subprocess.Popen(
                argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.groups.append(proc.pid)
            try:
                code = proc.wait(BLOCK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(10)
                return -1, f"timed out after {BLOCK_TIMEOUT_S:g}s\n{_tail(out)}"
        return code, out.read_text(errors="replace")

    def _script(self, body: str, *, strict: bool) -> Path:
        env_out, cwd_out = self.state / f"env.{self.steps}", self.state / f"cwd.{self.steps}"
        script = self.state / f"block.{self.steps}.sh"
        script.write_text(
            ("set -eo pipefail\n" if strict else "exec 2>&1\n")
            + f"cd {shlex.quote(str(self.cwd))}\n"
            + f"trap 'rc=$?; env -0 > {shlex.quote(str(env_out))}; pwd > {shlex.quote(str(cwd_out))}; exit $rc' EXIT\n"
            + body,
            encoding="utf-8",
        )
        return script

    def _keep_state(self) -> None:
        """What the block exported and where it cd'ed to, for the next block."""
        env_out, cwd_out = self.state / f"env.{self.steps}", self.state / f"cwd.{self.steps}"
        if env_out.exists():
            pairs = (item.split("=", 1) for item in env_out.read_text(errors="replace").split("\0") if "=" in item)
            self.env = {k: v for k, v in pairs if k not in ("_", "SHLVL", "PWD", "OLDPWD")}
        if cwd_out.exists():
            self.cwd = Path(cwd_out.read_text().strip())

    def _shell(self, block: Block) -> Result:
        script = self._script(rewrite(block.text, self.ctx), strict=True)
        code, output = self._spawn(["bash", str(script)], f"block.{self.steps}")
        self._keep_state()
        if code != 0:
            return Result(False, f"exit status {code}\n--- output ---\n{output[-4000:]}")
        return Result(True, output)

    def _python(self, block: Block) -> Result:
        source = self.state / f"block.{self.steps}.py"
        source.write_text(block.text, encoding="utf-8")
        code, output = self._spawn([str(VENV_BIN / "python"), str(source)], f"block.{self.steps}")
        if code != 0:
            return Result(False, f"exit status {code}\n--- output ---\n{output[-4000:]}")
        return Result(True, output)

    def _console(self, block: Block) -> Result:
        commands = console_commands(block)
        separator = "\x1eflexq-docs-command-end\x1e"
        body = "".join(
            f"{rewrite(c.text, self.ctx)}\n__rc=$?; printf '\\n{separator}%s\\n' \"$__rc\"; (exit $__rc)\n"
            for c in commands
        )
        code, output = self._spawn(["bash", str(self._script(body, strict=False))], f"block.{self.steps}")
        self._keep_state()
        # output of command 1, SEP status 1, output of command 2, SEP status 2, ...
        chunks = output.split(separator)
        problems = []
        for index, command in enumerate(commands):
            if index + 1 >= len(chunks):
                problems.append(f"`{command.text}` did not finish")
                break
            text = chunks[index] if index == 0 else chunks[index].split("\n", 1)[-1]
            status = int(chunks[index + 1].split("\n", 1)[0])
            lines = [line.rstrip() for line in text.splitlines() if line.strip()]
            missing = missing_lines(command.expected, lines)
            if missing:
                problems.append(f"`{command.text}` did not print {missing!r}; it printed {lines!r}")
            following = commands[index + 1].text.strip() if index + 1 < len(commands) else ""
            if status != 0 and following != "echo $?":
                problems.append(f"`{command.text}` exited {status}, and the block does not show it with `echo $?`")
        if code != 0 and not problems:
            problems.append(f"the block's shell exited {code}")
        return Result(not problems, "\n".join(problems) if problems else output)

    def close(self) -> None:
        """Stop what the page started (SIGTERM, so that workers record interrupted attempts)."""
        for pgid in [*self.groups, *(proc.pid for proc, _ in self.services.values())]:
            _signal_group(pgid, signal.SIGTERM)
        for proc, _log in self.services.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for pgid in self.groups:  # their leaders (bash) are reaped; what is left is background jobs
            try:
                poll(lambda pgid=pgid: not _group_alive(pgid), timeout_s=15, what=f"process group {pgid} to stop")
            except AssertionError:
                _signal_group(pgid, signal.SIGKILL)
        flush(self.redis_url)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def flush(redis_url: str) -> None:
    client = sync_redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()


def redis_answers(url: str) -> bool:
    client = sync_redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except (sync_redis.RedisError, OSError):
        return False
    finally:
        client.close()


class Runner:
    """Pages run one at a time: starting a page ends the one before (they share one database)."""

    def __init__(self, tmp: Path, redis_url: str) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        self.shim_dir = tmp / "bin"
        self.shim_dir.mkdir()
        shim = self.shim_dir / "docker"
        shim.write_text(DOCKER_SHIM.format(python=sys.executable, root=str(ROOT)), encoding="utf-8")
        shim.chmod(0o755)
        self.current: PageRun | None = None
        self.pages = {page.name: page for page in ALL_PAGES}

    def page(self, name: str) -> PageRun:
        if self.current is not None and self.current.page.name != name:
            self.current.close()
            self.current = None
        if self.current is None:
            directory = Path(tempfile.mkdtemp(prefix=re.sub(r"\W", "-", name) + "-", dir=self.tmp))
            self.current = PageRun(self.pages[name], directory, self.redis_url, self.shim_dir)
        return self.current

    def open(self, page: Page) -> PageRun:
        """Run ``page`` (e.g. one a test makes up), ending the current one."""
        self.close()
        directory = Path(tempfile.mkdtemp(prefix=re.sub(r"\W", "-", page.name) + "-", dir=self.tmp))
        self.current = PageRun(page, directory, self.redis_url, self.shim_dir)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


@pytest.fixture(scope="session")
def runner() -> Iterator[Runner]:
    url = docs_redis_url()
    if not redis_answers(url):
        require_or_skip(f"no Redis answers at {url}")
    tmp = Path(tempfile.mkdtemp(prefix="flexq-docs-"))
    running = Runner(tmp, url)
    try:
        yield running
    finally:
        running.close()
        shutil.rmtree(tmp, ignore_errors=True)


# -- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", _block_params())
def test_block(block: Block, request: pytest.FixtureRequest) -> None:
    """A block of a page: runnable ones run (after the page's earlier blocks), data must parse."""
    if not block.lang:
        pytest.fail(f"{block.id}: the fence has no language; say sh, console, python, text, json or jsonl")
    if block.lang not in RUNNABLE | DATA:
        pytest.fail(f"{block.id}: unknown fence language {block.lang!r}; known: {sorted(RUNNABLE | DATA)}")
    if block.lang == "json":
        json.loads(block.text)
        return
    if block.lang == "jsonl":
        rows = [json.loads(line) for line in block.text.splitlines() if line.strip()]
        assert rows and all(isinstance(row, dict) for row in rows), f"{block.id}: not JSON objects, one a line"
        return
    for tool in OPTIONAL_TOOLS:
        if re.search(rf"(?<![\w/.-]){tool}\s", block.text) and shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    page = request.getfixturevalue("runner").page(block.page)
    result = page.run_through(block)
    keep = os.environ.get("FLEXQ_DOCS_OUTPUT")
    if keep:  # to refresh a page's ```text blocks from real output
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / (re.sub(r"\W", "-", block.id) + ".txt")).write_text(result.message, encoding="utf-8")
    if not result.ok:
        earlier = page.earlier_failures(block)
        note = f"\n(earlier blocks of this page failed too: {', '.join(earlier)})" if earlier else ""
        pytest.fail(f"{block.id} ({block.lang}): {result.message}{note}", pytrace=False)


@pytest.mark.parametrize("page", ALL_PAGES, ids=[p.name for p in ALL_PAGES])
def test_page_is_well_formed(page: Page) -> None:
    assert not page.problems, "\n".join(page.problems)


def test_generated_sections_are_current() -> None:
    stale = [p.relative_to(ROOT).as_posix() for p in gendocs.stale_pages(ROOT)]
    assert not stale, (
        f"{', '.join(stale)}: generated sections are stale; regenerate with "
        f"`.venv/bin/{gendocs.COMMAND}` and commit the result"
    )


def test_generated_sections_are_where_they_belong() -> None:
    found = {name: [p.relative_to(ROOT).as_posix() for p in pages] for name, pages in gendocs.sections_in(ROOT).items()}
    assert found == {"job-record": ["docs/job-record.md"], "settings": ["docs/configuration.md"]}


def test_gendocs_check_fails_on_a_stale_page(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# x\n")
    page = tmp_path / "docs" / "configuration.md"
    page.write_text("<!-- generated:settings -->\nold\n<!-- /generated:settings -->\n")
    assert gendocs.main(["--check", "--root", str(tmp_path)]) == 1
    assert gendocs.main(["--root", str(tmp_path)]) == 0
    assert "`FLEXQ_BREAKER_FAILURE_RATIO`" in page.read_text()
    assert gendocs.main(["--check", "--root", str(tmp_path)]) == 0


def test_no_secret_defaults_in_the_settings_table() -> None:
    table = gendocs.settings_table()
    assert "localhost:6379" not in table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| `")}
    assert "*secret*" in rows["`REDIS_URL`"]
    assert "*secret*" in rows["`GEMINI_API_KEY` (or `GOOGLE_API_KEY`)"]


def test_readme_is_short() -> None:
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


LINK_RE = re.compile(r"\]\((?P<target>[^)\s]+)\)")
PATH_RE = re.compile(r"`(?P<path>(?:producer|worker|flexq|simulator|bench|tests|docs)/[\w./*-]*[\w*])`")


@pytest.mark.parametrize("page", ALL_PAGES, ids=[p.name for p in ALL_PAGES])
def test_links_and_paths_exist(page: Page) -> None:
    """Relative links and file paths in backticks name files of this repository."""
    source = ROOT / page.name
    text = source.read_text(encoding="utf-8")
    bad = []
    for match in LINK_RE.finditer(text):
        target = match["target"]
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        resolved = (source.parent / target.split("#", 1)[0]).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            bad.append(f"link {target}")
    for match in PATH_RE.finditer(text):
        if not list(ROOT.glob(match["path"])):
            bad.append(f"path {match['path']}")
    assert not bad, f"{page.name} names what this repository does not have: {bad}"


def test_xfail_entries_name_real_blocks() -> None:
    ids = {block.id for block in TESTED_BLOCKS}
    assert set(XFAIL) <= ids, f"stale XFAIL entries (fix or remove them): {sorted(set(XFAIL) - ids)}"


def test_every_rewrite_is_used() -> None:
    ctx = Context(redis_url="redis://x/0", sim_port=1)
    texts = [b.text for p in ALL_PAGES for b in p.blocks if b.lang in SHELL | CONSOLE or not b.lang]
    unused = [rule.why for rule in REWRITES if not any(rule.apply(t, ctx) != t for t in texts)]
    assert not unused, f"rewrites no block needs (remove them): {unused}"


def test_console_matching() -> None:
    assert missing_lines(("a", "c…"), ["a", "b", "c d"]) == []
    assert missing_lines(("c", "a"), ["a", "b", "c"]) == ["a"]
    block = Block("p", 1, "console", "$ false\n$ echo $?\n1\n")
    assert [c.expected for c in console_commands(block)] == [(), ("1",)]


def test_docker_stand_in_refuses_what_compose_does_not_have(runner: Runner) -> None:
    shim = str(runner.shim_dir / "docker")
    ok = subprocess.run([shim, "compose", "run", "--rm", "flexq", "list", "--status", "failed"],
                        capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    for argv in (["compose", "up", "-d", "--scale", "workers=4"], ["compose", "--profile", "nope", "up"],
                 ["compose", "run", "--rm", "flexq", "frobnicate"]):
        bad = subprocess.run([shim, *argv], capture_output=True, text=True, timeout=60, check=False)
        assert bad.returncode != 0, argv


def test_rewrites_keep_the_reader_away_from_database_0() -> None:
    ctx = Context(redis_url="redis://127.0.0.1:6379/11", sim_port=4242)
    text = rewrite(textwrap.dedent("""\
        export REDIS_URL=redis://localhost:6379/0
        flexq simulate --port 8089 &
        curl http://127.0.0.1:8089/healthz
        GEMINI_BASE_URL=http://simulator:8089 docker compose --profile sim up -d
        make test
    """), ctx)
    assert "6379/0" not in text and "redis://127.0.0.1:6379/11" in text
    assert "--port 4242" in text and "127.0.0.1:4242/healthz" in text and "simulator:8089" in text
    assert f"make -n -C {shlex.quote(str(ROOT))} test" in text


HARNESS_PAGE = """\
<!-- file: greeting.txt -->
```text
hello
```

```sh
export GREETING="$(cat greeting.txt)"
tail -f /dev/null &
echo "started"
```

```sh
test "$GREETING" = hello && echo "carried over"
```

```sh
false
echo "never"
```

```sh
true
```

<!-- expect: goodbye -->
```python
print("hello")
```

```console
$ echo one; echo two
two
$ echo three
four
$ (exit 3)
```

```sh
sleep 1
```
"""


@pytest.mark.redis
def test_the_harness_catches_what_a_page_gets_wrong(runner: Runner) -> None:
    """Exports carry over, and a failing, silent, sleeping or wrong-output block is a failure."""
    page = parse_page("made-up.md", HARNESS_PAGE)
    assert not page.problems
    run = runner.open(page)
    try:
        results = {block.line: run.run_through(block) for block in page.blocks if block.lang != "text"}
        by_order = [results[line] for line in sorted(results)]
        started, carried, failing, silent, wrong_expect, console, sleeping = by_order
        assert started.ok and "started" in started.message
        assert (run.cwd / "greeting.txt").read_text() == "hello\n"
        assert carried.ok and "carried over" in carried.message
        assert not failing.ok and "exit status 1" in failing.message and "never" not in failing.message
        assert not silent.ok and "printed nothing" in silent.message
        assert not wrong_expect.ok and "goodbye" in wrong_expect.message
        assert not console.ok
        assert "did not print ['four']" in console.message and "exited 3" in console.message
        assert "two" not in console.message.split("did not print")[0]  # the first command matched
        assert not sleeping.ok and "sleeps" in sleeping.message
        groups = list(run.groups)
    finally:
        runner.close()
    assert groups and not any(_group_alive(pgid) for pgid in groups), "a background process outlived its page"
