"""Serving through the Python API: inference mode, ids from request tables, exact row counts,
and a request isolated from other tenants' bank changes while it generates."""
import threading

import numpy as np
import pytest
import torch

from prefix_attn.bank import PrefixBank
from prefix_attn.tiny import tiny_model

pytestmark = pytest.mark.hf


def _served(names=("A", "B")):
    model = tiny_model("llama", vocab_size=64).eval()
    bank = PrefixBank.attach(model)
    g = torch.Generator().manual_seed(3)
    for i, name in enumerate(names):
        bank.add(name, *(2 * torch.randn(2, bank.num_layers, bank.num_kv_heads, 3 + i,
                                         bank.head_dim, generator=g)))
    return model, bank


def _ids(B=1, S=5, seed=0):
    return torch.randint(3, 64, (B, S), generator=torch.Generator().manual_seed(seed))


def test_batch_of_one_under_inference_mode():
    """A one-row forward read position_ids' version counter, which inference tensors lack:
    every request of one row (and every add_prompt) failed under torch.inference_mode()."""
    model, bank = _served()
    x = _ids()
    with torch.no_grad():
        want = model(x, prefixes=["A"]).logits
        plain = model(x).logits
        tokens = model.generate(x, prefixes=["A"], max_new_tokens=3, do_sample=False)
    with torch.inference_mode():
        torch.testing.assert_close(model(x, prefixes=["A"]).logits, want)
        torch.testing.assert_close(model(x).logits, plain)
        assert torch.equal(model.generate(x, prefixes=["A"], max_new_tokens=3, do_sample=False), tokens)
        bank.add_prompt("p", x[0])
    assert bank.entry_len("p") == x.shape[1]


def test_entries_added_under_inference_mode_work_with_autograd():
    """An entry stored as an inference tensor broke every later forward that records autograd
    ('Inference tensors cannot be saved for backward')."""
    model, bank = _served(names=())
    kv = torch.randn(2, bank.num_layers, bank.num_kv_heads, 3, bank.head_dim)
    with torch.inference_mode():
        bank.add("A", *kv)
        bank.add_prompt("p", _ids()[0])
        model.to(torch.float32)  # _apply under inference mode
    assert not bank.get("A")[0].is_inference() and not bank.get("p")[0].is_inference()
    x = _ids(seed=1)
    emb = model.get_input_embeddings()(x).detach().requires_grad_()
    model(inputs_embeds=emb, prefixes=["A"]).logits.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_ids_from_numpy_and_zero_dim_tensors():
    model, bank = _served()
    x = _ids(B=2)
    with torch.no_grad():
        want = model(x, prefixes=[0, None]).logits
        for rows in (list(np.array([0, -1])), list(torch.tensor([0, -1])), [np.int32(0), None]):
            torch.testing.assert_close(model(x, prefixes=rows).logits, want)
    for bad in ([np.float64(0.0), None], [torch.tensor(0.0), None], [np.bool_(True), None],
                [torch.tensor([0]), None]):
        with pytest.raises(TypeError, match="each prefix must be a name, an int id or None"):
            bank.ids(bad)


def test_prefix_count_must_match_the_rows():
    """A 4-row batch given 2 names became [A, A, B, B] (generate's row expansion applied to
    every call): rows answered with another tenant's prefix. Now one per row, or one for all."""
    model, bank = _served()
    x = _ids(B=4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="got 2 prefixes for a batch of 4 rows"):
            model(x, prefixes=["A", "B"])
        with pytest.raises(ValueError, match="got 2 prefixes for a batch of 4 rows"):
            model.generate(x, prefixes=["A", "B"], max_new_tokens=2)
        with pytest.raises(ValueError, match="got 2 prefixes for a batch of 4 rows"):
            model(x, prefixes=bank.ids(["A", "B"]))
        one = model(x, prefixes=["B"]).logits  # one name: every row
        torch.testing.assert_close(one, model(x, prefixes=["B"] * 4).logits)


def test_generate_expands_row_prefixes_for_beams_and_samples():
    """generate turns names into an id tensor that it expands with the rows (beams,
    num_return_sequences): each returned sequence keeps its row's prefix."""
    model, bank = _served()
    x = _ids(B=2, seed=4)
    with torch.no_grad():
        beams = model.generate(x, prefixes=["A", "B"], num_beams=2, num_return_sequences=2,
                               max_new_tokens=3, do_sample=False)
        for row, name in enumerate(["A", "B"]):
            alone = model.generate(x[row:row + 1], prefixes=[name], num_beams=2,
                                   num_return_sequences=2, max_new_tokens=3, do_sample=False)
            assert torch.equal(beams[2 * row:2 * row + 2], alone)


def _changing_bank_during(model, prefixes, change):
    """Greedy tokens of one row when ``change`` runs after the first decode step."""
    steps = []

    def hook(module, args, kwargs):
        steps.append(1)
        if len(steps) == 2:
            change()

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            return model.generate(_ids(seed=5), prefixes=prefixes, max_new_tokens=6, do_sample=False)
    finally:
        handle.remove()


@pytest.mark.parametrize("change", ["remove_other", "replace", "remove_own"])
def test_a_running_generate_keeps_its_prefixes(change):
    """Each decode step read the live bank: another tenant's removal shifted ids (the row
    switched prefix mid-answer), a replaced entry mixed two prompts, a removed one raised
    KeyError half-way. generate now pins the bank for its call."""
    model, bank = _served(names=("other", "A", "B"))
    with torch.no_grad():
        want = model.generate(_ids(seed=5), prefixes=["A"], max_new_tokens=6, do_sample=False)
    new_kv = torch.randn(2, bank.num_layers, bank.num_kv_heads, 4, bank.head_dim)
    act = {"remove_other": lambda: bank.remove("other"),
           "replace": lambda: bank.add("A", *new_kv),
           "remove_own": lambda: bank.remove("A")}[change]
    rows = [bank.id_of("A")] if change == "remove_other" else ["A"]  # ids shift on a removal
    got = _changing_bank_during(model, rows, act)
    assert torch.equal(got, want)
    if change == "replace":  # the next request sees the new entry
        with torch.no_grad():
            after = model.generate(_ids(seed=5), prefixes=["A"], max_new_tokens=6, do_sample=False)
        assert not torch.equal(after, want)


def test_a_running_generate_keeps_its_stacked_prefixes_after_a_bank_change(monkeypatch):
    """Once another tenant changed the bank, a running generate's snapshot was no longer the
    bank's version, which alone was cached: every later decode step of a batch mixing entries
    rebuilt the stacked copy [L, 2, n, Hkv, Pmax, D] (and its ids). The pinned call now keeps
    its own cache: one stack for the whole call, the same tokens."""
    import prefix_attn.bank_select as bank_module

    model, bank = _served()
    stacks = []  # every stack seen, kept alive: a freed one's address could be reused

    class Counting(bank_module.PrefixSelection):
        def __init__(self, kv, *args, **kwargs):
            super().__init__(kv, *args, **kwargs)
            if kv.dim() == 6 and kv.shape[2] == 2:
                stacks.append(kv)

    monkeypatch.setattr(bank_module, "PrefixSelection", Counting)
    x = _ids(B=2, seed=6)
    kw = dict(prefixes=["A", "B"], max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        want = model.generate(x, **kw)
    bank.clear_cache()
    stacks.clear()
    steps = []

    def hook(module, args, kwargs):
        steps.append(1)
        if len(steps) == 2:
            bank.add("other", *torch.randn(2, bank.num_layers, bank.num_kv_heads, 2, bank.head_dim))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            assert torch.equal(model.generate(x, **kw), want)
    finally:
        handle.remove()
    assert len(steps) == 8 and len({kv.data_ptr() for kv in stacks}) == 1


def test_pinned_is_per_thread():
    """A pin holds for its own thread only: another thread sees the bank's changes."""
    _, bank = _served()
    seen = {}
    with bank.pinned():
        bank.remove("A")
        assert bank.ids(["B"]).tolist() == [1]  # the pinned snapshot: B is still id 1

        def other():
            seen["ids"] = bank.ids(["B"]).tolist()

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["ids"] == [0]
    assert bank.ids(["B"]).tolist() == [0]


def test_compiled_static_cache_decode_has_no_graph_break():
    """generate's auto-compile of static-cache decode steps broke the graph in the mask
    function (int() of the traced query offset) on every step; sdpa's has none. CPU: compile
    forced (transformers compiles only on CUDA by default), dynamo's cheap eager backend."""
    import torch._dynamo
    from transformers import CompileConfig

    cc = CompileConfig(backend="eager")
    if not hasattr(cc, "_compile_all_devices"):
        pytest.skip("this transformers has no CompileConfig._compile_all_devices")
    cc._compile_all_devices = True
    model, bank = _served()
    bank.add_prompt("sys", torch.tensor([5, 9, 11, 3, 7]))
    ids = torch.tensor([[0, 0, 4, 8, 15, 16], [23, 42, 7, 7, 9, 1]])
    kw = dict(attention_mask=(ids != 0).long(), max_new_tokens=6, do_sample=False, pad_token_id=0,
              prefixes=["sys", "A"])
    with torch.no_grad():
        want = model.generate(ids, **kw)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        got = model.generate(ids, cache_implementation="static", compile_config=cc, **kw)
    breaks = torch._dynamo.utils.counters["graph_break"]
    torch._dynamo.reset()
    assert torch.equal(got, want)
    assert sum(breaks.values()) == 0, [k.splitlines()[0] for k in breaks]


def test_generate_refuses_prefixes_on_a_model_without_a_bank():
    """transformers accepts prefixes= (a registered keyword) and passes it to attention
    functions that ignore it: generate on a model without a bank answered without the prefix."""
    model = tiny_model("llama", vocab_size=64).eval()
    with pytest.raises(ValueError, match="without a prefix bank: the prefixes would be ignored"):
        model.generate(_ids(), prefixes=["A"], max_new_tokens=2)
    with torch.no_grad():  # no prefixes: generate as before
        assert model.generate(_ids(), max_new_tokens=2).shape == (1, 7)


def test_assisted_generation_with_an_assistant_without_a_bank():
    """An assistant model drafts without the prefixes (it has no bank); the main model checks
    each drafted token with them: the same tokens as plain greedy decoding."""
    model, _ = _served()
    assistant = tiny_model("llama", vocab_size=64, seed=3).eval()
    _assert_assisted_equals_greedy(model, assistant)
    # once the assisted generate is over, the assistant is a model without a bank again: its
    # own generate with prefixes raises instead of dropping them as a drafting assistant does
    with pytest.raises(ValueError, match="without a prefix bank"):
        assistant.generate(torch.tensor([[5, 6]]), prefixes=["B"], max_new_tokens=2, pad_token_id=0)


def _assert_assisted_equals_greedy(model, assistant):
    import warnings

    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    kw = dict(prefixes=["B"], max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        greedy = model.generate(ids, **kw)
        assisted = model.generate(ids, assistant_model=assistant, **kw)
    assert torch.equal(assisted, greedy)


@pytest.mark.parametrize("draft_names", [["B", "X"], ["X"]])
def test_assisted_generation_with_an_assistant_that_has_its_own_bank(draft_names):
    """The assistant's bank holds its entries in another order (or lacks the main one's): the
    main bank's ids were handed to it as they were (a wrong draft prefix, or out of range). It
    now reads the same names from its own bank (none it lacks: it drafts without prefixes)."""
    from prefix_attn.bank import PrefixBank

    model, _ = _served()
    assistant = tiny_model("llama", vocab_size=64, seed=3).eval()
    draft = PrefixBank.attach(assistant)
    for name in draft_names:
        draft.add(name, torch.randn(draft.num_layers, draft.num_kv_heads, 2, draft.head_dim),
                  torch.randn(draft.num_layers, draft.num_kv_heads, 2, draft.head_dim))
    asked = []
    real = draft.select
    draft.select = lambda p, *a, **k: (asked.append(p.tolist() if torch.is_tensor(p) else p),
                                       real(p, *a, **k))[1]
    _assert_assisted_equals_greedy(model, assistant)
    if "B" in draft_names:
        assert asked and all(a == [draft_names.index("B")] for a in asked)
    else:
        assert asked == []


def test_numpy_arrays_of_ids_and_a_removed_bank():
    """prefixes= as a numpy array (ids read from a table) works in forward and generate; after
    `del model.prefix_bank`, prefixes= is a clear error (was a bare AttributeError)."""
    import numpy as np

    model, bank = _served()
    ids = torch.tensor([[5, 6, 7], [7, 6, 5]])
    rows = np.array([bank.id_of("B"), -1])
    with torch.no_grad():
        want = model(ids, prefixes=["B", None]).logits
        torch.testing.assert_close(model(ids, prefixes=rows).logits, want, rtol=0, atol=0)
        kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, prefixes=rows, **kw),
                           model.generate(ids, prefixes=["B", None], **kw))
    del model.prefix_bank
    with pytest.raises(ValueError, match="whose prefix bank was removed"):
        model(ids, prefixes=["B", None])


def test_ids_of_a_generate_inside_another_banks_pin_are_its_own():
    """Any pin of another bank was taken for assisted generation: the ids of a generate run
    inside it (a guard model's, from a logits processor of another model's generate) were
    read through the other bank's names (["B", "A"] became ["A", None]), and a model without
    a bank dropped its prefixes silently instead of raising."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model, bank = _served(("A", "B"))
    guard, guard_bank = _served(("B", "A", "C"))
    x = _ids(B=2, seed=4)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    ids = torch.tensor([0, 2])  # the guard's "B" and "C"
    seen = []

    class Guard(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if not seen:
                seen.append(guard.generate(x, prefixes=ids, **kw))
                with pytest.raises(ValueError, match="without a prefix bank"):
                    tiny_model("llama", vocab_size=64).generate(x, prefixes=["A", "B"], **kw)
            return scores

    with torch.no_grad():
        want = guard.generate(x, prefixes=["B", "C"], **kw)
        with bank.pinned():
            assert torch.equal(guard.generate(x, prefixes=ids, **kw), want)
        model.generate(x, prefixes=["A", "B"], logits_processor=LogitsProcessorList([Guard()]), **kw)
    assert torch.equal(seen[0], want)


@pytest.mark.parametrize("extra", [dict(num_beams=2), dict(num_return_sequences=2, do_sample=True)])
def test_a_bank_on_a_submodule_with_beams(extra):
    """A bank attached to the language model inside (a VLM's): generate pinned it but passed the
    names on as a list, which generate does not expand with the rows: "got 2 prefixes for a
    batch of 4 rows". Its ids are made before generate now, as for a bank on the model."""
    model = tiny_model("llama", vocab_size=64).eval()
    bank = PrefixBank.attach(model.model)
    g = torch.Generator().manual_seed(3)
    for i, name in enumerate(("A", "B")):
        bank.add(name, *(2 * torch.randn(2, bank.num_layers, bank.num_kv_heads, 3 + i,
                                         bank.head_dim, generator=g)))
    x = _ids(B=2, seed=5)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(x, prefixes=["A", "B"], max_new_tokens=3, pad_token_id=0, **extra)
        torch.manual_seed(0)
        by_id = model.generate(x, prefixes=torch.tensor([0, 1]), max_new_tokens=3, pad_token_id=0,
                               **extra)
    assert out.shape[0] == 2 * extra.get("num_return_sequences", 1) and torch.equal(out, by_id)


@pytest.mark.parametrize("ids, words", [
    (torch.tensor([0, 1]), r"got 2 prefixes for a batch of 3 rows"),
    (torch.tensor([[0, 1, 0]]), r"must be a \[B\] tensor, got shape \[1, 3\]"),
    (torch.tensor([0, 99, 1]), r"prefix ids \[99\] are not in this bank"),
])
def test_a_bad_id_tensor_is_named_as_given(ids, words):
    """An id tensor was checked only at the first forward, after generate had expanded it with
    the beams: errors named 4 prefixes for 6 rows, a [2, 3] shape, id 99 twice."""
    model, _ = _served()
    with pytest.raises(ValueError, match=words):
        model.generate(_ids(B=3), prefixes=ids, num_beams=2, max_new_tokens=2, pad_token_id=0)


def test_a_wrapped_assistant_drafts_without_prefixes():
    """An assistant given as torch.compile's OptimizedModule (or a PeftModel) runs the generate of
    the model inside it: that model was not recognised as the assistant (a review of the
    _ASSISTING change) and raised "without a prefix bank"."""
    model, _ = _served()
    assistant = torch.compile(tiny_model("llama", vocab_size=64, seed=3).eval(), backend="eager")
    _assert_assisted_equals_greedy(model, assistant)
