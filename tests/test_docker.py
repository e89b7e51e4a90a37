"""No container engine runs in CI: check what can be checked without one (issue 13, item 9).

The compose file parses; every service runs a real `catalog` command with options it accepts; in
each profile every queue some task is routed to has a consumer, and the CPU profile needs no
GPU; every volume a service mounts exists in the image, owned by the non-root user; the image
installs no test or bench extras and the libraries `catalog models import` needs; passwords are
compose secrets read through `*_FILE` settings, never values in the file; every long-running
service has a healthcheck that runs the matching `catalog health` check.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from worker.celery_app import QUEUES, expand_queues, routed_queues
from worker.cli.main import main
from worker.config import ENV_PREFIX, SECRET_FILE_FIELDS, Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PROFILES = ("cpu", "gpu")
#: What each long-running catalog command's healthcheck must run.
HEALTH_OF = {"worker": "worker", "ingest": "ingest", "beat": "beat", "api": "api"}


def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def catalog_services() -> dict[str, dict[str, Any]]:
    """Services that run the catalog image with its `catalog` entry point."""
    return {name: svc for name, svc in services().items()
            if svc.get("image", "").startswith("catalog-worker") and "entrypoint" not in svc}


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += " " + line.removesuffix("\\").strip() if pending else line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            out.append((keyword.upper(), rest.strip()))
            pending = ""
    return out


def run_words() -> list[list[str]]:
    """Each shell command of every RUN, split into words."""
    commands = []
    for keyword, rest in instructions():
        if keyword == "RUN":
            for part in re.split(r"&&|\|\||;|\|", rest):
                words = shlex.split(part.strip())
                if words:
                    commands.append(words)
    return commands


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def active(profile: str) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services().items()
            if not svc.get("profiles") or profile in svc["profiles"]}


def resolve(args: list[str]) -> click.Command:
    """The catalog command ``args`` runs, parsed as click would (unknown options fail)."""
    command: click.Command = main
    words = list(args)
    while isinstance(command, click.Group):
        assert words, f"{args}: a command group needs a sub-command"
        sub = command.commands.get(words[0])
        assert sub is not None, f"{args}: unknown sub-command {words[0]!r}"
        command, words = sub, words[1:]
    command.make_context(command.name or "", words)  # raises on an option it does not take
    return command


def test_dockerfile_copies_paths_that_exist_and_the_context_lets_through() -> None:
    sources = [src for keyword, rest in instructions() if keyword == "COPY"
               for src in rest.split()[:-1] if not src.startswith("--")]
    assert sources
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    included = [line[1:] for line in ignore if line.startswith("!")]
    for src in sources:
        assert (ROOT / src).exists(), src
        assert any(src == inc or src.startswith(inc + "/") for inc in included), f"{src} not in the context"
    assert "*" in ignore  # everything else (docker/secrets among it) stays out of the build context


def test_compose_services_run_real_catalog_commands_with_real_settings() -> None:
    assert {"postgres", "redis", "migrate", "ingest", "worker-cpu", "worker-gpu", "beat", "api"} <= set(services())
    for svc in catalog_services().values():
        resolve(svc["command"])
        test = (svc.get("healthcheck") or {}).get("test") or []
        if test[1:2] == ["catalog"]:
            resolve(test[2:])
    redis_cmd = " ".join(services()["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "noeviction" in redis_cmd
    # ... and real settings: a misspelt variable would be ignored without a word.
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    known |= {f"{ENV_PREFIX}{name.upper()}_FILE" for name in SECRET_FILE_FIELDS}
    for name, svc in services().items():
        for key in environment(svc):
            assert not key.startswith(ENV_PREFIX) or key in known, f"{name}: unknown setting {key}"


@pytest.mark.parametrize("profile", PROFILES)
def test_every_routed_queue_has_a_consumer_in_each_profile(profile: str) -> None:
    assert any(profile in (svc.get("profiles") or []) for svc in services().values()), f"no {profile} profile"
    consumed: set[str] = set()
    for svc in active(profile).values():
        cmd = svc.get("command") or []
        if svc in catalog_services().values() and cmd[:1] == ["worker"]:
            queues = next((cmd[i + 1] for i, a in enumerate(cmd) if a in ("-Q", "--queues")), None)
            consumed.update(expand_queues(queues) if queues else QUEUES)
    assert set(routed_queues()) <= consumed, f"{profile}: nobody consumes {set(routed_queues()) - consumed}"


def test_the_cpu_profile_needs_no_gpu() -> None:
    for name, svc in active("cpu").items():
        assert "nvidia" not in str(svc.get("deploy", "")), f"{name} reserves a GPU in the cpu profile"
        assert environment(svc).get(f"{ENV_PREFIX}DEVICE") != "cuda", name


def test_mounted_volumes_exist_in_the_image_owned_by_catalog() -> None:
    created = {w for words in run_words() if words[:1] == ["mkdir"] for w in words[1:] if not w.startswith("-")}
    owned = {w for words in run_words() if words[:1] == ["chown"] and "-R" in words
             and words[words.index("-R") + 1].split(":")[0] == "catalog"
             for w in words[words.index("-R") + 2:]}
    assert ("USER", "catalog") in instructions()
    data_dir = next(rest.split("CATALOG_DATA_DIR=")[1].split()[0] for kw, rest in instructions()
                    if kw == "ENV" and "CATALOG_DATA_DIR=" in rest)
    for name, svc in catalog_services().items():
        targets = {str(v).split(":")[1] for v in svc.get("volumes") or []}
        for target in targets:
            assert target in created, f"{name}: {target} is not created in the image"
            assert any(target == o or target.startswith(o.rstrip("/") + "/") for o in owned), \
                f"{name}: {target} is not owned by catalog"
        if svc["command"][:1] == ["worker"]:  # where the models and the artifacts go by default
            assert {f"{data_dir}/models", f"{data_dir}/artifacts"} <= targets, name
        if svc["command"][:1] == ["api"]:  # thumbnails
            assert f"{data_dir}/artifacts" in targets


def test_image_installs_the_runtime_only() -> None:
    pip = [words for words in run_words() if "pip" in words[0] and "install" in words]
    assert pip
    for words in pip:
        for word in words:
            extras = re.fullmatch(r"\.\[([\w,-]+)\]", word)
            if extras:
                assert set(extras.group(1).split(",")) <= {"monitor"}, word
    assert not any("bootstrap" in " ".join(words) for words in run_words())  # it installs test,bench
    apt = [w for words in run_words() if words[:2] == ["apt-get", "install"] for w in words]
    assert {"libvulkan1", "libomp5"} <= set(apt)


def test_passwords_are_compose_secrets_read_through_file_settings() -> None:
    spec = compose()
    declared = spec.get("secrets") or {}
    for name, secret in declared.items():
        assert str(secret.get("file", "")).startswith("./secrets/"), name
    assert (DOCKER / "secrets" / ".gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"]
    allowed_files = {f"{ENV_PREFIX}{name.upper()}_FILE" for name in SECRET_FILE_FIELDS}
    for name, svc in services().items():
        env = environment(svc)
        mounted = set(svc.get("secrets") or [])
        for key, value in env.items():
            assert not re.search(r"://[^/@\s]*:[^/@\s]+@", value), f"{name}: {key} carries a password"
            if key.endswith("_FILE"):
                secret = value.removeprefix("/run/secrets/")
                assert value.startswith("/run/secrets/") and secret in mounted and secret in declared, \
                    f"{name}: {key}={value} is not one of its secrets"
                assert key in allowed_files or not key.startswith(ENV_PREFIX), f"{name}: {key} is not read by catalog"
            else:
                assert not re.search(r"(PASSWORD|SECRET|_URL)$", key), f"{name}: {key} is a plain value"
        if svc in catalog_services().values():
            assert {f"{ENV_PREFIX}DATABASE_URL_FILE", f"{ENV_PREFIX}BROKER_URL_FILE"} <= set(env), name
    redis_cmd = " ".join(services()["redis"]["command"])
    assert re.search(r"requirepass \$\$\(cat /run/secrets/redis_password\)", redis_cmd)
    assert environment(services()["postgres"]).get("POSTGRES_PASSWORD_FILE") == "/run/secrets/postgres_password"


def test_redis_is_published_on_a_chosen_private_interface() -> None:
    ports = [str(p) for p in services()["redis"].get("ports") or []]
    assert ports == ["${CATALOG_REDIS_BIND:-127.0.0.1}:6379:6379"]


def test_long_running_services_have_healthchecks() -> None:
    for name, svc in services().items():
        if svc.get("restart") == "no":  # one-shot (migrate)
            continue
        test = (svc.get("healthcheck") or {}).get("test")
        assert test, f"{name} has no healthcheck"
        if svc in catalog_services().values():
            role = HEALTH_OF[svc["command"][0]]
            assert test[:4] == ["CMD", "catalog", "health", role], f"{name}: {test}"


def test_workers_and_ingest_serve_metrics() -> None:
    for name, svc in catalog_services().items():
        if svc["command"][0] in ("worker", "ingest"):
            port = environment(svc).get(f"{ENV_PREFIX}METRICS_PORT", "0")
            assert int(port) > 0 and port in [str(p) for p in svc.get("expose") or []], name


def test_flower_comes_from_the_monitor_extra() -> None:
    flower = services().get("flower")
    if flower is None:
        pytest.skip("no flower service")
    assert flower["profiles"] == ["monitoring"] and flower["entrypoint"] == ["celery"]
    assert flower["command"][:3] == ["--app", "worker.celery_app", "flower"]
    assert any('.[monitor]' in words for words in run_words())
