"""Multi-task prefix tuning with transformers' `Trainer`: a collator hands each row's prefix name
to the model (`remove_unused_columns=False`, since `prefixes` is not in the forward signature),
the prefixes train, and a run resumed from a checkpoint ends with the same prefixes as the
uninterrupted run (the trainable prefixes are in the model's state dict, which Trainer saves)."""
import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

STEPS = 4


def _data():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 100, (8,), generator=g), "task": "b" if i % 3 == 0 else "a"}
            for i in range(4 * STEPS)]


def collate(rows):
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids, "prefixes": [r["task"] for r in rows]}


def _model():
    import prefix_attn
    from prefix_attn.tiny import tiny_model

    model = tiny_model("llama", seed=0)
    modules = {name: prefix_attn.prefix_tuning(model, num_virtual_tokens=4, name=name)
               for name in ("a", "b")}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in modules.values():
            m.embedding.weight.copy_(torch.randn(m.embedding.weight.shape, generator=g))
    return model, modules


def _trainer(model, out, data=None, data_collator=collate, **args):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(**dict(dict(
        output_dir=out, max_steps=STEPS, per_device_train_batch_size=4, save_steps=STEPS // 2,
        remove_unused_columns=False, report_to=[], learning_rate=1e-2, use_cpu=True, seed=0,
        data_seed=0, disable_tqdm=True), **args))
    return Trainer(model=model, args=args, train_dataset=_data() if data is None else data,
                   data_collator=data_collator)


def test_trainer_multi_task_trains_and_resumes_exactly(tmp_path):
    out = str(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, modules = _model()
        init = {n: m.embedding.weight.detach().clone() for n, m in modules.items()}
        _trainer(model, out).train()
        for name, m in modules.items():  # both tasks' rows reached their prefix
            assert not torch.equal(m.embedding.weight, init[name]), name
        assert all(not p.requires_grad for n, p in model.named_parameters() if "prefix_bank" not in n)

        resumed, resumed_modules = _model()
        _trainer(resumed, out).train(resume_from_checkpoint=os.path.join(out, f"checkpoint-{STEPS // 2}"))
    for name in modules:
        torch.testing.assert_close(resumed_modules[name].embedding.weight,
                                   modules[name].embedding.weight, rtol=0, atol=0)


def _varied_data():
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(3, 100, (int(n),), generator=g).tolist(),
             "task": "b" if i % 3 == 0 else "a"}
            for i, n in enumerate(torch.randint(2, 12, (4 * STEPS,), generator=g))]


def padded_collate(rows):
    S = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[b, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
            "prefixes": [r["task"] for r in rows]}


def packed_collate(rows):
    """transformers' padding-free collator, plus one prefix per packed sequence."""
    from transformers import DataCollatorWithFlattening

    batch = DataCollatorWithFlattening()([{"input_ids": r["input_ids"]} for r in rows])
    batch["prefixes"] = [r["task"] for r in rows]
    return batch


def test_trainer_padding_free_multi_task_equals_padded(tmp_path):
    """Variable-length rows of two tasks: Trainer with DataCollatorWithFlattening (one packed row
    per batch, a prefix per sequence) ends with the prefixes that the padded batches give (the
    same tokens are predicted, so the same losses)."""
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, coll in enumerate((padded_collate, packed_collate)):
            model, modules = _model()
            _trainer(model, str(tmp_path / str(i)), _varied_data(), coll).train()
            results.append({n: m.embedding.weight.detach().clone() for n, m in modules.items()})
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-4, atol=1e-5)


def test_trainer_survives_a_micro_batch_without_any_prefix(tmp_path):
    """Multi-task data with rows that use no prefix: a micro-batch of only such rows (batch 1
    with gradient accumulation) had a loss without a graph, and backward() stopped the run with
    "element 0 of tensors does not require grad". The trainable entries now join such a batch
    with zero gradients: the run completes and the prefixes train."""
    model, modules = _model()
    before = {n: m.embedding.weight.detach().clone() for n, m in modules.items()}
    data = [dict(r, task=None if i % 2 else r["task"]) for i, r in enumerate(_data())]
    trainer = _trainer(model, str(tmp_path / "out"), data=data, per_device_train_batch_size=1,
                       gradient_accumulation_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert any(not torch.equal(before[n], m.embedding.weight) for n, m in modules.items())


def test_training_without_prefixes_warns_once_naming_the_cause():
    """A training forward without prefixes= (a collator or remove_unused_columns dropped the
    column) applied no prefix silently: with another trainable module the run went on and the
    prefixes learned nothing. One warning now says so, and what to do."""
    model, modules = _model()
    model.lm_head.requires_grad_(True)
    model.train()
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"training forward without prefixes=.*'a', 'b' learn "
                                         r"nothing.*remove_unused_columns=False"):
        model(input_ids=ids, labels=ids).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, labels=ids).loss.backward()  # once
        model(input_ids=ids, labels=ids, prefixes=None).loss.backward()  # explicit: no warning
        model.eval()
        model(input_ids=ids, labels=ids)
    assert all(m.embedding.weight.grad is None for m in modules.values())


def test_a_batch_without_prefixes_leaves_every_prefix_alone_under_adam():
    """The no-prefix training batch first got every trainable entry joined with zero gradients:
    with a head training beside them, AdamW's momentum and weight decay then moved prefixes no
    row had selected. Now their gradients stay None and they do not move."""
    model, modules = _model()
    model.lm_head.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))

    def step(prefixes):
        opt.zero_grad()
        model(input_ids=ids, labels=ids, prefixes=prefixes).loss.backward()
        opt.step()

    step(["a", "a"])
    before = {n: m.embedding.weight.detach().clone() for n, m in modules.items()}
    step([None, None])
    for n, m in modules.items():
        assert m.embedding.weight.grad is None, n
        assert torch.equal(m.embedding.weight, before[n]), n
    only_prefixes, mods = _model()  # the base frozen: the no-prefix batch still backpropagates
    only_prefixes.train()
    with torch.no_grad():
        want = only_prefixes(input_ids=ids, labels=ids).loss
    # prefixes=None too (no selection was made for it), and on the fallback path, which
    # dropped an empty prefix and the zero the bank had added to it
    for prefixes, extra in (([None, None], {}), (None, {}), ([None, None], dict(output_attentions=True))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = only_prefixes(input_ids=ids, labels=ids, prefixes=prefixes, **extra).loss
        loss.backward()
        torch.testing.assert_close(loss.detach(), want, rtol=0, atol=0)
        assert all(m.embedding.weight.grad is None for m in mods.values())
