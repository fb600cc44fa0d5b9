"""``prefix_attn.load_prefixes``: the trainable prefixes of a checkpoint of the whole model (a
Trainer's ``checkpoint-N``, ``save_pretrained``, a state dict) back in a fresh model's bank."""
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

import prefix_attn  # noqa: E402
from prefix_attn.tiny import tiny_model  # noqa: E402

IDS = torch.tensor([[5, 9, 11, 3, 7], [6, 4, 8, 2, 9]])
# names that need escaping in the state dict ("." and "%", leading too), one that shadows a
# ModuleDict method
PREFIXES = {"a": (3, None), "b.c%": (5, 6), "keys": (2, None), "%25x": (1, None), ".y": (2, None)}


def _trained(family="llama"):
    model = tiny_model(family, seed=0)
    g = torch.Generator().manual_seed(1)
    for name, (P, hidden) in PREFIXES.items():
        module = prefix_attn.prefix_tuning(model, P, projection_hidden_size=hidden, name=name)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _logits(model, names):
    with torch.no_grad():
        return model(IDS, prefixes=names).logits


def _same_prefixes(model, loaded, kind="trainable"):
    # in the checkpoint's order: the state dict's (sorted by the escaped name)
    assert sorted(model.prefix_bank.names()) == sorted(loaded.prefix_bank.names()) == sorted(PREFIXES)
    for name in PREFIXES:
        assert loaded.prefix_bank.kind(name) == kind
        torch.testing.assert_close(_logits(loaded, [name, None]), _logits(model, [name, None]))


@pytest.mark.parametrize("how", ["safetensors", "sharded", "bin", "legacy_bin", "sharded_bin",
                                 "file", "pt_file", "state_dict"])
def test_the_prefixes_of_a_saved_model_come_back(tmp_path, how):
    """(A torch.save file of the format before zip files failed: it cannot be memory-mapped.)"""
    import json

    model = _trained()
    source = tmp_path
    if how == "safetensors":
        model.save_pretrained(tmp_path)
    elif how == "sharded":
        model.save_pretrained(tmp_path, max_shard_size="20KB")
        assert os.path.isfile(tmp_path / "model.safetensors.index.json")
        source = str(tmp_path)
    elif how in ("bin", "legacy_bin"):
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin",
                   _use_new_zipfile_serialization=how == "bin")
    elif how == "sharded_bin":
        state, weight_map = model.state_dict(), {}
        for i, part in enumerate((list(state)[::2], list(state)[1::2])):
            torch.save({k: state[k] for k in part}, tmp_path / f"part{i}.bin")
            weight_map.update({k: f"part{i}.bin" for k in part})
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif how == "file":
        model.save_pretrained(tmp_path)
        source = tmp_path / "model.safetensors"
    elif how == "pt_file":  # a torch.save weights file, given as a file
        torch.save(model.state_dict(), tmp_path / "weights.pt")
        source = tmp_path / "weights.pt"
    else:  # a wrapper's keys ("base_model.model." of a PeftModel)
        source = {f"base_model.model.{k}": v for k, v in model.state_dict().items()}
    loaded = tiny_model("llama", seed=0)
    assert prefix_attn.load_prefixes(loaded, source) == loaded.prefix_bank.names()
    _same_prefixes(model, loaded.eval())
    trainable = prefix_attn.trainable_parameters(loaded)
    assert trainable and all("prefix_bank.trainable." in n for n, p in loaded.named_parameters()
                             if p.requires_grad)


def test_a_trainer_checkpoint_serves_as_fixed_entries(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _trained().train()
    data = [{"input_ids": IDS[i % 2], "task": list(PREFIXES)[i % 3]} for i in range(6)]

    def collate(rows):
        ids = torch.stack([r["input_ids"] for r in rows])
        return {"input_ids": ids, "labels": ids, "prefixes": [r["task"] for r in rows]}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=2, report_to=[],
                             per_device_train_batch_size=3, remove_unused_columns=False,
                             use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=data, data_collator=collate).train()
    loaded = tiny_model("llama", seed=0)
    prefix_attn.load_prefixes(loaded, tmp_path / "checkpoint-2", trainable=False)
    assert not list(loaded.prefix_bank.trainable.parameters())  # K/V only; the base untouched
    _same_prefixes(model.eval(), loaded.eval(), kind="fixed")


def test_what_does_not_fit_is_refused_before_the_model_changes(tmp_path):
    model = _trained()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    plain = tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match="holds no trainable prefix"):
        prefix_attn.load_prefixes(plain, {k: v for k, v in state.items() if "prefix_bank" not in k})
    with pytest.raises(ValueError, match=r"prefix 'b\.c%' has the tensors"):
        prefix_attn.load_prefixes(plain, {k: v for k, v in state.items()
                                          if not k.endswith("transform.2.bias")})
    other = tiny_model("llama", seed=0, kv_heads=1)  # another head count
    with pytest.raises(ValueError, match="does not fit this model"):
        prefix_attn.load_prefixes(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="holds none of model.safetensors"):
        prefix_attn.load_prefixes(plain, tmp_path / "..")
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        prefix_attn.load_prefixes(plain, tmp_path / "missing")
    assert not hasattr(plain, "prefix_bank") and not hasattr(other, "prefix_bank")
    prefix_attn.prefix_tuning(plain, 4, name="a")
    with pytest.raises(ValueError, match=r"already has prefixes named \['a'\]"):
        prefix_attn.load_prefixes(plain, tmp_path)
    assert plain.prefix_bank.names() == ["a"]


def test_a_peft_adapter_folder_is_pointed_to_its_loader(tmp_path):
    """A LoRA adapter folder holding a prefix in its modules_to_save: the error listed the
    files it lacks, without a word on the adapter it holds."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    model = _trained()
    lora = peft.get_peft_model(model, peft.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["prefix_bank.trainable.a"]))
    lora.save_pretrained(str(tmp_path))
    fresh = tiny_model("llama", seed=0)
    with pytest.raises(FileNotFoundError, match="it holds a PEFT adapter: load it with "):
        prefix_attn.load_prefixes(fresh, tmp_path)
    # the way the message gives: the adapter's prefix tensors
    assert prefix_attn.load_prefixes(fresh, load_file(tmp_path / "adapter_model.safetensors")) == ["a"]
    torch.testing.assert_close(_logits(fresh.eval(), ["a", None]), _logits(model, ["a", None]))


@pytest.mark.parametrize("safe", [True, False])
def test_a_peft_prefix_tuning_adapter_is_pointed_to_load_peft(tmp_path, safe):
    """A PEFT prefix-tuning adapter (its prompt_embeddings are no trained module): the hint
    said to pass its tensors to load_prefixes, which then said it held no prefix; an
    adapter_model.bin folder got no hint at all. Both point to load_peft / from_peft now, and
    the way named works."""
    from prefix_attn.bank import PrefixBank

    model = _trained()
    model.prefix_bank.save_peft("a", str(tmp_path))
    if not safe:  # as PEFT's save_pretrained(safe_serialization=False) writes it
        tensors = load_file(tmp_path / "adapter_model.safetensors")
        os.remove(tmp_path / "adapter_model.safetensors")
        torch.save(tensors, tmp_path / "adapter_model.bin")
    fresh = tiny_model("llama", seed=0)
    with pytest.raises(FileNotFoundError, match=r"it holds a PEFT prefix-tuning adapter: read it "
                                                r"with model\.prefix_bank\.load_peft\(name, folder\)"):
        prefix_attn.load_prefixes(fresh, tmp_path)
    if safe:
        for given in (tmp_path / "adapter_model.safetensors",
                      load_file(tmp_path / "adapter_model.safetensors")):
            with pytest.raises(ValueError, match="it holds a PEFT prefix-tuning adapter"):
                prefix_attn.load_prefixes(fresh, given)
    PrefixBank.attach(fresh).load_peft("a", str(tmp_path))
    torch.testing.assert_close(_logits(fresh.eval(), ["a", None]), _logits(model, ["a", None]))


def test_a_saved_bank_is_pointed_to_prefix_bank_load(tmp_path):
    """A folder written by bank.save (or its file) given to load_prefixes: the error listed the
    weights files it lacks, or asked whether the model was prefix-tuned."""
    from prefix_attn.bank import PrefixBank

    model = _trained()
    model.prefix_bank.save(str(tmp_path))
    fresh = tiny_model("llama", seed=0)
    with pytest.raises(FileNotFoundError, match=r"it holds a saved prefix bank \(bank\.save\): load "
                                                r"it with prefix_attn\.PrefixBank\.load\(folder, model\)"):
        prefix_attn.load_prefixes(fresh, tmp_path)
    with pytest.raises(ValueError, match=r"a saved prefix bank \(bank\.save\)"):
        prefix_attn.load_prefixes(fresh, tmp_path / "prefix_bank.safetensors")
    PrefixBank.load(str(tmp_path), fresh)
    torch.testing.assert_close(_logits(fresh.eval(), ["a", None]), _logits(model, ["a", None]))


def test_a_lora_run_s_copy_is_read_and_several_copies_are_refused():
    """The state dict of a LoRA run's base model holds the prefix in PEFT's modules_to_save
    wrapper (the trained copy and the original): it was refused as holding no prefix. Two
    models' prefixes in one state dict were merged, the last one winning."""
    peft = pytest.importorskip("peft")

    model = _trained()
    lora = peft.get_peft_model(model, peft.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["prefix_bank.trainable.a"]))
    copy = lora.get_base_model().prefix_bank.trainable["a"].modules_to_save["default"]
    with torch.no_grad():
        copy.embedding.weight.mul_(2)  # trained: no longer the original
    state = lora.get_base_model().state_dict()
    assert any(".original_module." in k for k in state)
    fresh = tiny_model("llama", seed=0)
    prefix_attn.load_prefixes(fresh, {k: v for k, v in state.items() if "trainable.a." in k})
    torch.testing.assert_close(fresh.prefix_bank.entry_kv("a"), copy(), rtol=0, atol=0)
    plain = _trained().state_dict()
    both = {**plain, **{f"other.{k}": v for k, v in plain.items()}}
    with pytest.raises(ValueError, match="several prefixes named"):
        prefix_attn.load_prefixes(tiny_model("llama", seed=0), both)


def test_malformed_prefixes_and_an_unloaded_model_are_refused(tmp_path):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from prefix_attn.tiny import tiny_config

    state = _trained().state_dict()
    one = {k: v for k, v in state.items() if "trainable.a." in k}
    key = "prefix_bank.trainable.a.embedding.weight"
    for bad in ({"prefix_bank.trainable.a.transform.0.weight": torch.zeros(6, 16)},
                {key: one[key][0]}, {key: one[key][:0]}):
        model = tiny_model("llama", seed=0)
        with pytest.raises(ValueError, match="prefix 'a' has the tensors"):
            prefix_attn.load_prefixes(model, bad)
        assert not hasattr(model, "prefix_bank")
    with init_empty_weights(include_buffers=True):
        empty = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa")
    for trainable in (True, False):
        with pytest.raises(ValueError, match="weights are on meta"):
            prefix_attn.load_prefixes(empty, one, trainable=trainable)
    assert not hasattr(empty, "prefix_bank") and empty.config._attn_implementation == "sdpa"
    fixed = tiny_model("llama", seed=0)
    PrefixBank = prefix_attn.PrefixBank
    bank = PrefixBank.attach(fixed)
    bank.add("a", *torch.zeros(2, bank.num_layers, bank.num_kv_heads, 3, bank.head_dim))
    with pytest.raises(ValueError, match=r"remove them first \(model.prefix_bank.remove\(name\)\)$"):
        prefix_attn.load_prefixes(fixed, one)  # no load_state_dict advice: it would load nothing


def test_a_head_trained_beside_the_prefix_must_be_unfrozen_to_resume(tmp_path):
    """load_prefixes freezes the base, a head that trained with the prefix too: the Trainer's
    optimizer state would not fit it. A warning says so; unfrozen, the run resumes."""
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama", seed=0)
    prefix_attn.prefix_tuning(model, 3, name="a")
    model.lm_head.requires_grad_(True)
    data = [{"input_ids": IDS[i % 2]} for i in range(4)]

    def collate(rows):
        ids = torch.stack([r["input_ids"] for r in rows])
        return {"input_ids": ids, "labels": ids, "prefixes": ["a"] * len(rows)}

    def trainer(m, steps):
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, save_steps=2,
                                 report_to=[], per_device_train_batch_size=2, use_cpu=True,
                                 remove_unused_columns=False, disable_tqdm=True)
        return Trainer(model=m, args=args, train_dataset=data, data_collator=collate)
    trainer(model.train(), 2).train()
    checkpoint = tmp_path / "checkpoint-2"
    loaded = tiny_model("llama", seed=0)
    loaded.load_state_dict(model.state_dict(), strict=False)  # the base, lm_head included
    with pytest.warns(UserWarning, match=r"trained 2 tensors.*trains 1 .*requires_grad_\(True\)"):
        prefix_attn.load_prefixes(loaded, checkpoint)
    loaded.lm_head.requires_grad_(True)
    trainer(loaded.train(), 4).train(resume_from_checkpoint=str(checkpoint))
    with warnings.catch_warnings():  # the prefix alone trained: nothing to say
        warnings.simplefilter("error")
        model2 = tiny_model("llama", seed=0)
        os.remove(checkpoint / "optimizer.pt")
        prefix_attn.load_prefixes(model2, checkpoint)


def test_a_checkpoint_whose_optimizer_trained_the_prefixes_alone_loads_without_a_warning(tmp_path):
    """optimizer.pt trained as many tensors as the loaded model trains: nothing to say (the
    warning to unfreeze a head is for more). From a mutation audit (>= warned here)."""
    model = tiny_model("llama", seed=0)
    prefix_attn.prefix_tuning(model, 3, projection_hidden_size=6, name="a")
    model.save_pretrained(tmp_path)
    trained = [p for p in model.parameters() if p.requires_grad]
    torch.save({"state": {}, "param_groups": [{"lr": 1e-3, "params": list(range(len(trained)))}]},
               tmp_path / "optimizer.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prefix_attn.load_prefixes(tiny_model("llama", seed=0), tmp_path)
    for zipped in (True, False):  # torch's legacy format too (mmap refuses it: no warning)
        torch.save({"state": {}, "param_groups": [{"lr": 1e-3, "params": list(range(len(trained) + 1))}]},
                   tmp_path / "optimizer.pt", _use_new_zipfile_serialization=zipped)
        with pytest.warns(UserWarning, match=f"trained {len(trained) + 1} tensors"):
            prefix_attn.load_prefixes(tiny_model("llama", seed=0), tmp_path)


def test_prefixes_loaded_under_inference_mode_train(tmp_path):
    """load_prefixes called in a serving process's inference_mode: its parameters are no
    inference tensors, so a later training step backpropagates into them (inference tensors
    refuse the optimizer's in-place step). From a mutation audit."""
    state = _trained().state_dict()
    loaded = tiny_model("llama", seed=0)
    with torch.inference_mode():
        prefix_attn.load_prefixes(loaded, state)
    loaded.train()
    opt = torch.optim.SGD(prefix_attn.trainable_parameters(loaded), lr=0.1)
    before = loaded.prefix_bank.entry_kv("b.c%").detach().clone()
    loaded(IDS, labels=IDS, prefixes=["a", "b.c%"]).loss.backward()
    opt.step()  # in-place updates of inference tensors outside inference_mode are refused
    assert not torch.equal(loaded.prefix_bank.entry_kv("b.c%").detach(), before)


def test_prefixes_loaded_for_serving_do_not_warn_about_the_optimizer(tmp_path):
    """trainable=False (fixed K/V, for serving) on a frozen model: nothing will resume from
    optimizer.pt, so no warning to unfreeze a head."""
    model = tiny_model("llama", seed=0)
    prefix_attn.prefix_tuning(model, 3, name="a")
    model.save_pretrained(tmp_path)
    torch.save({"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
               tmp_path / "optimizer.pt")
    serving = tiny_model("llama", seed=0).requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prefix_attn.load_prefixes(serving, tmp_path, trainable=False) == ["a"]
    assert serving.prefix_bank.kind("a") == "fixed"
