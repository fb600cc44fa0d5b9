"""The training CLI's data helpers (prefix_attn.train) and the byte tokenizer (prefix_attn.tiny):
how examples are encoded, the batch order of each epoch, evaluation's mode, vocabulary checks."""
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
