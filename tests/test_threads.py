"""CPU threads of the `loraforge` command (loraforge/core/threads.py): as many as idle cores unless the user set
OMP_NUM_THREADS, MKL_NUM_THREADS or OPENBLAS_NUM_THREADS (the oversubscription they avoid is measured in
benchmarks/RESULTS.md; a timing has no place in a test)."""

import os

import pytest
import torch
from conftest import invoke

from loraforge.core.threads import THREAD_VARS, default_threads, idle_cores


def test_idle_cores_is_cores_less_the_load_and_at_least_one():
    assert [idle_cores(2, 0.1), idle_cores(2, 0.6), idle_cores(2, 2.4), idle_cores(16, 3.6), idle_cores(2, 11)] == [
        2,
        1,
        1,
        12,
        1,
    ]
    assert [idle_cores(16, 0.2, processes=4), idle_cores(16, 3.6, processes=8), idle_cores(2, 0, processes=4)] == [
        4,
        1,
        1,
    ]


@pytest.fixture
def unset(monkeypatch):
    for var in THREAD_VARS:
        monkeypatch.delenv(var, raising=False)  # restored after the test, set or not
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


def test_the_cli_takes_the_idle_cores_before_any_work(unset, tmp_path):
    unset.delenv("LOCAL_WORLD_SIZE", raising=False)
    unset.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    unset.setattr(os, "getloadavg", lambda: (2.7, 1.0, 1.0))  # 3 cores busy with other work: 1 left
    res = invoke("verify", tmp_path / "none")  # any command: the group sets threads before it runs
    assert res.exit_code == 1
    assert [os.environ[v] for v in THREAD_VARS] == ["1"] * 3 and torch.get_num_threads() == 1


def test_a_thread_count_the_user_set_wins(unset, tmp_path):
    unset.setenv("OMP_NUM_THREADS", "3")
    unset.setattr(os, "getloadavg", lambda: (50.0, 1.0, 1.0))
    torch.set_num_threads(3)
    assert default_threads() is None
    invoke("verify", tmp_path / "none")
    assert os.environ["OMP_NUM_THREADS"] == "3" and "MKL_NUM_THREADS" not in os.environ and torch.get_num_threads() == 3
