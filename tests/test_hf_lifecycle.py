"""A model with prefixes through its life: checkpoints keyed by prefix name, copies and pickles,
prompt prefixes on sliding-window models, and the misuses that must raise instead of silently
dropping the prefixes (a backbone called directly, no bank, a miscounted list of prefixes)."""
import copy
import io
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

import prefix_attn  # noqa: E402
from prefix_attn.bank import PrefixBank  # noqa: E402
from prefix_attn.tiny import tiny_model  # noqa: E402


def _tuned(names, seed=0):
    """A tiny Llama with trainable prefixes ``names`` (created in that order), each filled with
    values of its own so a swap is visible."""
    model = tiny_model("llama", seed=0)
    for name in names:
        module = prefix_attn.prefix_tuning(model, num_virtual_tokens=3, name=name)
        g = torch.Generator().manual_seed(seed + sum(map(ord, name)))
        with torch.no_grad():
            module.embedding.weight.copy_(torch.randn(module.embedding.weight.shape, generator=g))
    return model


def _entries(model):
    bank = model.prefix_bank
    with torch.no_grad():
        return {n: bank.entry_kv(n) for n in bank.names()}


def test_state_dict_keys_follow_names_not_creation_order():
    names = ["support", "legal.v2", "train", "50%"]  # a dot, a ModuleDict method, a percent
    saved = _tuned(names)
    keys = [k for k in saved.state_dict() if k.startswith("prefix_bank.")]
    assert keys == ["prefix_bank.trainable.%train.embedding.weight",  # in key order
                    "prefix_bank.trainable.50%25.embedding.weight",
                    "prefix_bank.trainable.legal%2Ev2.embedding.weight",
                    "prefix_bank.trainable.support.embedding.weight"]
    resumed = _tuned(list(reversed(names)), seed=100)  # other order, other values
    resumed.load_state_dict(saved.state_dict(), strict=True)
    want, got = _entries(saved), _entries(resumed)
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)

    # removing and re-adding a prefix keeps its key
    saved.prefix_bank.remove("legal.v2")
    prefix_attn.prefix_tuning(saved, num_virtual_tokens=3, name="legal.v2")
    assert set(saved.state_dict()) == set(resumed.state_dict())


def test_deepcopy_bank_belongs_to_the_copy():
    model = _tuned(["a"])
    clone = copy.deepcopy(model)
    assert clone.prefix_bank.model is clone and model.prefix_bank.model is model
    with torch.no_grad():  # the copy's own weights make its prompt KV
        clone.model.layers[0].self_attn.k_proj.weight.mul_(2.0)
    prompt = torch.tensor([5, 9, 11])
    clone.prefix_bank.add_prompt("sys", prompt)
    model.prefix_bank.add_prompt("sys", prompt)
    assert not torch.allclose(clone.prefix_bank.entry_kv("sys"), model.prefix_bank.entry_kv("sys"))
    with torch.no_grad():
        cache = clone(prompt[None], use_cache=True)
    kv = getattr(cache, "cache", None) or cache.past_key_values
    torch.testing.assert_close(clone.prefix_bank.get("sys")[0][0], kv.layers[0].keys[0])
    lone = copy.deepcopy(model.prefix_bank)  # a bank copied alone stays with the same model
    assert lone.model is model and lone.names() == ["a", "sys"]


def test_pickled_model_keeps_its_prefixes():
    model = _tuned(["a", "b"])
    ids = torch.tensor([[5, 9, 11, 3], [7, 8, 9, 10]])
    with torch.no_grad():
        want = model(ids, prefixes=["a", "b"]).logits
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.prefix_bank.model is loaded
    with torch.no_grad():
        got = loaded(ids, prefixes=["a", "b"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_bank_pickled_alone_holds_no_model():
    """torch.save(model.prefix_bank) wrote the whole model (the bank pickled the model it
    serves to keep the link): a bank saved alone was as large as the model, and loaded it."""
    import gc
    import pickle

    model = _tuned(["a"])
    model.prefix_bank.add("f", *torch.randn(2, 2, 2, 4, 8))  # L 2, Hkv 2, P 4, D 8
    ids = torch.tensor([[5, 9, 11, 3]])
    with torch.no_grad():
        want = model(ids, prefixes=["f"]).logits
    buf = io.BytesIO()
    torch.save(model.prefix_bank, buf)
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if not n.startswith("prefix_bank."))
    assert buf.tell() < base_bytes / 4, (buf.tell(), base_bytes)
    buf.seek(0)
    lone = torch.load(buf, weights_only=False)
    assert lone.model is None and lone.names() == ["a", "f"]
    other = tiny_model("llama", seed=0)  # the same base: the bank is bound to it
    other.prefix_bank = lone
    assert PrefixBank.attach(other) is lone and lone.model is other
    with torch.no_grad():
        torch.testing.assert_close(other(ids, prefixes=["f"]).logits, want, rtol=0, atol=0)
    # the link holds the model weakly: a model deleted is gone, no cycle keeps it
    bank = model.prefix_bank
    del model
    assert bank.model is None
    gc.collect()


def test_a_bank_pickled_with_its_model_by_an_older_version_is_bound_to_it():
    model = _tuned(["a"])
    bank = model.prefix_bank
    state = bank.__getstate__()
    state["_model_ref"] = model  # what the pickles of before held
    old = PrefixBank.__new__(PrefixBank)
    old.__setstate__(state)
    assert old.model is model and old.names() == ["a"]


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_prompt_prefix_on_a_sliding_window_model_warns(family):
    model = tiny_model(family)
    bank = PrefixBank.attach(model)
    with pytest.warns(UserWarning, match="sliding-window layers"):
        bank.add_prompt("short", torch.tensor([5, 9, 11]))
    # longer than the window (4): the model's own cache keeps the last 3 positions of its
    # sliding layers (add_prompt refused it); the entry holds all 10, as they were computed
    with pytest.warns(UserWarning, match=r"this prompt \(10 tokens\) does not fit"):
        bank.add_prompt("long", torch.arange(3, 13))
    with pytest.warns(UserWarning, match="sliding-window layers"):
        bank.add_prompt("head", torch.arange(3, 6))
    assert bank.names() == ["short", "long", "head"]
    keys, values = bank.get("long")
    assert keys.shape[2] == 10
    with torch.no_grad():
        own = model(input_ids=torch.arange(3, 13)[None], use_cache=True)
    own = getattr(own, "cache", None) or own.past_key_values
    for layer, kept in enumerate(own.layers):
        n = kept.keys.shape[-2]
        assert n < 10 or family == "gemma2"  # gemma2 alternates sliding and full layers
        torch.testing.assert_close(keys[layer, :, -n:], kept.keys[0], rtol=0, atol=0)
        torch.testing.assert_close(values[layer, :, -n:], kept.values[0], rtol=0, atol=0)
    torch.testing.assert_close(keys[:, :, :3], bank.get("head")[0])  # positions 0..2: causal
    with torch.no_grad():  # served whole: the prefix is never windowed
        assert torch.isfinite(model(torch.tensor([[5, 6]]), prefixes=["long"]).logits).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qwen2 = tiny_model("qwen2")  # has a sliding_window it does not use
        PrefixBank.attach(qwen2).add_prompt("p", torch.arange(3, 13))
    bank = PrefixBank.attach(tiny_model("llama"))  # the model is gone at once
    with pytest.raises(RuntimeError, match="no longer exists"):
        bank.add_prompt("p", torch.arange(3, 13))


def test_prefixes_to_a_backbone_or_without_a_bank_raise():
    model = _tuned(["a"])
    ids = torch.tensor([[5, 9, 11, 3]])
    with pytest.raises(ValueError, match="not a submodule such as model.model"):
        model.model(ids, prefixes=["a"])
    bare = tiny_model("llama")  # attn_implementation prefix_attn, no bank attached
    with pytest.raises(ValueError, match=r"PrefixBank.attach\(model\)(.|\n)*A model without a bank"):
        bare(ids, prefixes=["a"])
    with pytest.raises(ValueError, match=r"PrefixBank.attach\(model\)"):
        bare.generate(ids, prefixes=["a"], max_new_tokens=2)


def test_zero_dim_id_tensor_selects_one_entry_for_every_row():
    model = _tuned(["a", "b"])
    ids = torch.tensor([[5, 9, 11, 3], [7, 8, 9, 10]])
    with torch.no_grad():
        want = model(ids, prefixes="b").logits
        got = model(ids, prefixes=torch.tensor(1)).logits
        gen = model.generate(ids, prefixes=torch.tensor(1), max_new_tokens=2, do_sample=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert gen.shape == (2, 6)


def test_miscounted_prefixes_on_a_padded_batch_raise():
    """Left padding makes position_ids restart like packed sequences; more prefixes than rows
    on a padded batch is a miscount, not packing."""
    model = _tuned(["a", "b"])
    ids = torch.tensor([[0, 9, 11, 3], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    pos[0, 0] = 1  # HF's left-padding position ids: [1, 0, 1, 2]
    for n in (3, 4):
        with pytest.raises(ValueError, match="padded"):
            model(ids, attention_mask=mask, position_ids=pos, prefixes=["a", "b", "a", "b"][:n])
    with pytest.raises(ValueError, match="got 4 prefixes for a batch of 2 rows"):
        model.generate(ids, attention_mask=mask, prefixes=["a", "b", "a", "b"], max_new_tokens=2)
    with pytest.raises(ValueError, match="no such position_ids"):
        model(ids[1:], prefixes=["a", "b"])


def test_a_forward_interrupted_by_a_base_exception_leaves_nothing_behind():
    """torch runs an always_call post-hook on Exception only: a KeyboardInterrupt (or the
    train command's own Interrupted) in a forward with prefixes= left its selection on a
    per-thread stack: its stacked KV stayed alive for good, and the model's next forward
    without prefixes popped it and raised. The post-hook now takes the selection from the
    forward's kwargs; nothing is kept between the hooks."""
    import gc
    import weakref

    model = tiny_model("llama")
    bank = PrefixBank.attach(model)
    L, H, D = bank.num_layers, bank.num_kv_heads, bank.head_dim
    bank.add("a", torch.randn(L, H, 5, D), torch.randn(L, H, 5, D))
    bank.add("b", torch.randn(L, H, 7, D), torch.randn(L, H, 7, D))
    bank.cache_size = 0  # nothing in the bank keeps a stack alive
    seen, fire = [], [True]

    def interrupt(module, args, kwargs):
        seen.append(weakref.ref(kwargs["prefix_selection"]))
        if fire[0]:
            raise KeyboardInterrupt

    handle = model.model.layers[0].self_attn.register_forward_pre_hook(interrupt, with_kwargs=True)
    ids = torch.randint(3, 100, (2, 5))
    with torch.no_grad():
        for _ in range(2):
            with pytest.raises(KeyboardInterrupt):
                model(input_ids=ids, prefixes=["a", "b"])
        handle.remove()
        gc.collect()
        assert len(seen) == 2 and all(ref() is None for ref in seen)
        model(input_ids=ids)  # raised "did not pass the prefix selection down"
        model(input_ids=ids, prefixes=["a", "b"])


def test_a_model_with_weights_offloaded_to_disk_serves_prefixes(tmp_path):
    """device_map with "disk" entries leaves those weights on meta: the bank took its device from
    the first weight (meta), stored added entries there without their data, and every forward
    with a prefix failed ("Cannot copy out of meta tensor"); add_prompt failed reading its
    weight signature (from a lifecycle audit). The bank now sits where the model runs."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    src = tiny_model("llama")
    src.save_pretrained(str(tmp_path / "m"))
    device_map = {"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "disk"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            str(tmp_path / "m"), attn_implementation="prefix_attn", device_map=device_map,
            offload_folder=str(tmp_path / "off"))
    bank, ref = PrefixBank.attach(model), PrefixBank.attach(src)
    assert bank.device.type == "cpu"
    kv = torch.randn(2, 2, 2, 3, 8, generator=torch.Generator().manual_seed(0))
    for b in (bank, ref):
        b.add("x", *kv)
        b.add_prompt("sys", torch.tensor([4, 5, 6]))
    ids = torch.tensor([[5, 9, 11, 3], [7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, prefixes=["x", "sys"]).logits,
                                   src(ids, prefixes=["x", "sys"]).logits, rtol=1e-5, atol=1e-5)
    bank.save(str(tmp_path / "bank"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the prompt entry fits: no "computed by another model"
        PrefixBank.load(str(tmp_path / "bank"), src)


def test_a_bank_attached_before_the_weights_are_loaded():
    """PEFT-style: prefix_tuning on a model made under init_empty_weights, then the checkpoint
    loaded and dispatched. The bank's move probe failed on meta ("Cannot copy out of meta
    tensor"), so did every later model.to(); entries given on meta (no data) are refused."""
    accelerate = pytest.importorskip("accelerate")
    import os
    import tempfile

    from transformers import AutoModelForCausalLM

    from prefix_attn.tiny import tiny_config

    src = tiny_model("llama")
    prefix_attn.prefix_tuning(src, num_virtual_tokens=3, name="a")
    folder = tempfile.mkdtemp()
    src.save_pretrained(folder)
    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="prefix_attn")
    prefix_attn.prefix_tuning(model, num_virtual_tokens=3, name="a")
    with pytest.raises(ValueError, match="on meta holds no data"):
        model.prefix_bank.add("f", torch.randn(2, 2, 4, 8, device="meta"),
                              torch.randn(2, 2, 4, 8, device="meta"))
    accelerate.load_checkpoint_and_dispatch(model, os.path.join(folder, "model.safetensors"),
                                            device_map={"": "cpu"})
    model.to("cpu")
    assert model.prefix_bank.device.type == "cpu"
    ids = torch.tensor([[5, 9, 11, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, prefixes="a").logits, src(ids, prefixes="a").logits)


def test_a_prompt_entry_still_fits_after_the_embeddings_are_resized(tmp_path):
    """The weight signature sampled the middle of each weight, which resizing the token
    embeddings (a pad token added) moves: loading a bank warned that its prompt entry was
    computed by another model, though its KV is unchanged."""
    model = tiny_model("llama")
    bank = PrefixBank.attach(model)
    bank.add_prompt("sys", torch.tensor([4, 5, 6, 7]))
    bank.save(str(tmp_path))
    model.resize_token_embeddings(model.config.vocab_size + 1, mean_resizing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PrefixBank.load(str(tmp_path), model)
    other = tiny_model("llama", seed=1)
    with pytest.warns(UserWarning, match="computed by another model"):
        PrefixBank.load(str(tmp_path), other)


def test_a_scalar_parameter_does_not_break_the_weight_signature():
    """A 0-d parameter (a learned temperature): the signature's first-row sample indexed its
    shape[-1] and add_prompt failed (IndexError)."""
    model = tiny_model("llama")
    model.register_parameter("temperature", torch.nn.Parameter(torch.tensor(1.0)))
    PrefixBank.attach(model).add_prompt("sys", torch.tensor([4, 5, 6]))


class _QuantizedWeight(torch.nn.Parameter):
    """Stands in for torchao's quantized weights: a tensor subclass that cannot be viewed."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.reshape, torch.Tensor.view, torch.Tensor.flatten):
            raise NotImplementedError(f"Int8Tensor dispatch: {func.__name__} is not supported")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_quantized_weights_are_left_out_of_the_weight_signature(tmp_path):
    """A torchao-quantized model: the signature sliced every weight, and its tensor subclasses
    cannot be viewed, so add_prompt (after its prefill), PrefixBank.load of a bank with a prompt
    entry and `prefix-attn generate --prompt-prefix` failed (NotImplementedError). A
    bitsandbytes 4-bit model: the signature read its packed bytes, which bitsandbytes repacks
    at the first evaluation forward on the CPU, so loading a bank into the very model it was
    saved from warned that the prompt entry was computed by another model."""
    model = tiny_model("llama")
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.weight = _QuantizedWeight(q_proj.weight.detach(), requires_grad=False)
    model.model.layers[1].mlp.register_parameter(  # packed 4-bit storage
        "packed", torch.nn.Parameter(torch.arange(64, dtype=torch.uint8), requires_grad=False))
    bank = PrefixBank.attach(model)
    bank.add_prompt("sys", torch.tensor([4, 5, 6]))
    bank.save(str(tmp_path))
    with torch.no_grad():
        model.model.layers[1].mlp.packed.copy_(torch.arange(64, dtype=torch.uint8).flip(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PrefixBank.load(str(tmp_path), model)
    with pytest.warns(UserWarning, match="computed by another model"):  # still told apart
        PrefixBank.load(str(tmp_path), tiny_model("llama", seed=1))


def test_signatures_with_non_finite_samples():
    """A sample read as NaN (bf16 words of packed bits) made a signature unequal to itself,
    and an infinite one equal to any value."""
    from prefix_attn.model_info import same_signature

    nan, inf = float("nan"), float("inf")
    assert same_signature([nan, 1.0, inf, None], [nan, 1.0, inf, 3.0])
    assert not same_signature([inf], [1e30]) and not same_signature([1e30], [-inf])
    assert not same_signature([nan], [1.0]) and not same_signature([inf], [-inf])


def test_a_quantized_first_weight_does_not_set_the_bank_dtype():
    """A float8 embedding (layerwise-cast storage): the bank took float8 and rounded every
    prefix to a few bits (0.25 off at values of 3 to 9)."""
    from prefix_attn.model_info import model_dtype_device

    model = tiny_model("llama")
    embed = model.model.embed_tokens
    embed.weight = torch.nn.Parameter(embed.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    assert model_dtype_device(model) == (torch.float32, torch.device("cpu"))
    assert PrefixBank.attach(model).dtype == torch.float32
    embed.to_empty(device="meta")  # offloaded, with the others loaded: the same choice
    model.model.layers[0].self_attn.q_proj.to_empty(device="meta")
    assert model_dtype_device(model) == (torch.float32, torch.device("cpu"))


def test_an_fsdp_shard_is_a_plain_weight(tmp_path):
    """FSDP2's parameters are DTensors: they are the model's weights, not quantized ones."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor, init_device_mesh

    from prefix_attn.model_info import plain_weight

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        shard = distribute_tensor(torch.ones(4, 4), init_device_mesh("cpu", (1,)))
        assert plain_weight(torch.nn.Parameter(shard)) and plain_weight(shard)
        assert not plain_weight(shard.to(torch.float8_e4m3fn))
    finally:
        dist.destroy_process_group()


def test_a_model_whose_first_weight_is_on_meta_gets_a_bank_where_the_others_are():
    """Some weights on meta without accelerate's hook (not loaded yet, or offloaded by hand):
    the bank sits with the weights that hold data, not on meta."""
    from prefix_attn.model_info import model_dtype_device

    model = tiny_model("llama")
    model.model.embed_tokens.to_empty(device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert model_dtype_device(model) == (torch.float32, torch.device("cpu"))


def test_a_bf16_model_on_meta_gets_a_bf16_bank():
    """All parameters on meta (init_empty_weights in bf16): the first floating tensor holding
    data was RoPE's float32 inv_freq buffer, so the bank was float32 beside bf16 weights."""
    accelerate = pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    from prefix_attn.tiny import tiny_config

    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="prefix_attn",
                                                 dtype=torch.bfloat16)
    assert PrefixBank.attach(model).dtype == torch.bfloat16


def test_hf_init_calls_leave_trainable_prefixes_as_they_are():
    """post_init / init_weights / initialize_weights (how a head added beside the prefixes is
    set up) re-drew the prefix modules, which had no "initialised" mark: a trained or loaded
    prefix went back to the initializer's values, silently."""
    model = _tuned(["a"])
    prefix_attn.prefix_tuning(model, num_virtual_tokens=2, projection_hidden_size=8, name="mlp")
    before = {k: v.clone() for k, v in model.prefix_bank.state_dict().items()}
    model.post_init()
    model.init_weights()
    model.initialize_weights()
    after = model.prefix_bank.state_dict()
    assert before.keys() == after.keys() and len(before) == 6
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)


def test_moving_fixed_entries_to_meta_and_back_says_what_is_lost():
    """model.to("meta") then to_empty() failed inside the move with "Cannot copy out of meta
    tensor", leaving the bank on meta; now: a warning going to meta, a ValueError naming the
    entries coming back (no state dict holds them), and after removing them the move works."""
    model = _tuned(["a"])
    bank = model.prefix_bank
    bank.add("fixed", *torch.randn(2, bank.num_layers, bank.num_kv_heads, 3, bank.head_dim))
    with pytest.warns(UserWarning, match=r"prefix entries \['fixed'\] moved to meta lose their values"):
        model.to("meta")
    with pytest.raises(ValueError, match=r"prefix entries \['fixed'\] were moved to meta"):
        model.to_empty(device="cpu")
    assert bank.device.type == "meta"
    bank.remove("fixed")
    model.to_empty(device="cpu")
    assert bank.device.type == "cpu" and bank.names() == ["a"]


def test_a_user_hook_sees_positional_arguments_with_prefixes_too():
    """The pre-hook moved every positional argument into the keywords when prefixes= was given:
    a user's forward hook reading args[0] got an IndexError only then."""
    model = _tuned(["a"])
    seen = []
    model.register_forward_hook(lambda mod, args, out: seen.append(len(args)))
    ids = torch.tensor([[5, 9, 11, 3]])
    with torch.no_grad():
        want = model(ids, prefixes=["a"]).logits
        got = model(ids, torch.ones_like(ids), prefixes=["a"]).logits
        model(ids)
    assert seen == [1, 2, 1]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("wrapper", ["args_kwargs", "kwargs_only"])
def test_a_forward_wrapped_without_functools_wraps_still_shifts_positions(wrapper):
    """model.forward replaced on the instance by a plain (*args, **kwargs) wrapper: the pre-hook
    read the wrapper's parameters, found no "position_ids", and left the positions unshifted
    (logits silently not PEFT's); it reads the class's forward behind such a wrapper."""
    model = _tuned(["a"])
    ids = torch.tensor([[5, 9, 11, 3], [7, 2, 8, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    with torch.no_grad():
        want = model(ids, attention_mask=mask, prefixes=["a", "a"]).logits
        own = model.forward
        if wrapper == "args_kwargs":
            model.forward = lambda *args, **kwargs: own(*args, **kwargs)
            got = model(ids, mask, prefixes=["a", "a"]).logits
        else:
            model.forward = lambda **kwargs: own(**kwargs)
            got = model(input_ids=ids, attention_mask=mask, prefixes=["a", "a"]).logits
        del model.forward
    torch.testing.assert_close(got, want, rtol=0, atol=0)
