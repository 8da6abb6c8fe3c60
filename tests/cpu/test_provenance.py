"""Where results come from: every results file's device, date and commit."""

from __future__ import annotations

import datetime
import json

from vllm_bitdecode.provenance import git_commit, gpu_slug, results_doc, write_results


def test_commit_from_the_environment_wins(monkeypatch):
    monkeypatch.setenv("BITDECODE_COMMIT", "abc1234+patch")
    assert git_commit() == "abc1234+patch"


def test_results_doc_leads_with_device_date_and_commit(monkeypatch):
    monkeypatch.setenv("BITDECODE_COMMIT", "abc1234")
    doc = results_doc("NVIDIA H200", records=[{"ms": 1.0}], bits=4)
    assert list(doc)[:3] == ["device", "date", "commit"]
    assert doc["device"] == "NVIDIA H200" and doc["commit"] == "abc1234"
    assert doc["date"] == datetime.date.today().isoformat()
    assert doc["records"] == [{"ms": 1.0}] and doc["bits"] == 4


def test_write_results_makes_the_folder_and_round_trips(tmp_path):
    path = tmp_path / "results" / f"verify_{gpu_slug('NVIDIA H200')}.json"
    doc = {"device": "NVIDIA H200", "records": [{"ms": 0.25, "batch": 8}]}
    write_results(doc, path)
    assert path.name == "verify_h200.json"
    assert json.loads(path.read_text()) == doc


def test_write_results_replaces_the_old_document_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "e2e_h200.json"
    write_results({"records": [1]}, path)
    write_results({"records": [1, 2]}, path)
    assert json.loads(path.read_text()) == {"records": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e2e_h200.json"]
