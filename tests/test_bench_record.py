"""bench/record.py: what every CPU result records of its machine, versions, date and load."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))
import record  # noqa: E402


def test_environment_records_versions_date_and_load_before_and_after():
    env = record.cpu_environment(load_before=[1.5, 1.0, 0.5])
    assert env["torch"] and env["date"] and env["load_before"] == 1.5 and "load" in env
    for name in ("transformers", "peft"):
        assert name in env                               # None when not installed
    pytest.importorskip("transformers")
    import transformers
    assert env["transformers"] == transformers.__version__


def test_provenance_says_not_recorded_for_what_an_older_result_lacks():
    new = {"date": "2026-12-06T01:02:03+00:00", "torch": "2.13", "transformers": "5.25",
           "load_before": 1.25, "load": 2.5}
    assert record.provenance(new) == ("2026-12-06, torch 2.13, transformers 5.25, "
                                      "load average 1.25 before / 2.50 after")
    old = {"torch": "2.13", "load": 2.5}
    assert record.provenance(old) == ("date not recorded, torch 2.13, transformers not "
                                      "recorded, load average not recorded before / 2.50 after")
