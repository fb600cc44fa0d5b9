"""The memory benchmark's measuring helper: peak bytes above the level at the start of a step."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from bench_memory import step_peak_bytes  # noqa: E402

MB = 1 << 20


def test_step_peak_counts_transients_and_frees_of_prepared_blocks():
    def prepare():
        return {"cache": torch.ones(MB // 4)}  # 1 MiB, allocated under the profiler

    def step(state):
        # as a KV cache grows: the new block coexists with the old one, which is then freed
        state["cache"] = torch.cat([state["cache"], torch.ones(MB // 4)])   # +2 MiB (+1 MiB temp) then -1 MiB
        tmp = torch.ones(MB // 2)                                            # +2 MiB
        del tmp
        return state["cache"].sum()

    peak, state, result = step_peak_bytes(prepare, step)
    assert result.item() == MB // 2 and state["cache"].numel() == MB // 2
    # highest level above the start: 1 MiB (new ones) + 2 MiB (cat) = 3 MiB, then 2 - 1 + 2 = 3 MiB
    assert 3 * MB <= peak <= 3 * MB + 64 * 1024, peak
