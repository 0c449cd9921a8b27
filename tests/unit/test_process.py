from __future__ import annotations

import multiprocessing

import pytest

from watchdog_kv import process


@pytest.mark.parametrize(
    "name,role,rank",
    [
        ("EngineCore", "engine_core", 0),
        ("EngineCore_DP1", "engine_core", 1),
        ("VllmWorker-0", "worker", 0),
        ("VllmWorker-3", "worker", 3),
        ("ApiServer_2", "api_server", 2),
        ("SomethingElse", "other", None),
    ],
)
def test_roles_from_vllm_process_names(monkeypatch, name, role, rank):
    monkeypatch.setattr(multiprocessing.current_process(), "name", name)
    ident = process.detect()
    assert (ident.role, ident.rank, ident.process_name) == (role, rank, name)


def test_main_process_without_api_server_is_a_frontend():
    assert process.detect().role == "frontend"


def test_records_round_trip_with_liveness(tmp_path):
    rec = process.StatusRecord(
        pid=2**22 + 12345,
        ppid=1,
        role="worker",
        rank=0,
        process_name="VllmWorker-0",
        server="decode-0",
    )
    process.write_record(tmp_path, rec)
    (tmp_path / "procs" / "junk.json").write_text("{not json")
    [read] = process.read_records(tmp_path)
    assert read["role"] == "worker" and read["server"] == "decode-0"
    assert read["alive"] is False  # no such pid
