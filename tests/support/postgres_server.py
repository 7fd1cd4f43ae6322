"""A real PostgreSQL server for the tests: Debian's server binaries (`/usr/lib/postgresql/*/bin`; the
`postgresql` package is installed with apt-get when they are missing), initialised and run as the `postgres`
user (the server refuses root) in a folder under /tmp that user owns, on a free loopback port, with a
password. Only the server runs as that user: it cannot read a virtualenv under root's home. One server per
test session; `create_database` gives each test a fresh database. It may be stopped and started again on
the same port."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg

from tests.support.processes import free_port

USER = "postgres"
PASSWORD = "pg-test-secret-4b1d"


def server_bindir() -> Path:
    """The newest installed server's bin folder, installing Debian's `postgresql` package when none is."""
    def found() -> Path | None:
        dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
        return Path(dirs[-1]).parent if dirs else None

    bindir = found()
    if bindir is None and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postgresql"]):
            subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
        bindir = found()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin and `apt-get install "
                           "postgresql` did not provide them; install Debian's postgresql package to run these tests")
    return bindir


def as_postgres(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", USER, "--", *args], capture_output=True, text=True, timeout=timeout,
                          cwd="/tmp")


class PostgresServer:
    def __init__(self) -> None:
        self.bindir = server_bindir()
        self.port = free_port()
        try:
            owner = pwd.getpwnam(USER)
        except KeyError:
            raise RuntimeError(f"no `{USER}` user: install Debian's postgresql package") from None
        self.workdir = Path(tempfile.mkdtemp(prefix="router-pg-"))  # /tmp is traversable; pytest's tmp is not
        os.chown(self.workdir, owner.pw_uid, owner.pw_gid)
        self.data = self.workdir / "data"
        pwfile = self.workdir / "pw"
        pwfile.write_text(PASSWORD)
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        r = as_postgres(str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile),
                        "-A", "scram-sha-256", "-E", "UTF8", "--no-sync")
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stdout}{r.stderr}")

    def url(self, dbname: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> PostgresServer:
        r = as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.workdir / "log"), "-w",
                        "-t", "30", "-o", f"-h 127.0.0.1 -p {self.port} -k {self.workdir} -c fsync=off "
                        "-c max_connections=200", "start")
        if r.returncode != 0:
            log = (self.workdir / "log").read_text(errors="replace") if (self.workdir / "log").exists() else ""
            raise RuntimeError(f"postgres did not start: {r.stdout}{r.stderr}{log[-2000:]}")
        return self

    def stop(self, mode: str = "fast") -> None:
        as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}".encode())
        return self.url(name)
