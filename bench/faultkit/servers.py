"""Postgres and Redis servers that belong to the fault suite alone.

Both live in a temporary directory, listen on 127.0.0.1 on ports of their own (55432 and
56379 unless taken), and are stopped and restarted by the scenarios. They are never the
machine's shared servers, which other people's tests use at the same time.

Postgres refuses to run as root, so when the suite runs as root its commands run as the
``postgres`` OS user (``runuser``) and its directory is owned by that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psycopg2
import redis


class ServerError(RuntimeError):
    """A server could not be started or stopped; the message carries its log tail."""


def free_port(preferred: int, attempts: int = 200) -> int:
    """``preferred`` if nothing listens there, else the next free port above it."""
    for port in range(preferred, preferred + attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ServerError(f"no free port in {preferred}..{preferred + attempts}")


def postgres_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin with initdb, else wherever initdb is on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def missing_tools() -> list[str]:
    """What this machine lacks to run the suite (empty when everything is there)."""
    missing = []
    if postgres_bin_dir() is None:
        missing.append("initdb/pg_ctl (PostgreSQL server binaries)")
    if shutil.which("redis-server") is None:
        missing.append("redis-server")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing.append("a 'postgres' OS user (Postgres will not run as root)")
        if shutil.which("runuser") is None:
            missing.append("runuser")
    return missing


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class PostgresServer:
    """A throwaway cluster: ``init()`` once, then ``start()`` / ``stop()`` as often as a
    scenario likes; ``teardown()`` stops it whatever state it is in."""

    def __init__(self, root: Path, port: int) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise ServerError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.bin = bin_dir
        self.root = root / "pg"
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = port
        self._as_postgres = os.geteuid() == 0

    # --- commands ------------------------------------------------------------------------
    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bin / tool), *args]
        return ["runuser", "-u", "postgres", "--", *cmd] if self._as_postgres else cmd

    def _run(self, tool: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(self._cmd(tool, *args), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise ServerError(f"{tool} {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n"
                              f"{done.stderr}\n{_tail(self.log)}")
        return done

    def init(self) -> None:
        self.root.mkdir(parents=True)
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        # --no-sync only skips syncing the freshly created files; the running server keeps
        # fsync on, like production.
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                   f"-c unix_socket_directories={self.root} -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` disconnects every client and shuts down cleanly; ``immediate`` is a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return self.data.exists() and self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            if self.running():
                self.stop("immediate")

    # --- addresses -----------------------------------------------------------------------
    def dsn(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database} connect_timeout=3"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        conn = psycopg2.connect(self.dsn())
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()


class RedisServer:
    """``redis-server`` with AOF on (``appendfsync everysec``, ``noeviction``), as README.md
    advises for production, so a restart keeps the stream and the queues."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root / "redis"
        self.log = self.root / "server.log"
        self.port = port
        self.popen: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=10,
                           socket_connect_timeout=3)

    def start(self, timeout: float = 30) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.popen = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
             "--dir", str(self.root), "--logfile", str(self.log), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise ServerError(f"redis-server exited with {self.popen.returncode}:\n{_tail(self.log)}")
            client = self.client()
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.1)
            finally:
                client.close()
        raise ServerError(f"redis-server did not answer within {timeout}s:\n{_tail(self.log)}")

    def stop(self, timeout: float = 30) -> None:
        """A clean shutdown: on SIGTERM Redis flushes the AOF, then exits."""
        if self.popen is None or self.popen.poll() is not None:
            return
        os.kill(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=30)

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(timeout=10)
        with contextlib.suppress(Exception):
            self.kill()
