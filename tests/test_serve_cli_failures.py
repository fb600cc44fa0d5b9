"""``prefix-attn generate`` when a batch fails after others finished (an out-of-memory error
on a long batch): the answers of the finished batches are kept in OUTPUT.partial, as after
Ctrl-C, instead of being thrown away with the temporary file."""
import json

import pytest

from prefix_attn import serve

pytestmark = pytest.mark.hf


def test_a_failing_batch_keeps_the_finished_answers(tmp_path, monkeypatch, capsys):
    requests = tmp_path / "req.jsonl"
    requests.write_text("".join(json.dumps({"prompt": f"hello {i}"}) + "\n" for i in range(6)))
    answers = tmp_path / "ans.jsonl"
    load = serve._load_model

    def failing_second_batch(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        generate, calls = model.generate, []

        def gen(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("out of memory (injected)")
            return generate(*a, **k)

        model.generate = gen
        return model, tokenizer

    monkeypatch.setattr(serve, "_load_model", failing_second_batch)
    with pytest.raises(RuntimeError, match="out of memory"):
        serve.main(["-i", str(requests), "-o", str(answers), "--batch-size", "2",
                    "--max-new-tokens", "2", "--no-progress"])
    assert not answers.exists()
    kept = [json.loads(line) for line in open(str(answers) + ".partial")]
    assert [r["id"] for r in kept] == [1, 2]
    assert "2 of 6 requests were finished" in capsys.readouterr().err
    assert not list(tmp_path.glob(".tmp-*"))
