"""model.generate(..., prefixes=[...]): greedy, sampling, beam search, num_return_sequences."""
import warnings

import pytest
import torch

from prefix_attn.bank import PrefixBank
from prefix_attn.hf import cache_kwarg
from prefix_attn.tiny import CAUSAL_FAMILIES, tiny_model
from conftest import more_families, peft_comparable, require_attention_interface

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.hf

ADAPTERS = [("a", 3), ("b", 6), ("c", 4)]
NEW = 5


def _build(family, tmp_path_factory, adapters=ADAPTERS):
    """Our model with PEFT adapters in its bank, and the PEFT models."""
    ov = dict(peft_comparable(family), vocab_size=64)
    ours = tiny_model(family, **ov)
    bank = PrefixBank.attach(ours)
    peft_models = {}
    state = {k: v for k, v in ours.state_dict().items() if "prefix_bank" not in k}
    for i, (name, P) in enumerate(adapters):
        path = tmp_path_factory.mktemp(name)
        base = tiny_model(family, attn_implementation="eager", **ov)
        base.load_state_dict(state)
        pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM,
                                                              num_virtual_tokens=P))
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for p in pm.prompt_encoder.parameters():
                p.copy_(3 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(path)
        bank.load_peft(name, str(path))
        peft_models[name] = pm.eval()
    return ours, peft_models


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _build("llama", tmp_path_factory)


def _prompts():
    """A left-padded batch of three prompts of lengths 6, 3, 5."""
    g = torch.Generator().manual_seed(1)
    lens = [6, 3, 5]
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, 6 - n:] = torch.randint(3, 64, (n,), generator=g)
        mask[b, 6 - n:] = 1
    return ids, mask, lens


def _peft_logits(pm, row):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return pm(input_ids=row[None]).logits[0]


def _greedy_peft(pm, row, n):
    """PEFT's greedy tokens, recomputed from scratch each step; EOS is barred as generate's
    min_new_tokens bars it (a tiny random model picks it now and then)."""
    seq = row.clone()
    for _ in range(n):
        logits = _peft_logits(pm, seq)[-1].clone()
        logits[pm.config.eos_token_id] = float("-inf")
        seq = torch.cat([seq, logits.argmax()[None]])
    return seq[len(row):]


def _gen(ours, ids, mask, prefixes, **kw):
    kw.setdefault("pad_token_id", 0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ours.generate(ids, attention_mask=mask, prefixes=prefixes, max_new_tokens=NEW,
                             min_new_tokens=NEW, **kw)


def test_greedy_mixed_batch_matches_peft_loop_per_row(setup):
    ours, pms = setup
    ids, mask, lens = _prompts()
    names = ["b", "c", "a"]
    out = _gen(ours, ids, mask, names, do_sample=False, return_dict_in_generate=True)
    seqs = out.sequences
    for b, name in enumerate(names):
        want = _greedy_peft(pms[name], ids[b, 6 - lens[b]:], NEW)
        assert seqs[b, 6:].tolist() == want.tolist(), f"row {b} ({name})"
    # the KV cache holds the rows' own tokens only (prompt + generated - the last one)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    assert cache.get_seq_length() == 6 + NEW - 1
    # ids instead of names give the same tokens
    by_id = _gen(ours, ids, mask, ours.prefix_bank.ids(names), do_sample=False)
    assert torch.equal(by_id, seqs)


@pytest.mark.parametrize("family", [f for f in CAUSAL_FAMILIES if f != "llama"] + more_families())
def test_greedy_mixed_batch_every_family(family, tmp_path_factory):
    """Adapters of lengths 6, 1 and 3 in one left-padded batch, through each family's cache
    (GPT-2's absolute positions, sliding windows, Gemma 2's hybrid cache): each row's tokens
    are PEFT's greedy tokens for that row alone."""
    require_attention_interface(family)
    ours, pms = _build(family, tmp_path_factory, adapters=[("a", 3), ("b", 6), ("c", 1)])
    ids, mask, lens = _prompts()
    names = ["b", "c", "a"]
    seqs = _gen(ours, ids, mask, names, do_sample=False)
    for b, name in enumerate(names):
        want = _greedy_peft(pms[name], ids[b, 6 - lens[b]:], NEW)
        assert seqs[b, 6:].tolist() == want.tolist(), f"{family} row {b} ({name})"


def test_sampling_with_num_return_sequences_follows_row_prefixes(setup):
    """Each returned sequence's logits at every step are PEFT's forward logits of its row's
    adapter on that sequence (teacher forcing), so expanded rows kept their prefix."""
    ours, pms = setup
    ids, mask, lens = _prompts()
    names = ["a", "b", "c"]
    torch.manual_seed(0)
    out = _gen(ours, ids, mask, names, do_sample=True, top_k=0, num_return_sequences=2,
               return_dict_in_generate=True, output_logits=True)
    logits = torch.stack(out.logits, dim=1)               # [B * 2, NEW, V]
    for r in range(6):
        b = r // 2
        row = torch.cat([ids[b, 6 - lens[b]:], out.sequences[r, 6:]])
        want = _peft_logits(pms[names[b]], row)[lens[b] - 1:-1]
        torch.testing.assert_close(logits[r], want, rtol=1e-4, atol=1e-4, msg=f"sequence {r}")


@pytest.mark.parametrize("one", [torch.tensor(1), torch.tensor([1])])
def test_one_id_tensor_for_every_row_with_beams(setup, one):
    """A single bank id as a tensor (0-d or [1]) for every row: generate expanded the batch for
    beams but not the id (an error: "got 2 prefixes for a batch of 6 rows", or an IndexError
    inside transformers). It now gives what the same name for every row gives."""
    ours, _ = setup
    ids, mask, _ = _prompts()
    kw = dict(attention_mask=mask, num_beams=2, num_return_sequences=2, max_new_tokens=3,
              do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ours.generate(ids, prefixes=["b"], **kw)
        assert torch.equal(ours.generate(ids, prefixes=one, **kw), want)


def test_beam_search_mixed_batch_matches_single_rows(setup):
    """Beams of a mixed left-padded batch equal the beams of each row alone, and the best beam's
    score is the sum of PEFT's log-probabilities of its tokens (length_penalty=0)."""
    ours, pms = setup
    ids, mask, lens = _prompts()
    names = ["c", "a", "b"]
    kw = dict(num_beams=3, num_return_sequences=2, do_sample=False, length_penalty=0.0,
              early_stopping=True, return_dict_in_generate=True, output_scores=True)
    out = _gen(ours, ids, mask, names, **kw)
    for b, name in enumerate(names):
        row = ids[b, 6 - lens[b]:][None]
        alone = _gen(ours, row, torch.ones_like(row), [name], **kw)
        assert out.sequences[2 * b:2 * b + 2, 6:].tolist() == alone.sequences[:, lens[b]:].tolist()
        best = torch.cat([row[0], out.sequences[2 * b, 6:]])
        logp = torch.log_softmax(_peft_logits(pms[name], best), -1)
        tokens = best[lens[b]:]
        total = logp[lens[b] - 1:-1].gather(-1, tokens[:, None]).sum()
        torch.testing.assert_close(out.sequences_scores[2 * b], total, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text"])
def test_generate_without_prefix_equals_baseline_through_sliding_cache(family):
    """Window 4 < prompt + new tokens: the sliding-window cache path agrees with sdpa/eager."""
    ours = tiny_model(family)
    ref = tiny_model(family, attn_implementation="eager" if family == "gemma2" else "sdpa")
    ref.load_state_dict(ours.state_dict())
    ids, mask, _ = _prompts()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_static_cache_matches_dynamic_cache(family, tmp_path_factory):
    """A static cache (prefill: dense-mask fallback; decode: unfilled slots masked as padding),
    on every causal family."""
    ours, _ = _build(family, tmp_path_factory, adapters=[("a", 3), ("b", 6)])
    ids, mask, _ = _prompts()
    names = ["b", None, "a"]
    dynamic = _gen(ours, ids, mask, names, do_sample=False)
    static = _gen(ours, ids, mask, names, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


@pytest.mark.parametrize("S", [5, 6])
def test_static_cache_past_a_sliding_window_with_padding_equals_sdpa(S):
    """A model whose layers are all sliding gets one 2-D mask from generate's static-cache
    set-up (create_masks_for_generate) as its attention_mask; read again as a padding mask it
    was cut at the window's offset twice: keys shifted, wrong tokens once a left-padded batch
    passed the window (Mistral, window 6)."""
    g = torch.Generator().manual_seed(S)
    ids = torch.randint(3, 64, (2, S), generator=g)
    ids[1, :S - 2] = 0
    mask = (ids != 0).long()
    out = {}
    for impl in ("sdpa", "prefix_attn"):
        model = tiny_model("mistral", vocab_size=64, sliding_window=6, attn_implementation=impl)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                                       do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(out["prefix_attn"], out["sdpa"])


def test_chunks_on_a_cache_equal_one_forward(setup):
    """Several new tokens at once on top of a cache (chunked prefill, speculative verification):
    mixed prefixes in a left-padded batch, the chunk's logits equal those of one forward over
    the whole sequence (bottom-right causal alignment over prefix + cache + chunk)."""
    from prefix_attn.hf import cache_kwarg

    ours, _ = setup
    ids, mask, _ = _prompts()
    names = ["b", None, "c"]
    with torch.no_grad():
        whole = ours(ids, attention_mask=mask, prefixes=names).logits
        first = ours(ids[:, :3], attention_mask=mask[:, :3], prefixes=names, use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        chunk = ours(ids[:, 3:], attention_mask=mask, prefixes=names,
                     **{cache_kwarg(ours): cache}).logits
    keep = mask[:, 3:].bool()
    torch.testing.assert_close(chunk[keep], whole[:, 3:][keep], rtol=1e-5, atol=1e-5)


def test_assisted_generation_keeps_the_prefix(setup):
    """Prompt-lookup decoding verifies several drafted tokens per step: the same tokens as
    plain greedy decoding with the prefix."""
    ours, _ = setup
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    kw = dict(prefixes=["b"], do_sample=False, pad_token_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        greedy = ours.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, **kw)
        lookup = ours.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW,
                               prompt_lookup_num_tokens=3, **kw)
    assert torch.equal(lookup, greedy)


@pytest.mark.hf
def test_static_cache_prefill_takes_the_fused_path(monkeypatch):
    """A static cache's prefill (queries at the start of a longer buffer) used to go through the
    dense-mask fallback: 5-7x slower and 10x the memory at 1.5k tokens. The mask now covers the
    filled slots and K/V are cut there; same logits and tokens as the dynamic cache."""
    import prefix_attn
    from prefix_attn.hf import attention as hf  # the module that calls it
    from transformers import StaticCache

    from prefix_attn.tiny import tiny_model

    model = tiny_model("llama")
    bank = prefix_attn.PrefixBank.attach(model)
    cfg = model.config
    D = cfg.hidden_size // cfg.num_attention_heads
    bank.add("a", torch.randn(2, 2, 5, D), torch.randn(2, 2, 5, D))
    bank.add("b", torch.randn(2, 2, 2, D), torch.randn(2, 2, 2, D))
    fallbacks = []
    real = hf.eager_prefix_attention
    monkeypatch.setattr(hf, "eager_prefix_attention",
                        lambda *a, **k: fallbacks.append(1) or real(*a, **k))
    ids = torch.randint(3, 100, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0
    rows = ["a", "b", None]
    with torch.no_grad():
        static = model(ids, attention_mask=mask, prefixes=rows,
                       **{cache_kwarg(model): StaticCache(config=cfg, max_cache_len=40)}).logits
        dynamic = model(ids, attention_mask=mask, prefixes=rows).logits
    torch.testing.assert_close(static, dynamic, rtol=0, atol=1e-6)
    kw = dict(do_sample=False, max_new_tokens=5, pad_token_id=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, prefixes=rows, **kw),
                       model.generate(ids, attention_mask=mask, prefixes=rows,
                                      cache_implementation="static", **kw))
    assert fallbacks == []


@pytest.mark.hf
@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_static_cache_within_a_sliding_window_takes_the_fused_path(family, monkeypatch):
    """A static cache no longer than the sliding window (the usual case: windows of 4096) sent
    every step of every sliding layer to the dense-mask fallback (the causal rules for an
    unaligned buffer were kept for the causal pattern only): the window hides nothing there."""
    from prefix_attn.hf import attention as hf  # the module that calls it

    model = tiny_model(family, sliding_window=64)
    bank = PrefixBank.attach(model)
    L, Hkv, D = bank.num_layers, bank.num_kv_heads, bank.head_dim
    bank.add("a", torch.randn(L, Hkv, 7, D), torch.randn(L, Hkv, 7, D))
    bank.add("b", torch.randn(L, Hkv, 2, D), torch.randn(L, Hkv, 2, D))
    fallbacks = []
    real = hf.eager_prefix_attention
    monkeypatch.setattr(hf, "eager_prefix_attention",
                        lambda *a, **k: fallbacks.append(1) or real(*a, **k))
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0
    kw = dict(attention_mask=mask, prefixes=["a", "b", None], do_sample=False, max_new_tokens=5,
              min_new_tokens=5, pad_token_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic = model.generate(ids, **kw)
        static = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(static, dynamic)
    assert fallbacks == []


@pytest.mark.hf
def test_fullgraph_compiled_forward_with_a_static_cache_and_left_padding():
    """The fast-decode recipe (torch.compile(model.forward, fullgraph=True), static cache) on a
    left-padded batch with prefixes: the compiled prefill reached the one-time fallback warning,
    which dynamo cannot trace; the tokens equal the eager ones."""
    import prefix_attn
    from prefix_attn.tiny import tiny_model

    model = tiny_model("llama")
    bank = prefix_attn.PrefixBank.attach(model)
    D = model.config.hidden_size // model.config.num_attention_heads
    bank.add("a", torch.randn(2, 2, 5, D), torch.randn(2, 2, 5, D))
    ids = torch.randint(3, 100, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kw = dict(attention_mask=mask, prefixes=["a", None], max_new_tokens=4, do_sample=False,
              pad_token_id=0)
    ref = model.generate(ids, **kw)
    model.forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kw), ref)


@pytest.mark.hf
def test_sliding_window_model_compiles_to_one_graph_on_the_fused_path():
    """Inside torch.compile transformers makes the sliding-window mask function in the graph,
    where its closure cannot be read: the mask interface raised an AttributeError in dynamo
    (fullgraph failed; otherwise the whole model ran eagerly). Now told from transformers'
    call: one graph, the fused op in it, no dense fallback; a static-cache generate past the
    window with left padding, compiled fullgraph, gives sdpa's tokens (its 2-D mask, handed
    back by generate, is a new tensor inside the graph: told by shape)."""
    import torch._dynamo

    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 64, (2, 6), generator=g)
    ids[1, :4] = 0
    mask = (ids != 0).long()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = tiny_model("mistral", vocab_size=64, sliding_window=4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the dense fallback would warn
        want = model(ids, attention_mask=mask).logits
        torch._dynamo.reset()
        got = torch.compile(model, backend=record, fullgraph=True)(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ops = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert len(graphs) == 1 and sum("prefix_attn" in op for op in ops) == model.config.num_hidden_layers

    kw = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    ref = tiny_model("mistral", vocab_size=64, sliding_window=6, attn_implementation="sdpa")
    model = tiny_model("mistral", vocab_size=64, sliding_window=6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref.generate(ids, **kw)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend="eager", fullgraph=True)
        assert torch.equal(model.generate(ids, **kw), want)


@pytest.mark.hf
def test_mask_functions_are_told_apart_inside_a_compiled_graph():
    """transformers' mask functions are recognised by their code, which dynamo reads: inside a
    graph getattr(fn, "__qualname__", "") gave "" for a function the graph made (the overlay
    taken for an unknown mask), and torch 2.14 failed on a module-level one (fullgraph broke
    on the sliding-window model)."""
    import torch._dynamo
    from transformers import masking_utils as mu

    from prefix_attn.hf import mask

    def told(x):
        made = mu.sliding_window_overlay(3)
        packed = mu.packed_sequence_mask_function(x.long())
        return (x + mask._made_by(made, "sliding_window_overlay")
                + 2 * mask._made_by(packed, "packed_sequence_mask_function")
                + 4 * mask._made_by(mu.causal_mask_function, "sliding_window_overlay")
                + 8 * mask._made_by(made, "packed_sequence_mask_function")
                + 16 * mask._made_by(len, "sliding_window_overlay"))

    x = torch.zeros(1, 2)
    assert told(x).tolist() == [[3.0, 3.0]]
    torch._dynamo.reset()
    assert torch.compile(told, backend="eager", fullgraph=True)(x).tolist() == [[3.0, 3.0]]


def _serving_model(seed, lengths):
    """A tiny llama with a bank of entries {name: length}, prompt ids [2, 6], generate kwargs."""
    import prefix_attn

    model = tiny_model("llama")
    bank = prefix_attn.PrefixBank.attach(model)
    D = model.config.hidden_size // model.config.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    for name, P in lengths.items():
        bank.add(name, torch.randn(2, 2, P, D, generator=g), torch.randn(2, 2, P, D, generator=g))
    ids = torch.randint(3, 100, (2, 6), generator=g)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    return model, ids, kw


def _graphs_added_by_second(model, ids, kw, first, second):
    """Graphs a compiled ``model.forward`` adds at ``generate(prefixes=second)`` after one with
    ``first``; both must give eager's tokens."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    want = [model.generate(ids, prefixes=list(rows), **kw) for rows in (first, second)]
    torch._dynamo.reset()
    counters.clear()
    forward = model.forward
    model.forward = torch.compile(forward, backend="eager")
    try:
        assert torch.equal(model.generate(ids, prefixes=list(first), **kw), want[0])
        graphs = counters["stats"]["unique_graphs"]
        assert torch.equal(model.generate(ids, prefixes=list(second), **kw), want[1])
        return counters["stats"]["unique_graphs"] - graphs
    finally:
        model.forward = forward


def test_compiled_serving_reuses_graphs_for_one_position_prefixes():
    """One-position prefixes (a one-token prompt entry, num_virtual_tokens=1) are a size dynamo
    specialises: one entry for all rows, or a stack whose longest is 1, compiled graphs of
    their own. Padded to two positions, they reuse the others' graphs with eager's tokens; the
    eager fallback (output_attentions) still shows one prefix column."""
    model, ids, kw = _serving_model(4, {"A": 5, "B": 3, "one": 1, "solo": 1})
    with torch.no_grad():
        probs = model(ids, prefixes=["one", None], output_attentions=True).attentions[0]
    assert probs.shape[-1] == ids.shape[1] + 1
    assert _graphs_added_by_second(model, ids, kw, ("A", "A"), ("one", "one")) == 0
    assert _graphs_added_by_second(model, ids, kw, ("A", "B"), ("one", None)) == 0


def test_in_place_edit_of_a_one_position_entry_is_seen():
    """A one-entry batch reads the entry in place, so an in-place edit shows at the next call;
    the padded copy of a one-position prefix (for compiled serving) hid it until clear_cache."""
    model, ids, _ = _serving_model(5, {"one": 1, "A": 5})
    with torch.no_grad():
        before = model(ids, prefixes="one").logits
        model.prefix_bank.entry_kv("one").mul_(3.0)
        after = model(ids, prefixes="one").logits
        model.prefix_bank.clear_cache()
        fresh = model(ids, prefixes="one").logits
    assert not torch.equal(before, fresh)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)


def test_compiled_serving_does_not_recompile_when_the_longest_prefix_changes():
    """torch.compile(model.forward) serving a mix of requests recompiled at the first batch
    whose stacked entries had another longest prefix (and another count), on top of the
    one-entry, no-prefix and cache-growth graphs every server sees: a mix of five request kinds
    reached dynamo's recompile limit (8) and later kinds ran eagerly. Those dims are marked
    dynamic now: a batch of other entries with the same layout reuses the graphs."""
    model, ids, kw = _serving_model(1, {"A": 5, "B": 7, "C": 3})
    assert _graphs_added_by_second(model, ids, kw, ("A", "B"), ("C", "A")) == 0


def test_compiled_serving_reuses_one_entry_graphs_for_batches_without_prefixes():
    """A batch in which no row has a prefix selected one entry of length 0, a size dynamo
    specialises: a compiled server compiled a prefill and a decode graph for it on top of the
    one-entry ones (8 graphs, dynamo's recompile limit, for a six-kind mix). Its prefix is now
    padded to two masked positions: the one-entry graphs serve it, with the same tokens; and
    the eager fallback (output_attentions) still sees no prefix column."""
    model, ids, kw = _serving_model(2, {"A": 5})
    with torch.no_grad():
        probs = model(ids, prefixes=[None, None], output_attentions=True).attentions[0]
    assert probs.shape[-1] == ids.shape[1]  # no prefix column
    assert _graphs_added_by_second(model, ids, kw, ("A", "A"), (None, None)) == 0
