"""Tiny models and a byte-level tokenizer that need no download.

- ``tiny_config(family, **overrides)``: a small config of each supported HF family (Llama,
  Mistral, Qwen2, Qwen3, Gemma 2, Phi-3, GPT-2, BERT, and ``MORE_CAUSAL_FAMILIES``), used by
  tests, benchmarks and demos.
- ``tiny_model(family, ...)``: ``AutoModel*.from_config`` of it, seeded, in eval mode.
- ``default_model()`` / ``ByteTokenizer``: the built-in default of ``prefix-attn train`` and
  the serving CLI when no local model folder is given (vocabulary = 256 bytes + 3 specials).
- ``load_tokenizer(folder)`` / ``load_model_folder(folder)``: a local model folder's, as the
  commands load them (a broken folder is a :class:`TokenizerError` / :class:`ModelFolderError`).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterable, List, Optional, Sequence, Union

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "bert")
CAUSAL_FAMILIES = FAMILIES[:-1]
# More causal families with the attention interface, in the HF parity tests (marker
# `more_families`: test_hf_models, test_hf_prefix, test_generate, test_tuning): partial rotary (phi, gpt_neox, gptj, codegen), MoE (mixtral,
# qwen2_moe), q/k norms (olmo2, cohere), learned positions (opt, biogpt, gpt_bigcode), ...
MORE_CAUSAL_FAMILIES = ("gemma", "gemma3_text", "mixtral", "qwen2_moe", "olmo", "olmo2", "phi",
                        "gpt_neox", "gptj", "codegen", "starcoder2", "cohere", "granite",
                        "smollm3", "glm4", "exaone4", "opt", "biogpt", "gpt_bigcode")


def tiny_config(family: str, vocab_size: int = 128, hidden: int = 32, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, **overrides):
    """A small ``transformers`` config of ``family`` (GQA where the family has it)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "llama":
        cfg = tf.LlamaConfig(**common)
    elif family == "mistral":
        cfg = tf.MistralConfig(sliding_window=4, **common)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common)  # q/k/v projections carry a bias
    elif family == "qwen3":
        cfg = tf.Qwen3Config(head_dim=16, **common)  # head_dim != hidden / heads
    elif family == "gemma2":
        cfg = tf.Gemma2Config(head_dim=8, query_pre_attn_scalar=12, attn_logit_softcapping=5.0,
                              final_logit_softcapping=None, sliding_window=4, **common)
    elif family == "phi3":
        cfg = tf.Phi3Config(**common)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                            n_positions=256, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    elif family == "bert":
        cfg = tf.BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=2 * hidden,
                            max_position_embeddings=256, attention_probs_dropout_prob=0.0,
                            hidden_dropout_prob=0.0, pad_token_id=0)
    elif family in MORE_CAUSAL_FAMILIES:
        cfg = _more_config(tf, family, common)
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES + MORE_CAUSAL_FAMILIES}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _more_config(tf, family: str, common: dict):
    c = common
    gpt_style = dict(vocab_size=c["vocab_size"], n_embd=c["hidden_size"],
                     n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"],
                     n_positions=c["max_position_embeddings"], pad_token_id=0, bos_token_id=1,
                     eos_token_id=2)
    dense = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                 num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                 max_position_embeddings=c["max_position_embeddings"], pad_token_id=0,
                 bos_token_id=1, eos_token_id=2)
    builders = {
        "gemma": lambda: tf.GemmaConfig(head_dim=8, **c),
        "gemma3_text": lambda: tf.Gemma3TextConfig(head_dim=8, sliding_window=4, **c),
        "mixtral": lambda: tf.MixtralConfig(num_local_experts=2, num_experts_per_tok=1, **c),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(num_experts=2, num_experts_per_tok=1,
                                               moe_intermediate_size=16,
                                               shared_expert_intermediate_size=16, **c),
        "olmo": lambda: tf.OlmoConfig(**c),
        "olmo2": lambda: tf.Olmo2Config(**c),
        "phi": lambda: tf.PhiConfig(partial_rotary_factor=0.5, **c),
        "gpt_neox": lambda: tf.GPTNeoXConfig(rotary_pct=0.5, intermediate_size=c["intermediate_size"],
                                             tie_word_embeddings=False, **dense),
        "gptj": lambda: tf.GPTJConfig(rotary_dim=4, **gpt_style),
        "codegen": lambda: tf.CodeGenConfig(rotary_dim=4, **gpt_style),
        "starcoder2": lambda: tf.Starcoder2Config(**c),
        "cohere": lambda: tf.CohereConfig(**c),
        "granite": lambda: tf.GraniteConfig(**c),
        "smollm3": lambda: tf.SmolLM3Config(**c),
        "glm4": lambda: tf.Glm4Config(**c),
        "exaone4": lambda: tf.Exaone4Config(**c),
        # dropout off, as in the families above (their defaults are 0): runs compare exactly
        "opt": lambda: tf.OPTConfig(ffn_dim=c["intermediate_size"], word_embed_proj_dim=c["hidden_size"],
                                    dropout=0.0, layerdrop=0.0, **dense),
        "biogpt": lambda: tf.BioGptConfig(intermediate_size=c["intermediate_size"],
                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                          layerdrop=0.0, **dense),
        "gpt_bigcode": lambda: tf.GPTBigCodeConfig(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                 **gpt_style),
    }
    return builders[family]()


def tiny_model(family: str = "llama", seed: int = 0, attn_implementation: str = "prefix_attn",
               dtype: torch.dtype = torch.float32, **config_overrides):
    """A seeded tiny model of ``family`` (causal LM, or ``BertModel`` for ``"bert"``), eval mode."""
    import transformers as tf

    import prefix_attn.hf  # noqa: F401  (registers "prefix_attn")

    cfg = tiny_config(family, **config_overrides)
    torch.manual_seed(seed)
    auto = tf.AutoModel if family == "bert" else tf.AutoModelForCausalLM
    model = auto.from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


# --------------------------------------------------------------------------------------
# byte-level tokenizer
# --------------------------------------------------------------------------------------
class Encoding(dict):
    """``{"input_ids", "attention_mask"}`` also readable as attributes, like HF's BatchEncoding."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ByteTokenizer:
    """UTF-8 bytes as tokens 3..258; 0 = pad, 1 = bos, 2 = eos (no download, no vocabulary file).

    ``tok(texts, padding_side=...)`` returns an :class:`Encoding` of ``input_ids`` and
    ``attention_mask`` LongTensors ``[B, S]``, like an HF tokenizer called with
    ``return_tensors="pt"``.
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + 3
    config_name = "byte_tokenizer.json"

    def __init__(self, padding_side: str = "left", add_bos: bool = True):
        self.padding_side = padding_side
        self.add_bos = add_bos

    def encode(self, text: str, add_eos: bool = False, add_special_tokens: bool = True) -> List[int]:
        """Byte ids (+ offset), after the start token when ``add_bos`` and
        ``add_special_tokens`` (HF's keyword: False for text that continues a prompt)."""
        ids = [b + self.offset for b in text.encode("utf-8")]
        if self.add_bos and add_special_tokens:
            ids = [self.bos_token_id] + ids
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        data = bytes(i - self.offset for i in ids if i >= self.offset)
        return data.decode("utf-8", errors="replace")

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> List[str]:
        return [self.decode(r) for r in rows]

    SPECIAL_STRINGS = ("<pad>", "<s>", "</s>")  # what convert_ids_to_tokens calls ids 0, 1, 2

    def convert_ids_to_tokens(self, ids: Union[int, Sequence[int]]) -> Union[str, List[str]]:
        """HF's: each id's token string, a byte as SentencePiece's byte tokens write it
        (``<0x41>``), the special ids as ``SPECIAL_STRINGS``; one id gives one string."""
        if isinstance(ids, int):
            return self.SPECIAL_STRINGS[ids] if ids < self.offset else f"<0x{ids - self.offset:02X}>"
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    def __call__(self, texts: Union[str, Sequence[str]], padding_side: Optional[str] = None,
                 add_eos: bool = False, add_special_tokens: bool = True, **_):
        if isinstance(texts, str):
            texts = [texts]
        side = padding_side or self.padding_side
        rows = [self.encode(t, add_eos=add_eos, add_special_tokens=add_special_tokens)
                for t in texts]
        S = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), S), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), S, dtype=torch.long)
        for b, r in enumerate(rows):
            sl = slice(S - len(r), S) if side == "left" else slice(0, len(r))
            ids[b, sl] = torch.tensor(r, dtype=torch.long)
            mask[b, sl] = 1
        return Encoding(input_ids=ids, attention_mask=mask)

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, self.config_name), "w") as f:
            json.dump({"type": "byte", "padding_side": self.padding_side,
                       "add_bos": self.add_bos}, f)

    @classmethod
    def from_pretrained(cls, directory: str) -> "ByteTokenizer":
        with open(os.path.join(directory, cls.config_name)) as f:
            cfg = json.load(f)
        return cls(padding_side=cfg.get("padding_side", "left"), add_bos=cfg.get("add_bos", True))


def default_model(seed: int = 0, hidden: int = 64, layers: int = 2):
    """The built-in default: a tiny Llama over the byte vocabulary (random weights)."""
    return tiny_model("llama", seed=seed, **_default_sizes(hidden, layers))


def default_config(hidden: int = 64, layers: int = 2):
    """The config of :func:`default_model` (nothing built)."""
    return tiny_config("llama", **_default_sizes(hidden, layers))


def _default_sizes(hidden: int, layers: int) -> dict:
    return dict(vocab_size=ByteTokenizer.vocab_size, hidden=hidden, layers=layers, heads=4, kv_heads=2)


# files of an HF tokenizer; a folder with none of them has no tokenizer to load
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                      "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "merges.txt",
                      "special_tokens_map.json", "tokenizer.tiktoken")


class TokenizerError(ValueError):
    """A model folder whose tokenizer is missing or does not load (a user error: the command
    line tools report it with exit status 2)."""


def load_tokenizer(model_dir: Optional[str]):
    """The tokenizer of a model: a :class:`ByteTokenizer` for the built-in default model
    (``model_dir`` None) or a folder saved with one (``byte_tokenizer.json``, as ``prefix-attn
    train`` saves ``OUT/base_model``), else the folder's HF tokenizer. Raises
    :class:`TokenizerError` naming the folder when it has no tokenizer files or its tokenizer
    does not load (never a silent fallback to bytes: the ids would not be the model's)."""
    if model_dir is None:
        return ByteTokenizer()
    byte_config = os.path.join(model_dir, ByteTokenizer.config_name)
    if os.path.isfile(byte_config):
        try:
            return ByteTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError, AttributeError) as exc:
            raise TokenizerError(f"cannot load the byte tokenizer of {model_dir}: {byte_config}: "
                                 f"{_first_line(exc)}") from None
    if not any(os.path.exists(os.path.join(model_dir, f)) for f in HF_TOKENIZER_FILES):
        raise TokenizerError(
            f"no tokenizer in the model folder {model_dir}: no tokenizer.json, tokenizer_config.json or "
            f"other tokenizer file, nor {ByteTokenizer.config_name} (prefix-attn's byte tokenizer); save "
            f"the model's tokenizer there: AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained(FOLDER)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # corrupt or incomplete files: transformers raises many kinds
        raise TokenizerError(f"cannot load the tokenizer of {model_dir}: "
                             f"{type(exc).__name__}: {_first_line(exc)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


class ModelFolderError(ValueError):
    """A model folder whose model does not load: no config or weights, a config without a
    ``model_type``, truncated or corrupt weights, weights of other shapes (a user error: the
    command line tools report it with exit status 2)."""


def no_model_folder(model_dir: str) -> str:
    """What to say of a ``--model`` that is no folder: missing, or a file (a weights file, a
    config.json) given instead of the folder holding it."""
    if os.path.exists(model_dir):
        return (f"--model {model_dir} is a file, not a model folder: give the folder holding "
                f"config.json, the weights and the tokenizer files")
    return f"model folder not found: {model_dir}"


def load_model_config(model_dir: str):
    """The config of the local folder ``model_dir`` (its ``config.json`` only: no weights read).
    Raises :class:`ModelFolderError` as :func:`load_model_folder` does."""
    from transformers import AutoConfig

    with _folder_errors(model_dir):
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)


def load_model_folder(model_dir: str, dtype: Optional[torch.dtype] = None):
    """``AutoModelForCausalLM`` of the local folder ``model_dir`` with
    ``attn_implementation="prefix_attn"`` (in ``dtype``; None: transformers' default), on the
    CPU. Raises :class:`ModelFolderError` naming the folder and the reason when it does not load."""
    from transformers import AutoModelForCausalLM

    from prefix_attn import hf  # registers "prefix_attn"

    kwargs = {} if dtype is None else {"dtype": dtype}
    # the config alone first: it reads only the folder, so whatever it raises is the folder's
    # fault (transformers' strict dataclass checks, an unknown model_type or field)
    config = load_model_config(model_dir)
    with _folder_errors(model_dir):
        return AutoModelForCausalLM.from_pretrained(model_dir, config=config, local_files_only=True,
                                                    attn_implementation=hf.ATTN_NAME, **kwargs)


@contextlib.contextmanager
def _folder_errors(model_dir: str):
    """What reading the folder ``model_dir`` raises, as a :class:`ModelFolderError` naming it."""
    import pickle

    from safetensors import SafetensorError

    if not os.path.isdir(model_dir):
        raise ModelFolderError(no_model_folder(model_dir))
    try:
        yield
    except MemoryError:
        raise
    # what transformers, safetensors and torch.load raise on a broken folder (a missing file, bad
    # JSON, no model_type, a truncated header, a corrupt pickle, a size mismatch, an unknown
    # activation (KeyError), fields another model_type does not have (AttributeError))
    except (OSError, ValueError, RuntimeError, KeyError, AttributeError, TypeError,
            SafetensorError, pickle.UnpicklingError, *_strict_errors()) as exc:
        raise ModelFolderError(f"cannot load a model from {model_dir}: {type(exc).__name__}: "
                               f"{_first_line(exc)}") from None


def _strict_errors() -> tuple:
    """huggingface_hub's validation errors of strict config dataclasses (not ValueErrors)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def encode(tokenizer, text: str, special: bool = True) -> List[int]:
    """Token ids of ``text`` with a :class:`ByteTokenizer` or an HF tokenizer; ``special=False``
    leaves out the start token (text that continues a prompt prefix or a prompt)."""
    return list(tokenizer.encode(text, add_special_tokens=special))


def left_pad(rows: List[List[int]], pad_id: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, S]`` of token id lists, padded on the left
    (decoder-only generate); rows encoded apart (some with the start token, some without) are
    batched this way with any tokenizer. ``pad_id`` None (a tokenizer with neither a pad nor an
    end-of-sequence token): 0, which the mask hides."""
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), 0 if pad_id is None else pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, S - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, S - len(r):] = 1
    return ids, mask


def vocab_problem(tokenizer, ids: List[int], vocab_size: int) -> Optional[str]:
    """What is wrong with token ids from ``tokenizer`` for a model of ``vocab_size`` embeddings
    (an id outside 0..vocab_size-1: the tokenizer does not fit the model), or None."""
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is None:
        return None
    if isinstance(tokenizer, ByteTokenizer):
        hint = (f" (the byte tokenizer numbers byte b as b + {tokenizer.offset}, up to "
                f"{ByteTokenizer.vocab_size - 1}: this model's vocabulary is too small for "
                f"bytes of {vocab_size - tokenizer.offset} and above, e.g. non-ASCII text)")
    else:
        hint = " (pass the model's own tokenizer in --model's folder)"
    return (f"token id {bad} is outside the model's vocabulary of {vocab_size} "
            f"(ids 0..{vocab_size - 1}): the tokenizer does not fit the model{hint}")

