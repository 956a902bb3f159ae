"""docker-compose.yml, Dockerfile and .dockerignore, checked without Docker.

Docker cannot run where the tests run, so these tests parse the files and check them against the
project itself: every command a container runs must be a real ``flexq`` subcommand with flags its
parser accepts, every healthcheck program must exist in the image that runs it, no secret may be
written into the file, and the image must install the packages and console script pyproject.toml
declares.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import inspect
import io
import json
import re
import shlex
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from flexq import cli as flexq_cli
from simulator import cli as sim_cli

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

SERVICES = ("redis", "worker", "simulator", "flexq", "metrics", "prometheus", "grafana")
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# ${VAR}, ${VAR:-} or ${VAR-}: taken from the shell, no default that could hold a secret
BARE_INTERPOLATION = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?-)?\}")
DEFAULTED = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-(?P<default>[^}]*)\}")
GOOGLE_API_KEY_SHAPE = re.compile(r"AIza[0-9A-Za-z_-]{20,}")
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# -- loading -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict), "docker-compose.yml is not a mapping"
    assert isinstance(doc.get("services"), dict), "docker-compose.yml has no services mapping"
    return doc


@pytest.fixture(scope="module")
def compose_comments() -> list[str]:
    """The comment lines of docker-compose.yml (its usage notes), without the leading '#'."""
    lines = COMPOSE.read_text(encoding="utf-8").splitlines()
    return [line.strip()[1:].strip() for line in lines if line.strip().startswith("#")]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def exec_form(args: str, instruction: str) -> list[str]:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"{instruction} {args!r} is not in exec (JSON array) form")
    assert isinstance(value, list), f"{instruction} is not a JSON array"
    assert all(isinstance(v, str) for v in value), f"{instruction} has a non-string item"
    return value


def last_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    froms = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert froms, "Dockerfile has no FROM"
    return instructions[froms[-1]:]


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    svc = compose["services"].get(name)
    assert isinstance(svc, dict), f"service {name!r} is missing from docker-compose.yml"
    return svc


def runs_our_image(svc: dict[str, Any]) -> bool:
    return "build" in svc


def environment(svc: dict[str, Any]) -> dict[str, str | None]:
    env = svc.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", "KEY"]
        pairs = (item.partition("=") for item in env)
        return {key: (value if sep else None) for key, sep, value in pairs}
    return {key: (None if value is None else str(value)) for key, value in env.items()}


def words(value: str | list[Any]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def command_of(svc: dict[str, Any], dockerfile: list[tuple[str, str]]) -> list[str]:
    """The arguments a service's container passes to the ENTRYPOINT (its command, else the image's CMD)."""
    if "command" in svc:
        return words(svc["command"])
    cmds = [args for keyword, args in last_stage(dockerfile) if keyword == "CMD"]
    assert cmds, "the service has no command and the Dockerfile no CMD"
    return exec_form(cmds[-1], "CMD")


def interpolation_default(value: Any) -> str:
    """``${VAR:-default}`` -> ``default``; a plain value is returned as is."""
    text = str(value)
    match = DEFAULTED.fullmatch(text)
    return match["default"] if match else text


def seconds(duration: Any) -> float:
    text = str(duration)
    parts = DURATION_PART.findall(text)
    assert parts, f"{text!r} is not a compose duration"
    assert "".join(n + u for n, u in parts) == text, f"{text!r} is not a compose duration"
    return sum(float(n) * UNITS_S[u] for n, u in parts)


def mounts(svc: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume of a service, short or long syntax."""
    found = []
    for volume in svc.get("volumes") or []:
        if isinstance(volume, dict):
            found.append((str(volume.get("source", "")), str(volume["target"])))
        else:
            source, _, rest = str(volume).partition(":")
            found.append((source, rest.partition(":")[0]))
    return found


def container_ports(svc: dict[str, Any]) -> set[int]:
    ports = set()
    for port in svc.get("ports") or []:
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(str(port).rsplit(":", 1)[-1].split("/")[0]))
    return ports


# -- what the flexq CLI accepts ------------------------------------------------------------------


def flexq_subcommands() -> set[str]:
    parser = flexq_cli.build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert subparsers, "flexq.cli.build_parser() has no subcommands"
    return set(subparsers[0].choices)


def pre_argparse_commands() -> set[str]:
    """Names ``flexq.cli.main`` dispatches before argparse (``argv[0] == "x"`` / ``argv[0] in (...)``)."""
    tree = ast.parse(inspect.getsource(flexq_cli.main))
    names: set[str] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Compare) and ast.unparse(node.left) == "argv[0]"):
            continue
        for right in node.comparators:
            items = right.elts if isinstance(right, ast.Tuple | ast.List | ast.Set) else [right]
            names |= {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
    return names


@functools.cache
def help_run(name: str) -> subprocess.CompletedProcess[str]:
    """``flexq NAME --help`` in a fresh interpreter (the subcommand's own module is imported for real)."""
    return subprocess.run(
        [sys.executable, "-m", "flexq", name, "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )


def argparse_error(parse: Any, argv: list[str]) -> str | None:
    """Run an argparse parse; its error message, or None when it accepted ``argv``."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            parse(argv)
        except SystemExit as exc:
            return f"exit {exc.code}: {stderr.getvalue().strip()}"
    return None


def simulate_error(argv: list[str]) -> str | None:
    problem = argparse_error(sim_cli._parser().parse_args, argv)
    if problem:
        return problem
    try:
        sim_cli._config_from(sim_cli._parser().parse_args(argv))
    except ValueError as err:
        return f"rejected by SimConfig: {err}"
    return None


def flexq_command_error(argv: list[str]) -> str | None:
    """Why ``flexq *argv`` would not start, or None when it is a real subcommand with accepted flags."""
    if not argv:
        return "empty command"
    name, rest = argv[0], argv[1:]
    if name == "simulate":
        return simulate_error(rest)
    if name in pre_argparse_commands():
        run = help_run(name)
        return None if run.returncode == 0 else f"`flexq {name} --help` exited {run.returncode}: {run.stderr[-500:]}"
    if name in flexq_subcommands():
        return argparse_error(flexq_cli.build_parser().parse_args, argv)
    return f"{name!r} is not a flexq subcommand ({sorted(flexq_subcommands() | pre_argparse_commands())})"


def test_the_command_checker_rejects_what_flexq_rejects() -> None:
    """The checker used below must be able to say no (else every command test would pass vacuously)."""
    assert flexq_command_error(["worker", "--concurrency", "10"]) is None
    assert flexq_command_error(["wrker"]) is not None
    assert flexq_command_error(["worker", "--concurency", "10"]) is not None
    assert flexq_command_error(["simulate", "--port", "8089"]) is None
    assert flexq_command_error(["simulate", "--rate-503", "2"]) is not None  # a probability above 1
    assert flexq_command_error(["simulate", "--no-such-flag"]) is not None
    assert "simulate" in pre_argparse_commands()


# -- the compose file ----------------------------------------------------------------------------


def test_compose_file_is_a_compose_spec_file(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the Compose spec has no top-level version: key (obsolete)"
    missing = [name for name in SERVICES if name not in compose["services"]]
    assert not missing, f"services missing: {missing}"
    for name, svc in compose["services"].items():
        assert ("image" in svc) or ("build" in svc), f"service {name!r} has neither image nor build"


def test_redis_is_redis_7_with_an_append_only_file(compose: dict[str, Any]) -> None:
    redis = service(compose, "redis")
    assert re.fullmatch(r"(docker\.io/)?(library/)?redis:7([.-].*)?", str(redis.get("image"))), redis.get("image")
    argv = words(redis.get("command") or [])
    assert argv[:1] == ["redis-server"], f"redis command {argv} does not run redis-server"
    assert "--appendonly yes" in " ".join(argv), f"AOF is not enabled: {argv}"
    if "--appendfsync" in argv:
        assert argv[argv.index("--appendfsync") + 1] in {"always", "everysec", "no"}
    assert redis.get("restart") == "unless-stopped"


def test_redis_data_lives_in_a_declared_named_volume(compose: dict[str, Any]) -> None:
    sources = [source for source, target in mounts(service(compose, "redis")) if target == "/data"]
    assert sources, "nothing is mounted at /data in the redis service"
    source = sources[0]
    assert source, "the /data mount of redis has no source"
    assert not source.startswith(("/", ".", "~", "$")), f"/data is a bind mount ({source}), not a named volume"
    assert source in (compose.get("volumes") or {}), f"volume {source!r} is not declared under top-level volumes:"


def test_redis_healthcheck_pings(compose: dict[str, Any]) -> None:
    test = words(service(compose, "redis").get("healthcheck", {}).get("test") or [])
    program = shlex.split(test[1]) if test[:1] == ["CMD-SHELL"] else test[1:]
    assert program[:2] == ["redis-cli", "ping"], f"redis healthcheck {test} is not `redis-cli ping`"


def test_worker_is_replicated_supervised_and_waits_for_redis(compose: dict[str, Any]) -> None:
    worker = service(compose, "worker")
    replicas = (worker.get("deploy") or {}).get("replicas")
    assert replicas is not None, "worker has no deploy.replicas"
    assert int(interpolation_default(replicas)) >= 1, f"deploy.replicas {replicas!r} is not a count >= 1"
    assert worker.get("restart") == "unless-stopped"
    assert "profiles" not in worker, "the worker must start with a plain `docker compose up`"
    depends_on = worker.get("depends_on")
    assert isinstance(depends_on, dict), f"worker needs depends_on: redis: condition: ... (got {depends_on!r})"
    assert (depends_on.get("redis") or {}).get("condition") == "service_healthy", (
        f"worker does not wait for a healthy redis: depends_on={depends_on!r}"
    )
    assert "healthcheck" in service(compose, "redis"), "service_healthy needs a redis healthcheck"
    grace = worker.get("stop_grace_period")
    assert grace is not None, "worker has no stop_grace_period (default 10 s)"
    assert seconds(grace) >= 15, f"stop_grace_period {grace} leaves too little time to record in-flight attempts"


@pytest.mark.parametrize("name", ["worker", "flexq"])
def test_queue_services_point_at_the_redis_service(compose: dict[str, Any], name: str) -> None:
    env = environment(service(compose, name))
    url = env.get("REDIS_URL")
    assert url, f"{name} has no REDIS_URL"
    parts = urlsplit(url)
    assert parts.scheme in {"redis", "rediss"}, url
    target = compose["services"].get(parts.hostname or "")
    assert target is not None, f"REDIS_URL host {parts.hostname!r} is not a compose service"
    assert str(target.get("image", "")).startswith("redis"), f"REDIS_URL points at {parts.hostname!r}, not Redis"
    assert (parts.port or 6379) == 6379, "inside the compose network Redis listens on 6379"
    for var in ("GEMINI_API_KEY", "GEMINI_BASE_URL", "FLEXQ_CONCURRENCY"):
        assert var in env, f"{name} does not pass {var}"


def test_no_secret_is_written_into_the_compose_file(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for var, value in environment(svc).items():
            if value is None or not SECRET_NAME.search(var):
                continue
            assert BARE_INTERPOLATION.fullmatch(value), (
                f"{name}: {var}={value!r} is a literal; use ${{{var}:-}} and set it in the shell or .env"
            )
        url = environment(svc).get("REDIS_URL") or ""
        password = urlsplit(url).password
        assert password is None or BARE_INTERPOLATION.fullmatch(password), f"{name}: REDIS_URL holds a password"
    assert not GOOGLE_API_KEY_SHAPE.search(COMPOSE.read_text(encoding="utf-8")), "a Google API key is in the file"


def test_simulator_is_opt_in_and_reachable_from_the_workers(
    compose: dict[str, Any], compose_comments: list[str], dockerfile: list[tuple[str, str]]
) -> None:
    sim = service(compose, "simulator")
    assert sim.get("profiles"), "the simulator must be under a profile (not started by a plain `up`)"
    argv = command_of(sim, dockerfile)
    assert argv[:1] == ["simulate"], f"simulator command {argv} does not run `flexq simulate`"
    host = argv[argv.index("--host") + 1] if "--host" in argv else "127.0.0.1"
    assert host == "0.0.0.0", f"the simulator binds {host}: unreachable from other containers (use 0.0.0.0)"
    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 8089
    assert port in container_ports(sim), f"simulator port {port} is not published: {sim.get('ports')}"
    urls = [m for line in compose_comments for m in re.findall(r"GEMINI_BASE_URL=(\S+)", line)]
    assert urls, "the usage notes do not say how to point the workers at the simulator"
    for url in urls:
        parts = urlsplit(url)
        assert parts.hostname == "simulator", f"{url} is not the simulator service's address"
        assert parts.port == port, f"{url} is not the simulator's port {port}"


def test_cli_service_is_one_shot_with_a_data_mount(compose: dict[str, Any]) -> None:
    cli = service(compose, "flexq")
    assert cli.get("profiles"), "the one-shot flexq service must be under a profile (not started by `up`)"
    assert "restart" not in cli or cli["restart"] == "no", "a one-shot service must not restart"
    binds = [source for source, target in mounts(cli) if target == "/data"]
    assert binds, f"flexq mounts nothing at /data: {cli.get('volumes')}"
    assert binds[0].startswith("./"), f"flexq's /data is not a ./… bind mount: {cli.get('volumes')}"
    assert environment(cli).get("REDIS_URL") == environment(service(compose, "worker")).get("REDIS_URL")


def test_every_container_command_is_a_real_flexq_subcommand(
    compose: dict[str, Any], dockerfile: list[tuple[str, str]]
) -> None:
    ours = {name: svc for name, svc in compose["services"].items() if runs_our_image(svc)}
    assert {"worker", "simulator", "flexq"} <= set(ours), f"services built from this repo: {sorted(ours)}"
    problems = {name: flexq_command_error(command_of(svc, dockerfile)) for name, svc in ours.items()}
    assert not {k: v for k, v in problems.items() if v}, problems


def documented_runs(comments: list[str]) -> list[tuple[str, list[str]]]:
    """(service, arguments) of each ``docker compose run [--opts] SERVICE ARGS`` in the usage notes."""
    runs = []
    for line in comments:
        match = re.search(r"docker compose run\s+((?:--?\S+\s+)*)(\S+)(.*)", line)
        if match:
            runs.append((match[2], shlex.split(match[3].split("#")[0])))
    return runs


def test_documented_commands_exist(compose: dict[str, Any], compose_comments: list[str]) -> None:
    text = " ".join(compose_comments)
    real_api = [line for line in compose_comments if "docker compose up -d" in line and "--profile" not in line]
    assert any("GEMINI_API_KEY" in line for line in real_api), (
        "usage notes lack `GEMINI_API_KEY=... docker compose up -d` (redis + workers against the real API)"
    )
    profiles = {p for svc in compose["services"].values() for p in svc.get("profiles") or []}
    for profile in re.findall(r"--profile\s+(\S+)", text):
        assert profile in profiles, f"documented profile {profile!r} is used by no service"
    for name in re.findall(r"--scale\s+([\w.-]+)=\d+", text):
        assert name in compose["services"], f"documented --scale {name} names no service"
    runs = documented_runs(compose_comments)
    assert runs, "usage notes show no `docker compose run --rm flexq ...`"
    pending = []
    for name, argv in runs:
        svc = service(compose, name)
        assert runs_our_image(svc), f"documented `run {name}` is not a flexq service"
        problem = flexq_command_error(argv)
        if problem and argv[0] in pre_argparse_commands() and "No module named 'worker." in problem:
            pending.append(argv[0])  # dispatched by flexq.cli.main, module not written yet
            continue
        assert problem is None, f"documented `flexq {shlex.join(argv)}`: {problem}"
    if pending:
        pytest.skip(f"documented flexq commands not implemented yet: {sorted(set(pending))}")


@pytest.mark.parametrize("name", ["redis", "worker"])
def test_healthcheck_runs_a_program_the_image_has(compose: dict[str, Any], name: str) -> None:
    svc = service(compose, name)
    test = words((svc.get("healthcheck") or {}).get("test") or [])
    assert test[:1] in (["CMD"], ["CMD-SHELL"]), f"{name}: healthcheck.test {test} is not CMD/CMD-SHELL"
    argv = shlex.split(test[1]) if test[0] == "CMD-SHELL" else test[1:]
    assert argv, f"{name}: empty healthcheck"
    program, args = argv[0], argv[1:]
    if program == "redis-cli":
        assert str(svc.get("image", "")).startswith("redis"), f"{name}: redis-cli exists only in the redis image"
    elif program == "arq":
        assert runs_our_image(svc), f"{name}: arq exists only in the flexq image"
        check_arq_healthcheck(args)
    elif program in {"python", "python3"}:
        assert runs_our_image(svc), f"{name}: python exists only in the flexq image"
        assert args[:1] == ["-c"], f"{name}: expected python -c CODE, got {args}"
        assert len(args) >= 2, f"{name}: expected python -c CODE, got {args}"
        compile(args[1], "<healthcheck>", "exec")
    elif program == "flexq":
        assert runs_our_image(svc), f"{name}: flexq exists only in the flexq image"
        assert flexq_command_error(args) is None, flexq_command_error(args)
    else:
        pytest.fail(f"{name}: unexpected healthcheck program {program!r}")


def check_arq_healthcheck(args: list[str]) -> None:
    """``arq --check pkg.mod.Settings``: arq's console script, its --check flag, an importable class."""
    from arq.cli import cli as arq_cli

    scripts = {ep.name for ep in metadata.distribution("arq").entry_points if ep.group == "console_scripts"}
    assert "arq" in scripts, "the installed arq declares no `arq` console script"
    assert "--check" in args, f"arq healthcheck without --check would start a second worker: {args}"
    try:
        ctx = arq_cli.make_context("arq", list(args))
    except click.ClickException as err:
        pytest.fail(f"arq rejects {args}: {err.format_message()}")
    module_name, _, attr = ctx.params["worker_settings"].rpartition(".")
    settings = getattr(importlib.import_module(module_name), attr, None)
    assert settings is not None, f"{ctx.params['worker_settings']} does not exist"
    for attribute in ("redis_settings", "queue_name", "functions"):
        assert hasattr(settings, attribute), f"{settings} is no arq WorkerSettings: no {attribute}"


# -- the image -----------------------------------------------------------------------------------


def test_dockerfile_base_image_and_user(dockerfile: list[tuple[str, str]], pyproject: dict[str, Any]) -> None:
    stage = last_stage(dockerfile)
    base = stage[0][1].split()[0]
    match = re.fullmatch(r"python:3\.(\d+)-slim(-\w+)?", base)
    assert match, f"base image {base} is not python:3.x-slim"
    minimum = re.fullmatch(r">=\s*3\.(\d+)", pyproject["project"]["requires-python"])
    assert minimum, "requires-python is not of the form >=3.N"
    assert int(match[1]) >= int(minimum[1]), f"{base} is older than requires-python"
    users = [args.split(":")[0] for keyword, args in stage if keyword == "USER"]
    assert users, "the image runs as root (no USER)"
    assert users[-1] not in {"root", "0"}, f"the image runs as {users[-1]}"


def test_dockerfile_entrypoint_is_the_console_script(
    dockerfile: list[tuple[str, str]], pyproject: dict[str, Any]
) -> None:
    stage = last_stage(dockerfile)
    entrypoints = [exec_form(args, "ENTRYPOINT") for keyword, args in stage if keyword == "ENTRYPOINT"]
    assert entrypoints, "the Dockerfile has no ENTRYPOINT"
    assert entrypoints[-1] == ["flexq"], f"ENTRYPOINT is {entrypoints[-1]}, not the flexq console script"
    target = pyproject["project"].get("scripts", {}).get("flexq")
    assert target, "pyproject.toml declares no `flexq` console script"
    module_name, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module_name), attr, None)), f"{target} is not callable"
    cmds = [exec_form(args, "CMD") for keyword, args in stage if keyword == "CMD"]
    assert cmds, "the Dockerfile has no CMD"
    assert cmds[-1][:1] == ["worker"], f"default CMD is {cmds[-1]}, not worker"
    assert flexq_command_error(cmds[-1]) is None


def copied_sources(stage: list[tuple[str, str]]) -> list[str]:
    sources = []
    for keyword, args in stage:
        if keyword == "COPY":
            parts = [p for p in args.split() if not p.startswith("--")]
            sources += [p.rstrip("/") for p in parts[:-1]]
    return sources


def test_dockerfile_installs_the_project(dockerfile: list[tuple[str, str]], pyproject: dict[str, Any]) -> None:
    stage = last_stage(dockerfile)
    installs = [i for i, (keyword, args) in enumerate(stage) if keyword == "RUN" and re.search(
        r"pip install (--no-cache-dir (\S+ )*\.|(\S+ )*--no-cache-dir \.)( |$)", args)]
    assert installs, "no `RUN pip install --no-cache-dir .`"
    before_install = copied_sources(stage[: installs[-1]])
    needed = {"pyproject.toml"}
    readme = pyproject["project"].get("readme")
    if isinstance(readme, str):
        needed.add(readme)  # setuptools reads it while building
    needed |= {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    missing = needed - set(before_install) - {"."}
    assert not missing, f"not copied before `pip install .`: {sorted(missing)}"
    for source in copied_sources(stage):
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per .dockerignore line, in order; the last matching rule wins."""
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = "".join(
            ".*" if tok == "**" else "[^/]*" if tok == "*" else "[^/]" if tok == "?" else re.escape(tok)
            for tok in re.split(r"(\*\*|\*|\?)", pattern)
        ).replace(".*/", "(.*/)?")
        rules.append((negate, re.compile(regex)))
    return rules


def dockerignored(path: str) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out: it or a parent folder matches."""
    parts = path.strip("/").split("/")
    ignored = False
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        for negate, regex in dockerignore_rules():
            if regex.fullmatch(prefix):
                ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_small() -> None:
    for path in (".venv/bin/python", ".git/HEAD", ".pytest_cache/v", ".mypy_cache/x", "worker/__pycache__/cli.pyc",
                 "data/out.jsonl", ".env"):
        assert dockerignored(path), f"{path} is sent to the Docker build context"
    for path in ("pyproject.toml", "flexq/cli.py", "producer/store.py", "simulator/cli.py"):
        assert not dockerignored(path), f"{path} is excluded from the build context"


# -- metrics: the exporter, Prometheus, Grafana (deploy/) ------------------------------------------


def option(argv: list[str], name: str, default: str | None = None) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.partition("=")[2]
    return default


def mounted_file(svc: dict[str, Any], target: str) -> Path:
    """The repository file a service bind-mounts at ``target`` (which must exist)."""
    sources = [source for source, at in mounts(svc) if at == target]
    assert sources, f"nothing is mounted at {target}: {svc.get('volumes')}"
    assert sources[0].startswith("./"), f"{target} is not a ./… bind mount: {sources[0]}"
    path = ROOT / sources[0]
    assert path.is_file(), f"{sources[0]} (mounted at {target}) is not a file in the repository"
    return path


def test_workers_serve_their_metrics_on_the_compose_network(compose: dict[str, Any]) -> None:
    from worker.config import WorkerConfig

    env = environment(service(compose, "worker"))
    port, host = env.get("FLEXQ_METRICS_PORT"), env.get("FLEXQ_METRICS_HOST")
    assert port and host, "the workers do not serve /metrics (FLEXQ_METRICS_PORT, FLEXQ_METRICS_HOST)"
    settings = WorkerConfig(metrics_port=interpolation_default(port), metrics_host=host)  # type: ignore[arg-type]
    assert settings.metrics_host == "0.0.0.0", "a worker's metrics on loopback are out of Prometheus's reach"
    assert "ports" not in service(compose, "worker"), "replicas cannot all publish one host port"
    assert "FLEXQ_METRICS_PORT" not in environment(service(compose, "flexq")), (
        "the CLI's `batch` runs workers too: one-shot commands should not serve metrics"
    )


def test_the_exporter_reads_the_workers_queue_without_a_key(compose: dict[str, Any], dockerfile: Any) -> None:
    exporter = service(compose, "metrics")
    argv = command_of(exporter, dockerfile)
    assert argv[:1] == ["metrics"], f"the metrics service runs {argv}, not `flexq metrics`"
    assert option(argv, "--host") == "0.0.0.0", "the exporter must listen beyond its container's loopback"
    assert exporter.get("profiles"), "the metrics stack is opt-in (a profile)"
    env, worker_env = environment(exporter), environment(service(compose, "worker"))
    for var in ("REDIS_URL", "FLEXQ_QUEUE"):
        assert env.get(var) == worker_env.get(var), f"the exporter's {var} is not the workers'"
    assert not any(SECRET_NAME.search(var) for var in env), f"the exporter needs no key: {sorted(env)}"


def prometheus_config(compose: dict[str, Any]) -> dict[str, Any]:
    prom = service(compose, "prometheus")
    assert str(prom.get("image", "")).startswith("prom/prometheus"), prom.get("image")
    path = option(words(prom.get("command") or []), "--config.file", "/etc/prometheus/prometheus.yml")
    assert path is not None
    config = yaml.safe_load(mounted_file(prom, path).read_text(encoding="utf-8"))
    assert isinstance(config, dict) and config.get("scrape_configs"), "the Prometheus config has no scrape_configs"
    return config


def scrape_targets(config: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(job, host, port) of every static target and DNS name of the Prometheus config."""
    found = []
    for job in config["scrape_configs"]:
        for static in job.get("static_configs") or []:
            for target in static["targets"]:
                host, _, port = str(target).rpartition(":")
                found.append((job["job_name"], host, int(port)))
        for dns in job.get("dns_sd_configs") or []:
            assert dns.get("type", "SRV") == "A", "an A lookup of the service name finds every replica"
            found.extend((job["job_name"], name, int(dns["port"])) for name in dns["names"])
    return found


def serves_metrics_on(svc: dict[str, Any], dockerfile: Any) -> int | None:
    """The port a flexq service serves Prometheus metrics on, reachable from other containers."""
    argv = command_of(svc, dockerfile)
    env = environment(svc)
    if argv[:1] == ["metrics"] and option(argv, "--host") == "0.0.0.0":
        return int(option(argv, "--port", "9464") or 0)
    if argv[:1] == ["worker"] and env.get("FLEXQ_METRICS_HOST") == "0.0.0.0" and env.get("FLEXQ_METRICS_PORT"):
        return int(interpolation_default(env["FLEXQ_METRICS_PORT"]))
    return None


def test_prometheus_scrapes_the_services_that_serve_metrics(compose: dict[str, Any], dockerfile: Any) -> None:
    targets = scrape_targets(prometheus_config(compose))
    assert targets, "Prometheus scrapes nothing"
    for job, host, port in targets:
        svc = service(compose, host)
        assert serves_metrics_on(svc, dockerfile) == port, (
            f"job {job}: {host}:{port} is not where service {host!r} serves metrics "
            f"({serves_metrics_on(svc, dockerfile)})"
        )
    serving = {name for name, svc in compose["services"].items()
               if runs_our_image(svc) and serves_metrics_on(svc, dockerfile) is not None}
    assert serving == {"metrics", "worker"}, serving
    assert {host for _, host, _ in targets} == serving, "a service that serves metrics is not scraped"
    prom = service(compose, "prometheus")
    assert prom.get("profiles") == service(compose, "metrics").get("profiles")
    assert 9090 in container_ports(prom)


def test_grafana_reads_prometheus_and_loads_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = service(compose, "grafana")
    assert str(grafana.get("image", "")).startswith("grafana/grafana"), grafana.get("image")
    provisioning = "/etc/grafana/provisioning"
    sources = {target: ROOT / source for source, target in mounts(grafana)}
    [datasources] = [mounted_file(grafana, t) for t in sources if t.startswith(f"{provisioning}/datasources/")]
    [url] = [d["url"] for d in yaml.safe_load(datasources.read_text(encoding="utf-8"))["datasources"]]
    parts = urlsplit(url)
    assert parts.hostname == "prometheus" and parts.port in container_ports(service(compose, "prometheus")), url
    [providers] = [mounted_file(grafana, t) for t in sources if t.startswith(f"{provisioning}/dashboards/")]
    [folder] = [p["options"]["path"] for p in yaml.safe_load(providers.read_text(encoding="utf-8"))["providers"]]
    dashboards = [t for t in sources if t.startswith(folder.rstrip("/") + "/") and t.endswith(".json")]
    assert dashboards, f"no dashboard is mounted in {folder}"
    assert all(mounted_file(grafana, t).resolve() == DASHBOARD.resolve() for t in dashboards)
    env = environment(grafana)
    assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE", "Viewer") == "Viewer", "anonymous users must not edit"
    for port in grafana.get("ports") or []:
        assert str(port).startswith("127.0.0.1:"), f"Grafana is published beyond loopback: {port}"


# -- the Grafana dashboard's PromQL ----------------------------------------------------------------

PROMQL_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                          "bool", "offset", "inf", "nan"})


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (a Grafana ``label_values(metric, label)`` reads its metric)."""
    text = re.sub(r"label_values\(\s*([^,()]+?)\s*,[^)]*\)", r"\1", expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if match[0].lower() in PROMQL_WORDS or text[match.end():].lstrip().startswith("("):
            continue  # a keyword, or a function
        names.add(match[0])
    return names


def sample_names(family_name: str, kind: str) -> set[str]:
    """The names a family's samples are written under in the text format."""
    if kind == "counter":
        return {family_name + "_total", family_name + "_created"}
    if kind == "histogram":
        return {family_name + suffix for suffix in ("_bucket", "_count", "_sum", "_created")}
    if kind == "summary":
        return {family_name, family_name + "_count", family_name + "_sum", family_name + "_created"}
    return {family_name}


def exported_metric_names() -> set[str]:
    """Every metric name flexq writes: ``flexq metrics``' collector and a worker's registry."""
    from types import SimpleNamespace

    from flexq.metrics import FleetCollector
    from worker.metrics import WorkerMetrics

    reader = SimpleNamespace(settings=SimpleNamespace(queue="q"))
    fleet = FleetCollector(reader, loop=None)  # type: ignore[arg-type]  # describe() reads nothing
    families = [(f.name, f.type) for f in fleet.describe()]
    families += [(f.name, f.type) for f in WorkerMetrics().registry.collect()]
    return {name for family, kind in families for name in sample_names(family, kind)}


def dashboard_exprs(node: Any) -> list[str]:
    """Every PromQL text in the dashboard: panel targets' ``expr`` and query variables' ``query``."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                found.append(value["query"])
            else:
                found += dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            found += dashboard_exprs(item)
    return found


def test_the_promql_reader_finds_metric_names() -> None:
    """The checker below must be able to say no."""
    expr = 'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{outcome="ok", x=~"$q"}[$__rate_interval])))'
    assert promql_metric_names(expr) == {"a_bucket"}
    assert promql_metric_names("sum(rate(b_total[1h])) * 3600 / on (queue) c and d offset 5m") == {"b_total", "c", "d"}
    assert promql_metric_names("label_values(flexq_up, queue)") == {"flexq_up"}
    names = exported_metric_names()
    assert {"flexq_attempts_total", "flexq_jobs", "flexq_worker_attempt_latency_seconds_bucket",
            "flexq_worker_calls_in_flight", "process_cpu_seconds_total"} <= names
    assert "flexq_attempts" not in names and "flexq_worker_attempt_latency_seconds" not in names


def test_the_dashboard_names_only_metrics_flexq_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = dashboard["panels"]
    assert len(panels) >= 6 and len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", "panels must use the data source variable"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} is wider than the grid"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    exported = exported_metric_names()
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= len(panels)
    read: set[str] = set()
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} names metrics flexq does not export: {sorted(names - exported)}"
        read |= names
    for wanted in ("flexq_jobs", "flexq_attempts_total", "flexq_worker_attempt_latency_seconds_bucket",
                   "flexq_flow_limit", "flexq_flow_in_flight", "flexq_cost_usd_total"):
        assert wanted in read, f"the dashboard shows nothing of {wanted}"
