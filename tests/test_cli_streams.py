"""What the `prefix-attn` commands write where: results on standard output (so that they can
be piped), progress, notes and warnings on standard error."""
import json

import pytest

from prefix_attn import cli

pytestmark = pytest.mark.hf


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i % 3}:", "completion": f" answer {i % 4}"}) + "\n"
                            for i in range(12)))
    return str(path)


def test_train_writes_only_its_summary_to_standard_output(data, tmp_path, capsys):
    """The eval losses ("step N: eval loss X") went to standard output (tqdm's write defaults to
    it) while the bar and every note went to standard error: `train ... > result` mixed them
    into the one result line, --no-progress or not."""
    out = str(tmp_path / "run")
    assert cli.main(["train", data, "-o", out, "--max-steps", "4", "--eval-every", "2",
                     "--num-virtual-tokens", "4", "--batch-size", "4", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [captured.out.strip()]
    assert captured.out.startswith("trained 4 steps, last loss ")
    assert "step 2: eval loss " in captured.err and "step 4: eval loss " in captured.err
