"""The training CLI's data helpers (prefix_attn.train) and the byte tokenizer (prefix_attn.tiny):
how examples are encoded, the batch order of each epoch, evaluation's mode, vocabulary checks."""
import io
import sys

import pytest
import torch

from prefix_attn import tiny, train, train_data


def test_an_example_is_one_sequence_with_loss_on_the_completion_only():
    """One BOS at the start (none between prompt and completion), EOS after the completion,
    labels -100 over the prompt."""
    tok = tiny.ByteTokenizer()
    ids, labels = train_data.encode_example(tok, "ab", "cd")
    bos, eos, off = tok.bos_token_id, tok.eos_token_id, tok.offset
    c, d = off + ord("c"), off + ord("d")
    assert ids == [bos, off + ord("a"), off + ord("b"), c, d, eos]
    assert labels == [-100, -100, -100, c, d, eos]
    ids, labels = train_data.encode_example(tok, "", "cd")  # no prompt: the completion gets the BOS
    assert ids == labels == [bos, c, d, eos]


def test_each_epoch_has_its_own_order_fixed_by_seed_and_epoch():
    orders = [train.batch_order(6, 2, 0, epoch) for epoch in range(3)]
    assert all(sorted(i for batch in o for i in batch) == list(range(6)) for o in orders)
    assert all(len(batch) == 2 for o in orders for batch in o)
    assert orders[0] != orders[1] != orders[2]
    assert train.batch_order(6, 2, 0, 1) == orders[1]      # a resumed run sees the same batches
    assert train.batch_order(6, 2, 1, 0) != orders[0]      # another seed, another order
    assert [len(b) for b in train.batch_order(5, 2, 0, 0)] == [2, 2, 1]


@pytest.mark.hf
@pytest.mark.parametrize("training", [True, False])
def test_evaluate_restores_the_mode_it_found(training):
    import prefix_attn

    tok = tiny.ByteTokenizer()
    model = tiny.tiny_model("llama")
    prefix_attn.prefix_tuning(model, num_virtual_tokens=2, name="p")
    model.train(training)
    loss = train.evaluate(model, [train_data.encode_example(tok, "", "hello")], 1, tok.pad_token_id, "p")
    assert loss > 0 and model.training is training and model.prefix_bank.training is training


def test_vocab_problem_names_the_first_id_outside_the_vocabulary():
    tok = tiny.ByteTokenizer()
    assert tiny.vocab_problem(tok, [0, 258], 259) is None
    for bad in (259, -1):
        msg = tiny.vocab_problem(tok, [5, bad, 300], 259)
        assert msg.startswith(f"token id {bad} is outside the model's vocabulary of 259 (ids 0..258)")


@pytest.mark.parametrize("side", ["left", "right"])
def test_byte_tokenizer_pads_on_the_side_asked(side):
    tok = tiny.ByteTokenizer()
    enc = tok(["a", "abc"], padding_side=side)
    want = [1, 1, 0, 0] if side == "right" else [0, 0, 1, 1]
    assert enc.attention_mask[0].tolist() == want
    real = enc.input_ids[0][enc.attention_mask[0].bool()].tolist()
    assert real == [tok.bos_token_id, tok.offset + ord("a")]
    assert torch.equal(enc.input_ids[0][~enc.attention_mask[0].bool()],
                       torch.full((2,), tok.pad_token_id))


@pytest.mark.parametrize("cut_tokens", [1, 2])
def test_an_example_losing_only_its_end_token_to_max_length_is_in_the_note(tmp_path, capsys, cut_tokens):
    """--max-length one token short of an example drops just its end-of-text token, which the
    note is for; has_target(labels[max_length:]) skipped the first cut label, so a single cut
    token went unsaid."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "Q: ", "completion": "abc"}\n')
    tok = tiny.ByteTokenizer()
    ids, _ = train_data.encode_example(tok, "Q: ", "abc")
    kept = train_data.prepare(tok, train_data.read_examples_at(str(path)), len(ids) - cut_tokens,
                              tok.vocab_size, str(path))
    assert len(kept) == 1 and tok.eos_token_id not in kept[0][1]
    assert "1 of 1 example is longer than the" in capsys.readouterr().err


def _bpe_with_a_start_token():
    """An HF fast tokenizer (byte-level BPE, a few merges) that writes <s> before each text
    given add_special_tokens=True, as Llama's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the prompt and the completion, tokenised"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.mark.hf
def test_a_fast_tokenizer_encodes_chunks_of_examples_with_the_ids_of_one_at_a_time(monkeypatch):
    """prepare hands a fast tokenizer many texts per call (its Rust side encodes them on every
    core: one call per text was 97 s for 200k examples): the ids and labels must be those of
    encode_example, example by example, prompts or not, across chunk boundaries."""
    tok = _bpe_with_a_start_token()
    examples = [("the prompt ", "and the completion"), ("", "the completion alone"), ("é prompt", " ü"),
                ("", "tokenised"), ("the", "")] * 3
    monkeypatch.setattr(train_data, "ENCODE_CHUNK", 4)  # chunk boundaries inside the list
    calls = []
    real_call = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, texts, **kw: calls.append(len(texts)) or
                        real_call(self, texts, **kw))
    assert train_data.encode_examples(tok, examples) == [train_data.encode_example(tok, p, c)
                                                         for p, c in examples]
    assert calls and max(calls) == 4 and sum(calls) == 2 * 15 - 6  # 6 examples have no prompt
    at = [(f"f:{n}", p, c) for n, (p, c) in enumerate(examples, 1)]
    rows = train_data.prepare(tok, at, 64, len(tok), "f")
    assert rows == [train_data.encode_example(tok, p, c) for p, c in examples]


class _SlowByteTokenizer(tiny.ByteTokenizer):
    def encode(self, *args, **kwargs):
        import time

        time.sleep(0.01)
        return super().encode(*args, **kwargs)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("progress", [True, False])
def test_tokenising_that_takes_over_a_second_shows_a_bar_unless_told_not_to(progress, monkeypatch):
    """200k examples took minutes to tokenise with nothing on the screen; a bar now shows once
    that takes over a second (none for the small files of every day), none with --no-progress.
    (Into a log file, as any bar of the package, it is written every 10 s: none sooner.)"""
    at = [(f"f:{n}", "", "some text") for n in range(150)]  # 150 x 10 ms: 1.5 s
    monkeypatch.setattr(sys, "stderr", _Terminal())
    rows = train_data.prepare(_SlowByteTokenizer(), at, 64, 300, "f", progress=progress)
    assert len(rows) == 150
    assert ("tokenising" in sys.stderr.getvalue() and "150/150" in sys.stderr.getvalue()) == progress
    monkeypatch.setattr(sys, "stderr", _Terminal())
    train_data.prepare(tiny.ByteTokenizer(), at, 64, 300, "f", progress=True)  # quick: no bar
    assert sys.stderr.getvalue() == ""


@pytest.mark.hf
def test_chat_examples_move_the_bar_one_conversation_at_a_time(monkeypatch):
    from prefix_attn import train_chat
    from test_serve_chat import chat_tokenizer

    monkeypatch.setattr(train_data, "PROGRESS_DELAY", 0.0)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    at = [(f"f:{n}", [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a{n}"}], None)
          for n in range(3)]
    rows = train_data.prepare(chat_tokenizer(), at, 256, 262, "f", chat=train_chat.ChatExamples(chat_tokenizer()),
                              progress=True)
    assert len(rows) == 3 and "tokenising" in sys.stderr.getvalue() and "3/3" in sys.stderr.getvalue()


@pytest.mark.hf
def test_evaluate_batches_rows_of_similar_length_with_the_loss_of_file_order(monkeypatch):
    """Evaluation batched the held-out rows in file order: 128 rows of 8-200 tokens in batches of
    8 padded 9400 tokens, 592 sorted (1.3-2.0x faster on the CPU). The mean token loss is the
    same but for float rounding."""
    import random

    import prefix_attn

    rng = random.Random(0)
    tok = tiny.ByteTokenizer()
    data = [train_data.encode_example(tok, "q" * rng.randint(1, 5), "a" * rng.randint(2, 30)) for _ in range(10)]
    model = tiny.tiny_model("llama")
    prefix_attn.prefix_tuning(model, num_virtual_tokens=2, name="p")
    file_order = train.evaluate(model, data, 1, tok.pad_token_id, "p")  # one row a batch: no padding
    batches = []
    real_collate = train.collate
    monkeypatch.setattr(train, "collate", lambda rows, pad: batches.append([len(r[0]) for r in rows]) or
                        real_collate(rows, pad))
    assert train.evaluate(model, data, 3, tok.pad_token_id, "p") == pytest.approx(file_order, rel=1e-5)
    lengths = [n for batch in batches for n in batch]
    assert [len(b) for b in batches] == [3, 3, 3, 1] and lengths == sorted((len(i) for i, _ in data), reverse=True)
