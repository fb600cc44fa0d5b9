"""The README's Python snippets run as written.

Every ```python block of README.md carries a `<!-- snippet: NAME -->` marker; each is executed
here, in a fresh folder, with the names it assumes from the surrounding text (`q, k, v`, a model
folder `path`, token ids, a tokenizer, a dataset) bound to tiny stand-ins, and what it promises
is then checked. A snippet without a marker, or a marker without a setup here, fails the test,
so a new or edited snippet cannot drift from the code unnoticed.
"""
import os
import re
import warnings

import pytest
import torch

from conftest import make_inputs

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_MARKER = re.compile(r"<!-- snippet: ([\w-]+) -->\n$")


def snippets() -> dict:
    """name -> (first line number, code) of every ```python block of the README."""
    text = open(README).read()
    found = {}
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        marker = _MARKER.search(text, 0, m.start())
        assert marker is not None and marker.end() == m.start(), \
            f"README.md:{line}: a python block without a `<!-- snippet: NAME -->` line before it"
        found[marker.group(1)] = (line + 1, m.group(1))
    return found


def run(name: str, namespace: dict, folder) -> dict:
    line, code = snippets()[name]
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        # line numbers of a failure point into the README
        exec(compile("\n" * (line - 1) + code, README, "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


def test_every_snippet_has_a_test():
    assert set(snippets()) == {"kernel-api", "training", "trainer", "flattening", "serving", "chat-serving",
                              "http-client"}


def test_kernel_api_snippet(tmp_path):
    (q, k, v, pk, pv), kw = make_inputs(B=3, N=2, P=5, lens=[5, 2], ids=[1, 0, 1], pad="left")
    ns = run("kernel-api", dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, ids=kw["prefix_ids"],
                                lens=kw["prefix_lens"], mask=kw["key_padding_mask"]), tmp_path)
    torch.testing.assert_close(ns["out"], ns["ref"], atol=1e-5, rtol=1e-5)
    assert "torch" in ns["prefix_attn"].available_backends()



def _tiny_llama_folder(folder, vocab_size=128):
    from prefix_attn.tiny import tiny_model

    path = os.path.join(folder, "base")
    tiny_model("llama", vocab_size=vocab_size).save_pretrained(path)
    return path


@pytest.mark.hf
def test_training_snippet(tmp_path):
    pytest.importorskip("peft")
    path = _tiny_llama_folder(tmp_path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # one left-padded row
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated call in the README
        ns = run("training", dict(path=path, ids=ids, mask=mask), tmp_path)
    model = ns["model"]
    assert torch.isfinite(ns["loss"])
    assert model.prefix_bank.names() == ["support", "legal"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("prefix_bank" in n for n in trainable)

    # the saved adapter is a PEFT adapter: PEFT's logits with it equal ours with "support"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(base, os.path.join(tmp_path, "adapters", "support")).eval()
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids[:1], prefixes=["support"]).logits
        theirs = peft_model(input_ids=ids[:1]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def _two_task_model():
    import prefix_attn
    from prefix_attn.tiny import tiny_model

    model = tiny_model("llama")
    for name in ("support", "legal"):
        prefix_attn.prefix_tuning(model, num_virtual_tokens=4, name=name)
    return model.train()


def _rows(n=8, lengths=False):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, 128, (5 + (i % 3 if lengths else 0),), generator=g),
             "task": ("support", "legal")[i % 2]} for i in range(n)]


@pytest.mark.hf
def test_trainer_snippet(tmp_path):
    model = _two_task_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run("trainer", dict(model=model, ds=_rows(), torch=torch), tmp_path)
    after = dict(model.named_parameters())
    for n, p in before.items():  # each task's prefix was reached by its rows
        assert not torch.equal(after[n], p), n


@pytest.mark.hf
def test_flattening_snippet(tmp_path):
    """The collator packs the rows into one, one prefix per sequence, and a step on it gives
    the padded batch's loss (same tokens, same prefixes)."""
    model = _two_task_model()
    rows = _rows(4, lengths=True)
    collate = run("flattening", dict(), tmp_path)["collate"]
    batch = collate(rows)
    assert batch["input_ids"].shape[0] == 1 and len(batch["prefixes"]) == len(rows)
    packed = model(**batch).loss
    total, count = 0.0, 0
    for r in rows:  # each sequence alone, with its prefix: the same token-weighted mean
        ids = r["input_ids"][None]
        n = ids.shape[1] - 1
        total = total + model(input_ids=ids, labels=ids, prefixes=[r["task"]]).loss * n
        count += n
    torch.testing.assert_close(packed, total / count, atol=1e-5, rtol=1e-5)


@pytest.mark.hf
def test_serving_snippet(tmp_path):
    import prefix_attn
    from prefix_attn.tiny import ByteTokenizer, default_model

    # an adapter saved where the snippet loads it from
    trained = default_model()
    prefix_attn.prefix_tuning(trained, num_virtual_tokens=3, name="support")
    trained.prefix_bank.save_peft("support", os.path.join(tmp_path, "adapters", "support"))

    model = default_model()
    cfg = model.config
    D = cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(cfg.num_hidden_layers, cfg.num_key_value_heads, 6, D, generator=g)
    values = torch.randn(keys.shape, generator=g)
    ns = run("serving", dict(prefix_attn=prefix_attn, model=model, keys=keys, values=values,
                             tok=ByteTokenizer(), system_prompt="You answer briefly.",
                             prompts=["hi", "hello there", "x"], questions=[" Why?", " How"]),
             tmp_path)
    out, bank = ns["out"], ns["bank"]
    assert out.shape[0] == 3 and out.shape[1] > ns["tok"](ns["prompts"])["input_ids"].shape[1]
    assert ns["more"].shape[0] == 2
    # the byte tokenizer honours add_special_tokens=False as HF tokenizers do (no start token)
    tok = ns["tok"]
    rows = tok(ns["questions"], add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in rows.tolist()[0] and tok.bos_token_id in tok(ns["questions"])["input_ids"].tolist()[0]
    assert sorted(bank.names()) == ["support", "system", "tenant-7"]
    assert bank is model.prefix_bank  # load re-attached it
    torch.testing.assert_close(bank.entry_kv("tenant-7")[:, 0], keys.to(bank.entry_kv("tenant-7").dtype))


@pytest.mark.hf
def test_chat_serving_snippet(tmp_path):
    """The system message's entry and the rows after it give, row by row, what generate gives on
    the whole templated conversation (greedy, no prefix)."""
    import prefix_attn
    from prefix_attn import tiny
    from test_serve_chat import chat_tokenizer

    tok = chat_tokenizer()
    model = tiny.tiny_model("llama", vocab_size=len(tok), hidden=64)
    bank = prefix_attn.PrefixBank.attach(model)
    system_prompt, questions = "You answer briefly.", ["Why?", "How is the weather\n\ntoday?"]
    ns = run("chat-serving", dict(prefix_attn=prefix_attn, torch=torch, model=model, bank=bank, tok=tok,
                                  system_prompt=system_prompt, questions=questions), tmp_path)
    assert bank.entry_len("system") == len(ns["head"])
    out, width = ns["out"], ns["batch"]["input_ids"].shape[1]
    for row, q in zip(out, questions):
        conv = [{"role": "system", "content": system_prompt}, {"role": "user", "content": q}]
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                  prefixes=None)[0, len(ids):].tolist()
        got = row[width:].tolist()
        end = want.index(tok.eos_token_id) + 1 if tok.eos_token_id in want else len(want)
        assert got[:end] == want[:end]


def test_coming_from_peft_names_the_common_peft_calls():
    """The 'Coming from PEFT' table answers the calls a PEFT prefix-tuning user makes daily,
    and every prefix_attn name it gives exists."""
    import prefix_attn

    text = open(README).read()
    table = text[text.index("### Coming from PEFT"):]
    table = table[:table.index("\n\n", table.index("| --- |"))]
    peft_side = " ".join(row.split(" | ")[0] for row in table.splitlines()[2:])
    for call in ["get_peft_model", "encoder_hidden_size", "print_trainable_parameters",
                 "get_nb_trainable_parameters", "save_pretrained", "PeftModel.from_pretrained",
                 "is_trainable=True", "add_adapter", "load_adapter", "set_adapter",
                 "disable_adapter", "inference_mode", ".half()", "push_to_hub", "unload"]:
        assert call in peft_side, f"'Coming from PEFT' does not say what replaces {call}"
    for name in re.findall(r"prefix_attn\.(\w+)\(", table):
        assert hasattr(prefix_attn, name), f"'Coming from PEFT' names prefix_attn.{name}"
    for name in re.findall(r"bank\.(\w+)\(", table):
        assert hasattr(prefix_attn.PrefixBank, name), f"'Coming from PEFT' names bank.{name}"


def test_layout_names_every_module_of_the_package():
    """The README's layout row for prefix_attn/ names each module (serve_batching.py was left
    out when it came)."""
    import glob

    root = os.path.join(os.path.dirname(__file__), "..")
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    row = next(line for line in readme.splitlines() if line.startswith("| `prefix_attn/` |"))
    modules = {os.path.basename(p) for p in glob.glob(os.path.join(root, "prefix_attn", "**", "*.py"), recursive=True)}
    assert sorted(m for m in modules - {"__init__.py", "__main__.py"} if f"`{m}`" not in row) == []


def test_http_client_snippet(tmp_path, monkeypatch, capsys):
    """The OpenAI-client snippet against `prefix-attn serve` (the openai package is not a
    dependency: a stand-in with the calls the snippet makes posts its keywords as they are, and
    reads a stream's events as the client does): its streamed text is the answer."""
    import json
    import sys
    import types
    import urllib.request

    from test_server import generated, save_adapter, started
    from test_server_stream import events

    adapter = save_adapter(tmp_path / "adapter")
    with started("--adapter", f"support={adapter}") as server:
        host, port = server.address

        def create(**body):
            req = urllib.request.Request(f"http://{host}:{port}/v1/completions", data=json.dumps(body).encode())
            with urllib.request.urlopen(req, timeout=120) as r:
                if body.get("stream"):
                    return [json.loads(json.dumps(e), object_hook=lambda d: types.SimpleNamespace(**d))
                            for e in events(r.read())]
                return json.loads(r.read(), object_hook=lambda d: types.SimpleNamespace(**d))

        def client(base_url, api_key):
            assert base_url == "http://localhost:8000/v1"
            return types.SimpleNamespace(completions=types.SimpleNamespace(create=create))
        monkeypatch.setitem(sys.modules, "openai", types.SimpleNamespace(OpenAI=client))
        ns = run("http-client", {}, tmp_path)
    [want] = generated(tmp_path, [{"prefix": "support", "prompt": "How do I reset my password?",
                                   "max_tokens": 64}], "--adapter", f"support={adapter}")
    assert (ns["out"].choices[0].text, ns["out"].usage.completion_tokens) == (want["completion"], want["num_tokens"])
    assert capsys.readouterr().out == f"{want['completion']} {want['finish_reason']} {want['num_tokens']}\n" + want["completion"]
