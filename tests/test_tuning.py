"""Prefix tuning on the fused path vs PEFT: gradients, checkpointing, multi-task, save, convergence."""
import warnings

import pytest
import torch

import prefix_attn.api
from prefix_attn.tiny import CAUSAL_FAMILIES, tiny_model
from prefix_attn.tuning import PrefixParameters, prefix_tuning, trainable_parameters
from conftest import more_families, peft_comparable, prefix_step, require_attention_interface

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.hf

P = 4


def _batch(B=3, S=7, vocab=128, seed=0, pad="left"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if pad == "left":
        mask[1, :2] = 0
        mask[2, :3] = 0
    elif pad == "right":
        mask[1, -2:] = 0
        mask[2, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _pair(family="llama", projection=None, seed=0, **cfg):
    """(ours, our prefix module, PEFT model) from the same base weights and initial prefix."""
    cfg = dict(peft_comparable(family), **cfg)
    ours = tiny_model(family, seed=seed, **cfg)
    base = tiny_model(family, seed=seed, attn_implementation="eager", **cfg)
    base.load_state_dict(ours.state_dict())
    pcfg = peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=P,
                                   prefix_projection=projection is not None,
                                   encoder_hidden_size=projection)
    torch.manual_seed(seed + 1)
    pm = peft.get_peft_model(base, pcfg)
    module = prefix_tuning(ours, num_virtual_tokens=P, projection_hidden_size=projection)
    module.load_state_dict(pm.prompt_encoder["default"].state_dict())
    return ours, module, pm


def test_prefix_tuning_freezes_base_and_adds_trainable_prefixes():
    model = tiny_model("llama", attn_implementation="sdpa")
    n_base = sum(p.numel() for p in model.parameters())
    a = prefix_tuning(model, num_virtual_tokens=5, name="a")
    b = prefix_tuning(model, num_virtual_tokens=3, projection_hidden_size=16, name="b")
    assert model.config._attn_implementation == "prefix_attn"
    bank = model.prefix_bank
    assert bank.names() == ["a", "b"] and bank.entry_len("a") == 5 and bank.entry_len("b") == 3
    trainable = trainable_parameters(model)
    assert {id(p) for p in trainable} == {id(p) for p in [*a.parameters(), *b.parameters()]}
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == n_base
    L, H, D = bank.num_layers, bank.num_kv_heads, bank.head_dim
    assert a().shape == (L, 2, H, 5, D) and b().shape == (L, 2, H, 3, D)


@pytest.mark.parametrize("family,projection", [(f, p) for f in CAUSAL_FAMILIES for p in (None, 16)]
                         + more_families(None))
def test_loss_and_prefix_grads_match_peft(family, projection):
    require_attention_interface(family)
    ours, module, pm = _pair(family, projection)
    ids, mask, labels = _batch()
    ours.train()
    pm.train()
    loss = ours(ids, attention_mask=mask, labels=labels, prefixes=["default"] * 3).loss
    loss.backward()
    loss_peft = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_peft.backward()
    torch.testing.assert_close(loss, loss_peft, rtol=1e-5, atol=1e-6)
    enc = pm.prompt_encoder["default"]
    for (n1, p1), (n2, p2) in zip(module.named_parameters(), enc.named_parameters()):
        assert n1 == n2
        assert p1.grad is not None and p1.grad.abs().sum() > 0
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6)


def test_prefix_reaches_kernel_once_not_per_row(monkeypatch):
    """Four rows share one prefix: the kernel gets a bank of 1 entry, and backward reaches it."""
    model = tiny_model("llama")
    module = prefix_tuning(model, num_virtual_tokens=P)
    seen = []
    real = prefix_attn.api.prefix_attention

    def spy(q, k, v, pk=None, pv=None, **kw):
        seen.append((tuple(pk.shape), pk.requires_grad, tuple(kw["prefix_ids"].shape)))
        return real(q, k, v, pk, pv, **kw)

    monkeypatch.setattr(prefix_attn.api, "prefix_attention", spy)
    ids, mask, labels = _batch(B=4, pad=None)
    model(ids, labels=labels, prefixes=["default"] * 4).loss.backward()
    L, H, D = model.prefix_bank.num_layers, model.prefix_bank.num_kv_heads, model.prefix_bank.head_dim
    assert seen == [((1, H, P, D), True, (4,))] * L
    assert module.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family,projection", [(f, p) for f in CAUSAL_FAMILIES for p in (None, 16)]
                         + more_families(None))
def test_gradient_checkpointing_same_grads(family, projection):
    require_attention_interface(family)
    model = tiny_model(family)
    module = prefix_tuning(model, num_virtual_tokens=P, projection_hidden_size=projection)
    ids, mask, labels = _batch()
    model.train()

    loss0, g0 = prefix_step(model, module, ids, mask, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias, still the documented call
        model.gradient_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    loss1, g1 = prefix_step(model, module, ids, mask, labels)
    torch.testing.assert_close(loss1, loss0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_multi_task_rows_choose_their_prefix():
    """Two trainable prefixes in one batch: each gets the gradient of its own rows only."""
    model = tiny_model("llama")
    a = prefix_tuning(model, num_virtual_tokens=3, name="a")
    b = prefix_tuning(model, num_virtual_tokens=5, projection_hidden_size=8, name="b")
    ids, mask, labels = _batch(B=4, pad="right")
    mask[3, -1:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    rows = ["a", "b", "b", "a"]

    def run(sel):
        for p in trainable_parameters(model):
            p.grad = None
        out = model(ids[sel], attention_mask=mask[sel], prefixes=[rows[i] for i in sel])
        logp = torch.log_softmax(out.logits[:, :-1], -1)
        tgt = labels[sel][:, 1:]
        nll = -logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
        loss = (nll * (tgt != -100)).sum()
        loss.backward()
        return out.logits.detach(), {n: p.grad.clone() if p.grad is not None else None
                                     for n, p in model.named_parameters() if p.requires_grad}

    logits_all, g_all = run([0, 1, 2, 3])
    logits_a, g_a = run([0, 3])
    logits_b, g_b = run([1, 2])
    torch.testing.assert_close(logits_all[[0, 3]], logits_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_all[[1, 2]], logits_b, rtol=1e-5, atol=1e-5)
    for n in g_all:
        part = g_a[n] if g_a[n] is not None else g_b[n]
        assert (g_a[n] is None) != (g_b[n] is None), n  # each parameter belongs to one task
        torch.testing.assert_close(g_all[n], part, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("projection", [None, 16])
def test_save_peft_loads_in_peft_with_our_logits(tmp_path, projection):
    model = tiny_model("qwen2")
    module = prefix_tuning(model, num_virtual_tokens=P, projection_hidden_size=projection)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.prefix_bank.save_peft("default", str(tmp_path))
    base = tiny_model("qwen2", attn_implementation="sdpa")
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "prefix_bank" not in k})
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    ids, mask, _ = _batch(pad="left")
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, prefixes=["default"] * 3).logits
        theirs = pm(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-4, atol=1e-5)


def test_compiled_model_trains_like_eager_without_graph_breaks():
    """torch.compile(model) (aot_eager) of a prefix-tuning step with mixed prefixes and padding:
    the same loss and prefix gradients as eager, and no graph break inside the model (the
    prefixes= hooks run outside the graph, the mask function skips its host check)."""
    import torch._dynamo

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for compiled in (False, True):
        model = tiny_model("llama", seed=0)
        mods = [prefix_tuning(model, num_virtual_tokens=n, name=name) for name, n in (("a", 4), ("b", 6))]
        for seed, m in enumerate(mods):  # the same prefixes in both runs
            with torch.no_grad():
                m.embedding.weight.copy_(torch.randn(m.embedding.weight.shape,
                                                     generator=torch.Generator().manual_seed(seed)))
        model.train()
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        run = torch.compile(model, backend="aot_eager") if compiled else model
        loss = run(input_ids=ids, attention_mask=mask, labels=labels, prefixes=["a", "b", None]).loss
        loss.backward()
        results.append([loss.detach()] + [m.embedding.weight.grad.clone() for m in mods])
        if compiled:
            assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_classification_head_unfrozen_after_the_first_prefix_stays_trainable():
    """Prefix tuning a BERT classifier, as PEFT's SEQ_CLS task with its head in
    modules_to_save: the head unfrozen after the first prefix_tuning call stays trainable
    through a second one, the encoder stays frozen, and both prefixes and the head get
    gradients."""
    import transformers

    from prefix_attn.tiny import tiny_config

    cfg = tiny_config("bert")
    cfg.num_labels = 3
    model = transformers.AutoModelForSequenceClassification.from_config(
        cfg, attn_implementation="prefix_attn")
    a = prefix_tuning(model, num_virtual_tokens=4, name="a")
    model.classifier.requires_grad_(True)
    b = prefix_tuning(model, num_virtual_tokens=2, name="b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias",
                         "prefix_bank.trainable.a.embedding.weight",
                         "prefix_bank.trainable.b.embedding.weight"}
    ids, mask, _ = _batch(B=2, pad=None)
    mask[1, -2:] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2]), prefixes=["a", "b"])
    out.loss.backward()
    for p in (a.embedding.weight, b.embedding.weight, model.classifier.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("projection", [None, 16])
def test_from_peft_continues_a_peft_model(projection, trainable):
    """A PEFT prefix-tuning model turned into ours: PEFT's logits, and (trainable) PEFT's loss
    and prefix gradients for the next step; (fixed) plain K/V entries."""
    _, _, pm = _pair("qwen2", projection)
    ids, mask, labels = _batch()
    pm.train()
    loss_peft = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_peft.backward()
    with torch.no_grad():
        logits_peft = pm.eval()(input_ids=ids, attention_mask=mask).logits
    enc = pm.prompt_encoder["default"]

    model = prefix_attn.from_peft(pm, trainable=trainable)
    bank = model.prefix_bank
    assert bank.names() == ["default"] and bank.kind("default") == ("trainable" if trainable else "fixed")
    assert model.config._attn_implementation == "prefix_attn"
    with torch.no_grad():
        logits = model.eval()(ids, attention_mask=mask, prefixes=["default"] * 3).logits
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], logits_peft[keep], rtol=1e-4, atol=1e-5)
    if trainable:
        params = trainable_parameters(model)
        model.train()
        loss = model(ids, attention_mask=mask, labels=labels, prefixes=["default"] * 3).loss
        loss.backward()
        torch.testing.assert_close(loss, loss_peft, rtol=1e-5, atol=1e-6)
        theirs = [p for p in enc.parameters()]
        assert len(params) == len(theirs)
        for a, b in zip(params, theirs):
            assert a is not b  # copied, not shared
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("projection", [None, 16])
def test_from_peft_keeps_a_float64_encoder_in_float64(projection):
    """A float64 PEFT model (its prompt encoder float64 too) came out with float32 prefix
    parameters: training "where PEFT left off" went on from values rounded by ~1e-7."""
    _, _, pm = _pair("llama", projection)
    pm.double()
    enc = pm.prompt_encoder["default"]
    want = {k: v.clone() for k, v in enc.state_dict().items()}
    model = prefix_attn.from_peft(pm)
    got = model.prefix_bank.trainable["default"].state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == torch.float64
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_from_peft_refuses_what_it_cannot_convert():
    with pytest.raises(TypeError, match="peft.PeftModel"):
        prefix_attn.from_peft(tiny_model("llama"))
    lora = peft.get_peft_model(tiny_model("llama", attn_implementation="sdpa"),
                               peft.LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(ValueError, match="'default' is .*LORA, not a prefix-tuning adapter"):
        prefix_attn.from_peft(lora)


def test_prefix_tuning_refuses_a_name_already_in_the_bank():
    model = tiny_model("llama")
    first = prefix_tuning(model, num_virtual_tokens=P, name="a")
    with pytest.raises(ValueError, match="'a' is already in the bank"):
        prefix_tuning(model, num_virtual_tokens=P, name="a")
    assert model.prefix_bank.names() == ["a"]
    assert any(p is first.embedding.weight for p in model.parameters())  # the first one stays
    model.prefix_bank.add("fixed", *torch.randn(2, 2, 2, 3, 8))
    with pytest.raises(ValueError, match="'fixed' is already in the bank \\(fixed\\)"):
        prefix_tuning(model, num_virtual_tokens=P, name="fixed")


@pytest.mark.parametrize("projection", [None, 16])
def test_convergence_matches_peft(projection):
    """Ten AdamW steps from the same initial prefix: same loss at every step, same final prefix."""
    ours, module, pm = _pair("llama", projection, seed=3)
    ours.train()
    pm.train()
    opt_ours = torch.optim.AdamW(module.parameters(), lr=1e-2)
    enc = pm.prompt_encoder["default"]
    opt_peft = torch.optim.AdamW(enc.parameters(), lr=1e-2)
    losses = []
    for step in range(10):
        ids, mask, labels = _batch(seed=step)
        l1 = ours(ids, attention_mask=mask, labels=labels, prefixes=["default"] * 3).loss
        l2 = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        for opt, loss in ((opt_ours, l1), (opt_peft, l2)):
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append((l1.item(), l2.item()))
    for a, b in losses:
        assert abs(a - b) <= 1e-4 * abs(b), losses
    assert losses[-1][0] < losses[0][0]  # it learns
    with torch.no_grad():
        torch.testing.assert_close(module.rows(), enc(pm.prompt_tokens["default"][None, :P])[0],
                                   rtol=1e-4, atol=1e-5)


def test_prefix_parameters_layout_is_peft_prompt_embeddings():
    m = PrefixParameters(num_layers=3, num_kv_heads=2, head_dim=4, num_virtual_tokens=5)
    kv = m()
    rows = m.rows().view(5, 3, 2, 2, 4)
    assert kv.shape == (3, 2, 2, 5, 4)
    assert torch.equal(kv[1, 0, 1, 2], rows[2, 1, 0, 1])  # layer 1, key, head 1, position 2
    assert torch.equal(kv[2, 1, 0, 4], rows[4, 2, 1, 0])  # layer 2, value, head 0, position 4
    with pytest.raises(ValueError):
        PrefixParameters(1, 1, 4, 0)


def test_projected_rows_backward_equals_autograd_and_runs_twice():
    """The projection MLP's own backward: autograd's gradients, and two backwards through one
    forward (what reentrant checkpointing does, one per layer) add up to one of the whole."""
    torch.manual_seed(0)
    m = PrefixParameters(num_layers=3, num_kv_heads=2, head_dim=4, num_virtual_tokens=5,
                         projection_hidden_size=6).double()
    params = list(m.parameters())
    g = torch.randn(5, 3 * 2 * 2 * 4, dtype=torch.float64)
    want = torch.autograd.grad((m.transform(m.embedding.weight) * g).sum(), params)
    out = m.rows()
    torch.testing.assert_close(out, m.transform(m.embedding.weight))
    (out[:, :10] * g[:, :10]).sum().backward()  # no retain_graph: a second backward follows
    (out[:, 10:] * g[:, 10:]).sum().backward()
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w)


def test_projected_rows_under_autocast_equal_the_sequential_mlp():
    torch.manual_seed(0)
    m = PrefixParameters(num_layers=2, num_kv_heads=2, head_dim=4, num_virtual_tokens=5,
                         projection_hidden_size=6)
    params = list(m.parameters())
    g = torch.randn(5, 2 * 2 * 2 * 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_out = m.transform(m.embedding.weight)
        out = m.rows()
    want = torch.autograd.grad((want_out.float() * g).sum(), params)
    got = torch.autograd.grad((out.float() * g).sum(), params)
    assert out.dtype == want_out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want_out)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("projection", [None, 16])
def test_reentrant_checkpointing_same_grads(projection):
    """use_reentrant=True runs one backward per layer: each layer's prefix has its own graph, so
    a projection MLP (which saves tensors) is not walked twice (it raised 'backward through the
    graph a second time'). Two prefixes in one batch, one of them projected."""
    model = tiny_model("llama")
    a = prefix_tuning(model, num_virtual_tokens=P, projection_hidden_size=projection, name="a")
    prefix_tuning(model, num_virtual_tokens=P + 2, projection_hidden_size=8, name="b")
    ids, mask, labels = _batch()
    model.train()
    rows = ["a", "b", "a"]

    def step():
        for p in trainable_parameters(model):
            p.grad = None
        loss = model(ids, attention_mask=mask, labels=labels, prefixes=rows).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable_parameters(model)]

    loss0, g0 = step()
    enable = getattr(model, "activation_checkpointing_enable", None)  # newer name, else the old
    (enable or model.gradient_checkpointing_enable)({"use_reentrant": True})
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    loss1, g1 = step()
    torch.testing.assert_close(loss1, loss0)
    assert len(g1) == len(g0) and a.embedding.weight.grad.abs().sum() > 0
    for x, y in zip(g1, g0):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def _perturbed_peft(projection, family="qwen2"):
    _, _, pm = _pair(family, projection)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return pm


@pytest.mark.parametrize("trainable", [True, False])
def test_from_peft_of_a_reloaded_projected_adapter(tmp_path, trainable):
    """PEFT drops the projection MLP of an adapter loaded from disk (inference_mode): its
    encoder holds the folded prompt_embeddings. from_peft took the layout from the config and
    failed half-way (base frozen, a random prefix in the bank)."""
    pm = _perturbed_peft(16)
    pm.save_pretrained(str(tmp_path))
    base = tiny_model("qwen2", attn_implementation="eager", **peft_comparable("qwen2"))
    base.load_state_dict(pm.get_base_model().state_dict())
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert getattr(loaded.prompt_encoder["default"], "transform", None) is None  # what PEFT does
    ids, mask, _ = _batch()
    with torch.no_grad():
        want = loaded(input_ids=ids, attention_mask=mask).logits
    model = prefix_attn.from_peft(loaded, trainable=trainable)
    with torch.no_grad():
        got = model.eval()(ids, attention_mask=mask, prefixes=["default"] * 3).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-5)


def test_from_peft_changes_nothing_when_it_refuses():
    pm = _perturbed_peft(None)
    base = pm.get_base_model()
    bank = prefix_attn.PrefixBank.attach(base)
    bank.add("default", *torch.randn(2, bank.num_layers, bank.num_kv_heads, 3, bank.head_dim))
    impl = base.config._attn_implementation
    for p in base.parameters():  # a base the user unfroze: from_peft must not freeze it
        p.requires_grad_(True)
    with pytest.raises(ValueError, match="already has prefixes named \\['default'\\]"):
        prefix_attn.from_peft(pm)
    assert base.prefix_bank.kind("default") == "fixed" and not len(base.prefix_bank.trainable)
    assert base.config._attn_implementation == impl
    assert all(p.requires_grad for p in base.parameters())


def test_from_peft_keeps_modules_to_save_trainable():
    """A PEFT sequence-classification adapter trains its head (modules_to_save): from_peft kept
    only the prefix trainable."""
    from transformers import AutoModelForSequenceClassification
    from prefix_attn.tiny import tiny_config

    cfg = tiny_config("llama")
    cfg.num_labels = 3
    base = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
    heads = {n for n, p in pm.get_base_model().named_parameters() if p.requires_grad}
    assert heads and all("score.modules_to_save.default." in n for n in heads)
    model = prefix_attn.from_peft(pm, trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # out of PEFT's wrapper: the head under its own name
    assert trainable == {n.replace("modules_to_save.default.", "") for n in heads} | {
        "prefix_bank.trainable.default.embedding.weight"}


@pytest.mark.parametrize("task, cls", [("SEQ_CLS", "AutoModelForSequenceClassification"),
                                       ("TOKEN_CLS", "AutoModelForTokenClassification")])
def test_from_peft_of_a_loaded_adapter_trains_its_head_and_checkpoints_it(tmp_path, task, cls):
    """An adapter PEFT loaded from disk (inference mode: its head frozen): from_peft left the
    head frozen, and a checkpoint of the model it returned held the head as
    score.modules_to_save.default.*: a model loaded from it got a new, random head."""
    import transformers
    from prefix_attn.tiny import tiny_config

    auto = getattr(transformers, cls)
    cfg = tiny_config("llama")
    cfg.num_labels = 3
    cfg.pad_token_id = 0
    torch.manual_seed(0)
    pm = peft.get_peft_model(auto.from_config(cfg, attn_implementation="eager"),
                             peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    pm.save_pretrained(str(tmp_path / "adapter"))
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(auto.from_config(cfg, attn_implementation="eager"),
                                            str(tmp_path / "adapter"))
    model = prefix_attn.from_peft(loaded, trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"score.weight", "prefix_bank.trainable.default.embedding.weight"} <= trainable
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.eval()(ids, prefixes=["default"] * 2).logits
    model.save_pretrained(str(tmp_path / "ckpt"))
    fresh = auto.from_pretrained(str(tmp_path / "ckpt"), attn_implementation="prefix_attn")
    prefix_attn.load_prefixes(fresh, str(tmp_path / "ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids, prefixes=["default"] * 2).logits, want,
                                   rtol=0, atol=0)


def test_from_peft_refuses_adapters_with_a_head_each():
    """Two SEQ_CLS adapters, each with its own head (modules_to_save): the model from_peft
    returned ran the active adapter's head for every row, so prefix "a" was read by head "b",
    silently (from a PEFT-interop audit). Refused, the model left as it was."""
    from transformers import AutoModelForSequenceClassification
    from prefix_attn.tiny import tiny_config

    cfg = tiny_config("llama")
    cfg.num_labels = 3
    base = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P),
                             adapter_name="a")
    pm.add_adapter("b", peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P + 1))
    with pytest.raises(ValueError, match=r"adapters \['a', 'b'\] each train their own copy of 'score'"):
        prefix_attn.from_peft(pm)
    assert not hasattr(pm.get_base_model(), "prefix_bank")
    pm.delete_adapter("b")
    model = prefix_attn.from_peft(pm)
    assert model.prefix_bank.names() == ["a"]


def test_load_peft_warns_about_tensors_it_does_not_load(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    prefix_tuning(model, num_virtual_tokens=P)
    model.prefix_bank.save_peft("default", str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.score.weight"] = torch.randn(3, 32)
    save_file(tensors, str(path))
    with pytest.warns(UserWarning, match=r"not loaded: \['base_model.score.weight'\].*modules_to_save"):
        model.prefix_bank.load_peft("again", str(tmp_path))
    assert model.prefix_bank.names() == ["default", "again"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_saved_prefix_keeps_its_float32(tmp_path, dtype):
    """A prefix trained on a bf16/fp16 model has float32 parameters; save_peft and bank.save
    wrote them rounded to the model's dtype (a 1e-3 update mostly lost), PEFT writes float32."""
    from safetensors.torch import load_file

    model = tiny_model("llama").to(dtype)
    module = prefix_tuning(model, num_virtual_tokens=P)
    with torch.no_grad():
        module.embedding.weight.add_(1e-3 * torch.randn_like(module.embedding.weight))
    bank = model.prefix_bank
    bank.save_peft("default", str(tmp_path / "peft"))
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert saved.dtype == torch.float32 and torch.equal(saved, module.rows().detach())
    bank.save(str(tmp_path / "bank"))
    saved = load_file(str(tmp_path / "bank" / "prefix_bank.safetensors"))["entry_0"]
    assert saved.dtype == torch.float32 and torch.equal(saved, module().detach())
    loaded = prefix_attn.PrefixBank.load(str(tmp_path / "bank"), tiny_model("llama").to(dtype))
    assert loaded.get("default")[0].dtype == dtype  # cast on load, as load_peft does


@pytest.mark.hf
def test_an_entry_added_with_add_trainable_first_does_not_keep_the_base_trainable():
    """bank.add_trainable(...) before prefix_tuning(...): the first prefix_tuning still freezes the
    base (it froze only when the bank had no trainable entry, so the whole model stayed
    trainable), and the earlier entry stays trainable."""
    import prefix_attn

    model = tiny_model("llama")
    bank = prefix_attn.PrefixBank.attach(model)
    first = PrefixParameters(bank.num_layers, bank.num_kv_heads, bank.head_dim, 3)
    bank.add_trainable("first", first)
    prefix_tuning(model, num_virtual_tokens=4, name="second")
    trainable = {id(p) for p in trainable_parameters(model)}
    assert trainable == {id(p) for p in bank.trainable.parameters()}
    assert all(id(p) in trainable for p in first.parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "prefix_bank" not in n)


@pytest.mark.hf
def test_unload_gives_the_plain_model_back_and_counts_are_printed(capsys):
    import prefix_attn

    model = tiny_model("llama", seed=0)
    plain = tiny_model("llama", seed=0, attn_implementation="sdpa")
    prefix_attn.prefix_tuning(model, num_virtual_tokens=4, name="a")
    line = prefix_attn.print_trainable_parameters(model)
    n = sum(p.numel() for p in model.prefix_bank.trainable.parameters())
    assert line in capsys.readouterr().out and f"trainable params: {n:,} ||" in line
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        assert not torch.allclose(model(ids, prefixes=["a", "a"]).logits, plain(ids).logits)
        assert prefix_attn.unload(model) is model
        assert model.config._attn_implementation == "sdpa" and not hasattr(model, "prefix_bank")
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="without a prefix bank"):
        model.generate(ids, prefixes=["a", "a"], max_new_tokens=2)
    assert "a" not in prefix_attn.PrefixBank.attach(model)  # attach again: a fresh bank


@pytest.mark.hf
def test_unload_sets_the_implementation_asked_for_whatever_the_current_one():
    """unload(model, attn_implementation="eager") left a model already moved to sdpa on sdpa."""
    import prefix_attn

    model = tiny_model("llama", seed=0)
    prefix_attn.prefix_tuning(model, num_virtual_tokens=2)
    model.set_attn_implementation("sdpa")
    prefix_attn.unload(model, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive int, got 0"),
    (dict(num_virtual_tokens=2.5), "num_virtual_tokens must be a positive int, got 2.5"),
    (dict(num_virtual_tokens="5"), "num_virtual_tokens must be a positive int, got '5'"),
    (dict(num_virtual_tokens=True), "num_virtual_tokens must be a positive int, got True"),
    (dict(projection_hidden_size=0), "projection_hidden_size must be a positive int, got 0"),
    (dict(projection_hidden_size=-1), "projection_hidden_size must be a positive int, got -1"),
])
def test_prefix_tuning_arguments_are_checked_before_the_model_changes(kwargs, words):
    """projection_hidden_size=0 built a bias-only prefix; floats, strings and bools gave torch's
    errors from inside the module (after the bank was attached and the base frozen)."""
    model = tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        prefix_tuning(model, **kwargs)
    assert not hasattr(model, "prefix_bank") and all(p.requires_grad for p in model.parameters())


@pytest.mark.hf
def test_a_peft_prefix_model_is_refused_with_the_way_to_take_it_over():
    """prefix_tuning on PEFT's PrefixTuning model froze PEFT's prompt encoder and applied both
    prefixes; attaching a bank to it is refused, pointing to from_peft."""
    peft = pytest.importorskip("peft")
    import prefix_attn

    base = tiny_model("llama", seed=0, attn_implementation="eager")
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    for call in (lambda: prefix_tuning(pm, num_virtual_tokens=2),
                 lambda: prefix_attn.PrefixBank.attach(pm)):
        with pytest.raises(ValueError, match=r"PEFT model with PREFIX_TUNING adapters.*from_peft"):
            call()
    assert not hasattr(pm, "prefix_bank")
    assert all(p.requires_grad for p in pm.prompt_encoder.parameters())
    # a LoRA wrapper's forward takes no position_ids (the tokens after a prefix would count
    # from 0): refused, pointing to its base model, which holds the LoRA layers
    lora = peft.get_peft_model(tiny_model("llama", seed=0), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"PEFT wrapper: attach the bank to its base model"):
        prefix_attn.PrefixBank.attach(lora)
    prefix_attn.PrefixBank.attach(lora.get_base_model())


@pytest.mark.hf
def test_unload_a_model_without_an_sdpa_path_sets_eager_and_refusals_remove_nothing():
    """Soft-capped Gemma 2 has no sdpa path (transformers 5.2x): unload raised after removing
    the bank and hooks, leaving "prefix_attn" set on a model without them. Now it picks eager
    where sdpa is refused; an implementation the model refuses raises before anything is
    removed."""
    import prefix_attn

    try:  # sdpa where this transformers has it for Gemma 2, else eager
        plain, expected = tiny_model("gemma2", seed=0, attn_implementation="sdpa"), "sdpa"
    except ValueError:
        plain, expected = tiny_model("gemma2", seed=0, attn_implementation="eager"), "eager"
    model = tiny_model("gemma2", seed=0)
    prefix_attn.prefix_tuning(model, num_virtual_tokens=3, name="a")
    with pytest.raises(ValueError, match="not supported"):
        prefix_attn.unload(model, attn_implementation="no-such-implementation")
    assert model.config._attn_implementation == "prefix_attn" and "a" in model.prefix_bank
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        model(ids, prefixes=["a", "a"])  # still a working prefix model
        prefix_attn.unload(model)
        assert model.config._attn_implementation == expected and not hasattr(model, "prefix_bank")
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("reentrant", [True, False, None])  # None: not given (torch: True)
def test_reentrant_checkpointing_in_a_multi_process_run_warns(monkeypatch, reentrant):
    """Under DistributedDataParallel (without static_graph) a trained prefix read by every
    reentrant checkpointed layer gets only the first layer's gradient synced, silently: a
    one-time warning in a multi-process run; none with use_reentrant=False or in one process."""
    import prefix_attn.distributed
    import prefix_attn.hf.hooks

    model = tiny_model("llama")
    prefix_tuning(model, num_virtual_tokens=P, name="a")
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)({} if reentrant is None else
                                                    {"use_reentrant": reentrant})
    model.train()
    ids, mask, labels = _batch()
    monkeypatch.setattr(prefix_attn.hf.hooks, "_warned_reentrant", False)
    reentrant = reentrant is not False
    for world in (1, 2):
        monkeypatch.setattr(prefix_attn.distributed, "world_size", lambda world=world: world)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model(ids, attention_mask=mask, labels=labels, prefixes="a").loss.backward()
        got = [str(w.message) for w in seen if "reentrant activation checkpointing" in str(w.message)]
        assert len(got) == (1 if reentrant and world == 2 else 0), got
    with warnings.catch_warnings(record=True) as seen:  # once per process
        warnings.simplefilter("always")
        model(ids, attention_mask=mask, labels=labels, prefixes="a").loss.backward()
    assert not [w for w in seen if "reentrant activation checkpointing" in str(w.message)]


def test_which_trainable_entries_a_selection_joins(monkeypatch):
    """A multi-process (DDP) training batch that selects no trainable entry joins one (a zero
    gradient, so this rank's reducer takes part), and only then; a one-process training batch
    of rows without a prefix gets the zero anchor (a loss with a graph); evaluation neither."""
    import prefix_attn.distributed

    model = tiny_model("llama")
    prefix_tuning(model, num_virtual_tokens=2, name="t1")
    prefix_tuning(model, num_virtual_tokens=2, name="t2")
    bank = model.prefix_bank
    model.train()
    monkeypatch.setattr(prefix_attn.distributed, "world_size", lambda: 2)
    assert bank.select(["t2"], 1).names == ["t2"]
    assert bank.select([None], 1).names == ["t1", None]
    monkeypatch.setattr(prefix_attn.distributed, "world_size", lambda: 1)
    assert bank.select([None], 1).names == [None]
    ids = torch.randint(3, 100, (1, 4))
    assert model(ids, prefixes=[None]).logits.requires_grad
    model.eval()
    assert not model(ids, prefixes=[None]).logits.requires_grad


def test_a_training_forward_with_prefixes_none_keeps_a_graph_beside_a_frozen_prefix():
    """A bank whose first prefix is frozen (a finished task) and whose second trains: a
    training forward with prefixes=None (multi-task rows of no task) still gets the zero anchor
    (a loss with a graph), as with training prefixes only."""
    model = tiny_model("llama")
    prefix_tuning(model, num_virtual_tokens=2, name="done").requires_grad_(False)
    prefix_tuning(model, num_virtual_tokens=2, name="new")
    model.train()
    ids = torch.randint(3, 100, (1, 4))
    assert model(ids, prefixes=None).logits.requires_grad


def test_layers_in_another_dtype_than_the_bank_read_the_prefix_in_theirs():
    """FSDP's mixed precision runs the layers in bf16 while the bank keeps the dtype it was
    attached with (float32): the prefix was handed to the kernel in float32 (TypeError). It is
    cast to the query's dtype: the same logits as a model cast to bf16 as a whole."""
    ids, mask, _ = _batch()
    mixed = tiny_model("llama")
    prefix_tuning(mixed, num_virtual_tokens=P, name="a")
    whole = tiny_model("llama")
    prefix_tuning(whole, num_virtual_tokens=P, name="a")
    whole.load_state_dict(mixed.state_dict())
    mixed.model.to(torch.bfloat16)  # the base only: the bank stays float32
    mixed.lm_head.to(torch.bfloat16)
    whole.to(torch.bfloat16)
    assert mixed.prefix_bank.dtype == torch.float32
    with torch.no_grad():
        got = mixed(ids, attention_mask=mask, prefixes="a").logits
        want = whole(ids, attention_mask=mask, prefixes="a").logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _in_graph_ops(graphs, name="prefix_attn"):
    """Names of the ops containing ``name`` (default: prefix_attn's) in the captured graphs and
    their checkpoint subgraphs."""
    found = []
    for gm in graphs:
        for sub in [gm, *(m for _, m in gm.named_modules() if isinstance(m, torch.fx.GraphModule))]:
            found += [str(n.target) for n in sub.graph.nodes
                      if n.op == "call_function" and name in str(n.target)]
    return found


@pytest.mark.parametrize("given_positions", [False, True])
def test_compiled_checkpointed_training_without_a_mask_keeps_the_layers_in_the_graph(
        given_positions):
    """torch.compile(model) + activation checkpointing + no attention_mask (a collator without
    one): (1) the hook's shifted position_ids made transformers build a packed-sequence mask
    inside the graph, and reading it crashed dynamo ('Expected CellVariable'); given
    positions took the eager fallback silently; (2) marking the selection read inside a
    checkpointed layer made dynamo run every layer eagerly. Now: the fused op in each
    checkpointed layer's graph wherever transformers keeps sdpa's there (every layer up to
    5.24; 5.25's own context variable sends sdpa's checkpointed layers to eager too), eager's
    loss and prefix gradients."""
    import torch._dynamo

    ids = torch.randint(3, 100, (3, 8), generator=torch.Generator().manual_seed(0))
    extra = dict(position_ids=torch.arange(8).expand(3, 8)) if given_positions else {}

    def checkpointed(model):
        model.train()
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
        torch._dynamo.reset()
        return model

    def compiled_graphs(model, **kwargs):
        graphs = []

        def record(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        loss = torch.compile(model, backend=record)(input_ids=ids, labels=ids, **kwargs).loss
        loss.backward()
        return loss, graphs

    sdpa = checkpointed(tiny_model("llama", seed=0, attn_implementation="sdpa"))
    _, graphs = compiled_graphs(sdpa, **extra)
    sdpa_in_graph = len(_in_graph_ops(graphs, "scaled_dot_product_attention"))
    assert sdpa_in_graph in (0, sdpa.config.num_hidden_layers)
    results = []
    for compiled in (False, True):
        model = tiny_model("llama", seed=0)
        mods = [prefix_tuning(model, num_virtual_tokens=n, name=name) for name, n in (("a", 4), ("b", 6))]
        checkpointed(model)
        kwargs = dict(prefixes=["a", "b", None], **extra)
        if compiled:
            loss, graphs = compiled_graphs(model, **kwargs)
        else:
            loss = model(input_ids=ids, labels=ids, **kwargs).loss
            loss.backward()
        results.append([loss.detach()] + [m.embedding.weight.grad.clone() for m in mods])
    assert len(_in_graph_ops(graphs)) == sdpa_in_graph, _in_graph_ops(graphs)
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [["a"], ["a", "b", None]], ids=["one_prefix", "per_sequence"])
@pytest.mark.parametrize("use_cache", [None, False])
def test_compiled_packed_row_keeps_its_sequences_apart_in_one_graph(use_cache, rows):
    """One row packing three sequences (position_ids restart, no mask) under one prefix or one
    per sequence: eager keeps the sequences apart; compiled, the attention function could not
    read the positions and let them attend to each other under one prefix (logits off by 0.26,
    no error), and the regrouping broke the graph in every layer (about 20 breaks). The
    pre-hook finds the sequences and their regrouping outside the graph now: compiled logits
    and prefix gradients equal eager's, with no graph break."""
    import torch._dynamo

    lens = [5, 4, 6]
    ids = torch.randint(3, 100, (1, sum(lens)), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    results = []
    for compiled in (False, True):
        model = tiny_model("llama", seed=0)
        mod = prefix_tuning(model, num_virtual_tokens=P, name="a")
        prefix_tuning(model, num_virtual_tokens=P + 2, name="b")
        model.train()
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        run = torch.compile(model, backend="aot_eager") if compiled else model
        out = run(input_ids=ids, position_ids=pos, labels=ids, prefixes=rows, use_cache=use_cache)
        out.loss.backward()
        results.append([out.logits.detach(), mod.embedding.weight.grad.clone()])
    assert not torch._dynamo.utils.counters["graph_break"], \
        dict(torch._dynamo.utils.counters["graph_break"])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_compiled_step_calling_a_model_with_a_bank_keeps_one_graph():
    """torch.compile(step, fullgraph=True) of a function that calls a model with a prefix bank
    but without prefixes= (evaluation of the base, a step of another task) raised: the hooks
    were disabled for dynamo as a whole. They are traceable when there is nothing to do; with
    prefixes= the selection is built outside the graph (one break, as a host-side step must)."""
    import torch._dynamo

    model = tiny_model("llama", seed=0)
    prefix_tuning(model, num_virtual_tokens=P, name="a")
    ids, mask, labels = _batch()

    def step(ids, mask, labels, **kw):
        return model(input_ids=ids, attention_mask=mask, labels=labels, **kw).loss

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids, mask, labels), step(ids, mask, labels))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, backend="eager")
    torch.testing.assert_close(compiled(ids, mask, labels, prefixes="a"),
                               step(ids, mask, labels, prefixes="a"))
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 1


def test_compiled_forward_without_a_cache_or_a_mask_equals_eager():
    """use_cache=False, no mask, no position_ids, fullgraph: transformers would look for packed
    sequences in the hook's shifted positions and build a mask dynamo cannot read back; the
    hook's all-ones mask keeps it from looking."""
    import torch._dynamo

    model = tiny_model("llama", seed=0)
    prefix_tuning(model, num_virtual_tokens=P, name="a")
    prefix_tuning(model, num_virtual_tokens=P + 2, name="b")
    model.eval()
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids, prefixes=["a", "b"], use_cache=False).logits
        torch._dynamo.reset()
        forward = model.forward
        model.forward = torch.compile(forward, backend="eager", fullgraph=True)
        try:
            got = model(input_ids=ids, prefixes=["a", "b"], use_cache=False).logits
        finally:
            model.forward = forward
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, error", [(None, TypeError), ("", TypeError), (3, TypeError),
                                         (["a"], TypeError)])
def test_a_bad_name_leaves_the_model_as_it_was(name, error):
    """prefix_tuning checked the name last: the model had been switched to prefix_attn, its
    base frozen and a bank attached before the TypeError (a list: a bare 'unhashable type')."""
    model = tiny_model("llama", attn_implementation="sdpa")
    with pytest.raises(error, match="entry name must be a non-empty str"):
        prefix_tuning(model, num_virtual_tokens=P, name=name)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "prefix_bank")
    assert all(p.requires_grad for p in model.parameters())


def test_a_tensor_count_of_virtual_tokens_is_named():
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int"):
        prefix_tuning(tiny_model("llama"), num_virtual_tokens=torch.tensor(3.0))


def test_a_prefix_made_under_inference_mode_serves_and_trains():
    """prefix_tuning (or from_peft) called inside torch.inference_mode (a serving script) made
    its parameters inference tensors: every later forward failed ("Inference tensors do not
    track version counter")."""
    model = tiny_model("llama")
    with torch.inference_mode():
        module = prefix_tuning(model, num_virtual_tokens=P)
    ids = torch.randint(3, 100, (2, 5))
    with torch.inference_mode():
        served = model(ids, prefixes="default").logits
    model.train()
    loss = model(ids, labels=ids, prefixes="default").loss
    loss.backward()
    assert module.embedding.weight.grad is not None and torch.isfinite(served).all()


class Params4bit(torch.nn.Parameter):
    """Stands in for bitsandbytes' packed 4-bit weight (two values a byte of its storage)."""


@pytest.mark.hf
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_trainable_parameter_counts_are_peft_s_on_a_4bit_model(capsys, storage):
    """A bitsandbytes 4-bit base: the packed bytes were counted as values, so "all params" was
    about half PEFT's (181,888 against 329,344 in the audit) and "trainable%" twice its."""
    import prefix_attn
    from peft.peft_model import PeftModel

    model = tiny_model("llama", seed=0)
    proj = model.model.layers[0].mlp.down_proj
    packed = torch.zeros(proj.weight.numel() // 2, dtype=torch.uint8)  # bytes: 2 values each
    proj.weight = Params4bit(packed.view(storage).reshape(-1, 1), requires_grad=False)
    partitioned = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # ZeRO-3 holds it
    partitioned.ds_numel = 1000
    model.lm_head.register_parameter("partitioned", partitioned)
    prefix_attn.prefix_tuning(model, num_virtual_tokens=4)
    train, total = PeftModel.get_nb_trainable_parameters(model)  # PEFT's count, on this model
    assert total == sum(p.numel() for p in tiny_model("llama", seed=0).parameters()) + train + 1000
    line = prefix_attn.print_trainable_parameters(model)
    assert line == (f"trainable params: {train:,} || all params: {total:,} || "
                    f"trainable%: {100 * train / total:.4f}")


@pytest.mark.parametrize("how", ["prefix_tuning", "load_prefixes"])
def test_an_interrupted_add_leaves_model_and_bank_as_they_were(monkeypatch, how):
    """KeyboardInterrupt while adding (the second prefix of a checkpoint): no entry added, the
    base's requires_grad as before, and a retry freezes and adds as a first call would."""
    from prefix_attn.bank import PrefixBank

    source = tiny_model("llama", seed=0)
    for name in ("a", "b"):
        prefix_tuning(source, num_virtual_tokens=2, name=name)
    state = source.state_dict()
    model = tiny_model("llama", seed=0)
    PrefixBank.attach(model)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    real, calls = PrefixBank.add_trainable, []

    def interrupted(self, name, module):
        calls.append(name)
        if len(calls) == (1 if how == "prefix_tuning" else 2):
            raise KeyboardInterrupt
        return real(self, name, module)

    def add():
        return (prefix_tuning(model, num_virtual_tokens=2, name="a") if how == "prefix_tuning"
                else prefix_attn.load_prefixes(model, state))
    monkeypatch.setattr(PrefixBank, "add_trainable", interrupted)
    with pytest.raises(KeyboardInterrupt):
        add()
    assert len(model.prefix_bank) == 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    monkeypatch.setattr(PrefixBank, "add_trainable", real)
    add()
    assert all(n.startswith("prefix_bank.trainable.") for n, p in model.named_parameters()
               if p.requires_grad)


def test_an_interrupted_from_peft_leaves_peft_s_head_wrapper(monkeypatch):
    """from_peft took the head out of PEFT's modules_to_save wrapper before adding the
    prefixes: interrupted there, the PeftModel kept the bare head, and the retry found no
    wrapper, so a head PEFT loaded frozen stayed frozen (under PEFT it trains)."""
    from prefix_attn.bank import PrefixBank

    pm = peft.get_peft_model(tiny_model("llama", seed=0, attn_implementation="eager"),
                             peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                     modules_to_save=["lm_head"]))
    for p in pm.parameters():  # as PeftModel.from_pretrained(..., is_trainable=False) loads it
        p.requires_grad_(False)
    wrapper = pm.get_base_model().lm_head
    real = PrefixBank.add_trainable

    def interrupted(self, name, module):
        raise KeyboardInterrupt

    monkeypatch.setattr(PrefixBank, "add_trainable", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prefix_attn.from_peft(pm)
    assert pm.get_base_model().lm_head is wrapper
    monkeypatch.setattr(PrefixBank, "add_trainable", real)
    model = prefix_attn.from_peft(pm)
    assert model.lm_head is wrapper.modules_to_save["default"] and model.lm_head.weight.requires_grad


@pytest.mark.parametrize("projection", [None, 16])
def test_get_nb_trainable_parameters_gives_peft_s_numbers(capsys, projection):
    import prefix_attn

    ours, _, pm = _pair("llama", projection=projection)
    assert prefix_attn.get_nb_trainable_parameters(ours) == pm.get_nb_trainable_parameters()
    train, total = prefix_attn.get_nb_trainable_parameters(ours)
    assert f"trainable params: {train:,} || all params: {total:,}" in \
        prefix_attn.print_trainable_parameters(ours)


@pytest.mark.parametrize("kw", [dict(), dict(prefix_projection=True, encoder_hidden_size=16),
                                dict(prefix_projection=True),  # PEFT's MLP width: token_dim
                                dict(prefix_projection=True, encoder_hidden_size=24),
                                dict(prefix_projection=True, encoder_hidden_size=16,
                                     inference_mode=True)])  # PEFT builds no MLP then
def test_prefix_tuning_takes_peft_s_config(kw):
    """``prefix_tuning(model, PrefixTuningConfig(...))`` as ``get_peft_model(model, config)``:
    the same parameters as PEFT's encoder, and PEFT's logits with them."""
    import prefix_attn

    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **kw)
    ours = tiny_model("llama", seed=0)
    module = prefix_tuning(ours, cfg, name="t")
    pm = peft.get_peft_model(tiny_model("llama", seed=0, attn_implementation="eager"),
                             peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **kw))
    enc = pm.prompt_encoder["default"]
    assert {k: v.shape for k, v in module.state_dict().items()} == \
        {k: v.shape for k, v in enc.state_dict().items()}
    assert prefix_attn.get_nb_trainable_parameters(ours) == pm.get_nb_trainable_parameters()
    module.load_state_dict(enc.state_dict())
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, prefixes="t").logits, pm(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, hint", [
    (dict(prefix_projection=True, encoder_hidden_size=16), "projection_hidden_size=N"),
    (dict(encoder_hidden_size=16, prefix_projection=True), "projection_hidden_size=N"),
    # no projection in PEFT (encoder_hidden_size unused): projection_hidden_size=N would add one
    (dict(prefix_projection=False), "nothing: without prefix_projection=True"),
    (dict(encoder_hidden_size=768, prefix_projection=False), "nothing: without prefix_projection=True"),
    (dict(encoder_hidden_size=768), "nothing: without prefix_projection=True"),
    (dict(num_layers=2), "read from the model"),
    (dict(task_type="CAUSAL_LM"), "PrefixTuningConfig"),
])
def test_prefix_tuning_explains_peft_s_keywords(kw, hint):
    """PEFT's config fields given as keywords got Python's bare "unexpected keyword argument";
    now the error says what to write, and the model is left as it was."""
    import inspect

    model = tiny_model("llama", seed=0)
    with pytest.raises(TypeError, match=rf"takes no {next(iter(kw))}= .*{hint}"):
        prefix_tuning(model, num_virtual_tokens=P, **kw)
    assert not hasattr(model, "prefix_bank") and all(p.requires_grad for p in model.parameters())
    assert "projection_hidden_size" in inspect.signature(prefix_tuning).parameters
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_virtual_token'"):
        prefix_tuning(model, num_virtual_token=P)  # a typo is still Python's error


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_takes_peft_s_zero_init(projection):
    """PrefixTuningConfig(init_weights="zero") was ignored: a random prefix where PEFT's starts
    from zeros (its last layer's), so training began elsewhere."""
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=P, init_weights="zero",
              prefix_projection=projection, encoder_hidden_size=16)
    module = prefix_tuning(tiny_model("llama", seed=0), peft.PrefixTuningConfig(**kw))
    enc = peft.get_peft_model(tiny_model("llama", seed=0, attn_implementation="eager"),
                              peft.PrefixTuningConfig(**kw)).prompt_encoder["default"]
    zeros = {k for k, v in enc.state_dict().items() if not v.any()}
    assert zeros and zeros == {k for k, v in module.state_dict().items() if not v.any()}


@pytest.mark.parametrize("task, kw", [("CAUSAL_LM", dict(modules_to_save=["lm_head"])),
                                      ("SEQ_CLS", dict())])
def test_prefix_tuning_trains_peft_s_modules_to_save(task, kw):
    """modules_to_save (and a SEQ_CLS task's head, which PEFT adds to it) were ignored: the head
    PEFT trains beside the prefix stayed frozen."""
    import transformers as tf

    import prefix_attn
    from prefix_attn.tiny import tiny_config

    auto = tf.AutoModelForCausalLM if task == "CAUSAL_LM" else tf.AutoModelForSequenceClassification
    cfg = tiny_config("llama", num_labels=3)

    def build(attn):
        torch.manual_seed(0)
        return auto.from_config(cfg, attn_implementation=attn)

    ours = build("prefix_attn")
    prefix_tuning(ours, peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, **kw))
    pm = peft.get_peft_model(build("eager"), peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, **kw))
    assert prefix_attn.get_nb_trainable_parameters(ours)[0] == pm.get_nb_trainable_parameters()[0]
    head = ours.lm_head if task == "CAUSAL_LM" else ours.score
    assert head.weight.requires_grad


def test_prefix_tuning_refuses_peft_config_fields_it_would_ignore():
    model = tiny_model("llama", seed=0)
    for kw, match in ((dict(num_transformer_submodules=2), "encoder and a decoder"),
                      (dict(task_type="SEQ_2_SEQ_LM"), "encoder and a decoder"),
                      (dict(modules_to_save=["classifer"]), r"named \['classifer'\]"),
                      (dict(init_weights="normal"), "PEFT knows None and 'zero'")):
        with pytest.raises(ValueError, match=match):
            prefix_tuning(model, peft.PrefixTuningConfig(num_virtual_tokens=P, **kw))
    assert not hasattr(model, "prefix_bank")
    assert all(p.requires_grad for p in model.parameters())


def test_prefix_tuning_refuses_a_peft_config_it_cannot_follow():
    model = tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match="num_layers=5.*leave num_layers unset"):
        prefix_tuning(model, peft.PrefixTuningConfig(num_virtual_tokens=P, num_layers=5))
    with pytest.raises(ValueError, match="takes a PrefixTuningConfig, got a LoraConfig"):
        prefix_tuning(model, peft.LoraConfig())
    with pytest.raises(TypeError, match="set it in the config"):
        prefix_tuning(model, peft.PrefixTuningConfig(num_virtual_tokens=P), projection_hidden_size=8)
    assert not hasattr(model, "prefix_bank")
    assert all(p.requires_grad for p in model.parameters())


def test_from_peft_keeps_base_parameters_the_user_unfroze_and_works_under_inference_mode():
    """A base parameter trained beside PEFT's prefix (lm_head unfrozen by hand) stays trainable
    (from_peft froze it: the run went on without it, silently); and a from_peft made under
    inference_mode gives parameters an optimizer can step. From a mutation audit."""
    _, _, pm = _pair("llama", 16)
    head = pm.get_base_model().lm_head
    head.requires_grad_(True)
    with torch.inference_mode():
        model = prefix_attn.from_peft(pm)
    assert head.weight.requires_grad
    params = trainable_parameters(model)
    assert any(p is head.weight for p in params)
    opt = torch.optim.SGD(params, lr=0.1)
    ids, mask, labels = _batch()
    model.train()(ids, attention_mask=mask, labels=labels, prefixes=["default"] * 3).loss.backward()
    opt.step()


def test_prefix_tuning_matches_modules_to_save_by_the_end_of_their_names_as_peft_does():
    """modules_to_save=["down_proj"]: PEFT trains every layer's mlp.down_proj (a module whose
    name ends with the entry), so does prefix_tuning with PEFT's config."""
    import prefix_attn

    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=P, modules_to_save=["down_proj"])
    ours = tiny_model("llama", seed=0)
    prefix_tuning(ours, peft.PrefixTuningConfig(**kw))
    pm = peft.get_peft_model(tiny_model("llama", seed=0, attn_implementation="eager"),
                             peft.PrefixTuningConfig(**kw))
    assert prefix_attn.get_nb_trainable_parameters(ours)[0] == pm.get_nb_trainable_parameters()[0]
    assert all(layer.mlp.down_proj.weight.requires_grad for layer in ours.model.layers)


def test_an_interrupted_prefix_tuning_keeps_what_the_user_froze_frozen():
    """The first prefix_tuning freezes the base; interrupted, it unfreezes what it froze, and
    only that: a parameter the user had frozen before stays frozen."""
    from prefix_attn.bank import PrefixBank

    model = tiny_model("llama", seed=0)
    model.model.embed_tokens.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    real = PrefixBank.add_trainable

    def interrupted(self, name, module):
        raise KeyboardInterrupt

    PrefixBank.add_trainable = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            prefix_tuning(model, num_virtual_tokens=2, name="a")
    finally:
        PrefixBank.add_trainable = real
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


@pytest.mark.parametrize("kw, hint", [
    ("prefix_projection", r"projection_hidden_size=N \(the MLP's hidden size"),
    ("encoder_hidden_size", "projection_hidden_size=N"),
    *[(k, "nothing: it is read from the model") for k in ("num_layers", "num_attention_heads", "token_dim")],
    *[(k, r"prefix_tuning\(model, peft.PrefixTuningConfig\(...\)\) with it in the config")
      for k in ("task_type", "peft_type", "inference_mode", "init_weights", "modules_to_save",
                "num_transformer_submodules", "base_model_name_or_path", "revision", "auto_mapping",
                "peft_version")],
])
def test_prefix_tuning_explains_each_of_peft_s_config_fields(kw, hint):
    """(Added by the mutation audit.) Each PrefixTuningConfig field explained, not only the
    three above: a dropped entry fell back to Python's bare "unexpected keyword argument"."""
    model = tiny_model("llama", seed=0)
    with pytest.raises(TypeError, match=rf"^prefix_tuning\(\) takes no {kw}= \(a field of PEFT's "
                                        rf"PrefixTuningConfig\); write {hint}"):
        # with a projection: the fields that set one get their projection_hidden_size= hint
        prefix_tuning(model, num_virtual_tokens=P, **{kw: None, "prefix_projection": True})


def test_every_field_of_peft_s_config_is_explained():
    """auto_mapping and peft_version were missing: Python's bare "unexpected keyword"."""
    import dataclasses

    from prefix_attn.tuning import _PEFT_KEYWORDS

    fields = {f.name for f in dataclasses.fields(peft.PrefixTuningConfig)} - {"num_virtual_tokens"}
    assert fields <= set(_PEFT_KEYWORDS), sorted(fields - set(_PEFT_KEYWORDS))
