"""``prefix-attn train`` on a full disk (a file-size limit, ``ulimit -f``): the checkpoint's
write failed inside torch's zip writer, "[enforce fail at inline_container.cc] unexpected pos",
a traceback naming neither the file nor the cause. Now an error naming both, the checkpoint
on disk kept, and the run goes on with --resume once there is room."""
import json
import os
import resource
import subprocess
import sys

import pytest

from prefix_attn import train

pytestmark = pytest.mark.hf

FAST = ["--num-virtual-tokens", "4", "--batch-size", "4", "--no-progress", "--eval-every", "0"]


def test_a_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i % 3}:", "completion": f" answer {i % 4}"})
                            + "\n" for i in range(8)))
    first = str(tmp_path / "first")
    assert train.main([str(data), "-o", first, "--max-steps", "1", *FAST]) == 0
    out = str(tmp_path / "out")
    argv = [sys.executable, "-m", "prefix_attn.cli", "train", str(data), "-o", out,
            "--model", os.path.join(first, "base_model"), "--max-steps", "4", "--save-every", "2", *FAST]
    limit = os.path.getsize(os.path.join(first, "checkpoint.pt")) // 2  # the log's lines fit

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = subprocess.run(argv, capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert f"cannot write the checkpoint {os.path.join(out, 'checkpoint.pt')}: File too large" in run.stderr
    assert "no checkpoint was saved" in run.stderr
    assert sorted(os.listdir(out)) == ["log.jsonl"]  # no temporary file left
    # with room again: the same command starts over (no checkpoint to resume from)
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))] == [1, 2, 3, 4]
