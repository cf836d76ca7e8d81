"""Sweeps on a real PostgreSQL (issue 33): a throwaway cluster of Debian's ``postgresql`` (which ``make test`` installs
when it is missing), two ``medseg sweep`` processes adding trials to one study in it, and the study's files as a
SQLite study gives them. PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml

from medseg.cli import main
from test_sweep import SCRIPT, make_tiny, read_trials, sweep_args, write_space

SPACE = "optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
BINARIES = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster in a temporary folder on a loopback port, with a database ``medseg``; its URL.

    Stopped and deleted when the module's tests are done.
    """
    assert BINARIES, "PostgreSQL is not installed: make test installs it (apt-get install postgresql)"
    bin_dir = BINARIES[-1].parent
    folder = Path(tempfile.mkdtemp(prefix="medseg-postgres-"))
    as_server = []
    if os.geteuid() == 0:  # initdb and postgres refuse root
        server = pwd.getpwnam("postgres")
        os.chown(folder, server.pw_uid, server.pw_gid)
        as_server = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()

    def run(*command: str) -> None:
        done = subprocess.run([*as_server, *command], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, f"{' '.join(command)}: {done.stdout}{done.stderr}"

    run(str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "--username=postgres", "--encoding=UTF8")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w", "start")
    try:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "medseg")
        yield f"postgresql://postgres@127.0.0.1:{port}/medseg"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_data) -> Path:
    return make_tiny(tmp_path_factory.mktemp("sweep") / "tiny", shared_data)


def test_two_processes_add_trials_to_one_postgresql_study_with_the_files_of_a_sqlite_one(postgres, tiny, tmp_path):
    assert SCRIPT is not None, f"no medseg console script beside {sys.executable}"
    space = write_space(tmp_path / "space.yaml", SPACE)
    study = tmp_path / "study"
    command = [SCRIPT, *sweep_args(tiny, study, space, "--trials", "1", "--storage", postgres)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0 and "1 added now" in out and "Traceback" not in err, out + err
    trials = optuna.load_study(study_name="medseg", storage=postgres).get_trials()
    assert sorted(trial.number for trial in trials) == [0, 1]
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)

    sqlite = tmp_path / "sqlite"
    assert main(sweep_args(tiny, sqlite, space, "--trials", "2", "--quiet")) == 0
    on_postgres, on_sqlite = read_trials(study), read_trials(sqlite)
    assert len(on_postgres) == len(on_sqlite) == 2 and list(on_postgres[0]) == list(on_sqlite[0])
    best = yaml.safe_load((study / "best.yaml").read_text())
    assert best.keys() == yaml.safe_load((sqlite / "best.yaml").read_text()).keys()
    number = max(trials, key=lambda trial: trial.value).number
    assert [row for row in on_postgres if row["trial"] == str(number)], on_postgres


def test_a_postgresql_url_without_its_driver_names_the_extra(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if medseg[postgres] were not installed
    space = write_space(tmp_path / "space.yaml", SPACE)
    args = sweep_args(tiny, tmp_path / "study", space, "--trials", "1", "--storage", "postgresql://user@127.0.0.1:1/db")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'medseg[postgres]'" in err, err
