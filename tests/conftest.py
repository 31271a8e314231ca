"""Shared fixtures. Each section is self-contained; append new sections below the last one."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

# --- PostgreSQL: a throwaway cluster from Debian's postgresql package, one per test session --------------------------


_database_numbers = itertools.count(1)


@dataclass(frozen=True)
class PostgresCluster:
    port: int

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> tuple[str, str]:
        """A new empty database: (name, SQLAlchemy URL)."""
        name = f"vigil_t{next(_database_numbers)}"
        self.admin(f"CREATE DATABASE {name}")
        return name, self.url(name)

    def admin(self, sql: str) -> None:
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(sql)


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        pytest.fail(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin; "
            "run `make test` (it installs Debian's postgresql package), or `apt-get install -y postgresql`",
            pytrace=False,
        )
    return Path(found[-1]).parent


def _as_postgres(args: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root; CI runs as root, so drop to the postgres system user there."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], what: str) -> None:
    done = subprocess.run(_as_postgres(args), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.fail(f"{what} failed ({' '.join(args)}):\n{done.stdout}{done.stderr}", pytrace=False)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    bin_dir = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="vigil-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, user="postgres", group="postgres")
    data, log, port = root / "data", root / "server.log", _free_port()
    _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"],
         "initdb")
    options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"],
         f"starting PostgreSQL (log: {log})")
    try:
        yield PostgresCluster(port)
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """``postgresql+psycopg://postgres@127.0.0.1:PORT/vigil_test``: an empty database shared by the whole session."""
    postgres_cluster.admin("CREATE DATABASE vigil_test")
    return postgres_cluster.url("vigil_test")


@pytest.fixture
def fresh_postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """A new empty database for one test, dropped afterwards (for tests that need a schema of their own)."""
    name, url = postgres_cluster.create_database()
    yield url
    postgres_cluster.admin(f"DROP DATABASE {name} WITH (FORCE)")


def pytest_collection_modifyitems(session, config, items):
    """Demo-backed modules last: the demo their import starts in the background (tests/_shared_fixtures.py) then has
    the rest of the suite's time to finish on the second core."""
    items.sort(key=lambda item: item.path.name in ("test_e2e.py", "test_report.py"))
