"""The file of a saved prefix bank, ``FOLDER/prefix_bank.safetensors``: one tensor ``entry_i``
``[L, 2, Hkv, P_i, D]`` per entry and, in the metadata, the entry names, their kinds
("fixed" | "prompt"; trainable entries are saved folded, as fixed), the weight signatures of
prompt entries (``model_info.model_signature``), the dims and the bank's ``default_prefix``
(absent when None; files written before it was saved have none). Written atomically; read with
every field checked (a ValueError naming the file otherwise)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from . import atomic, peft_format

BANK_FILE = "prefix_bank.safetensors"
KINDS = ("fixed", "prompt")
FORMAT = "1"  # the layout of the file; read() refuses any other
SIGNATURES = "model_signatures_2"  # model_info.model_signature's samples since they moved


@dataclass
class SavedBank:
    names: List[str]
    kinds: List[str]
    signatures: List[Optional[list]]
    dims: tuple  # (L, Hkv, D)
    tensors: list = field(default_factory=list)  # [L, 2, Hkv, P_i, D] each (CPU)
    default: Optional[str] = None  # the bank's default_prefix, one of names


def path_in(directory: str) -> str:
    """The bank file of ``directory``; FileNotFoundError when it is missing (saying so when the
    folder holds a PEFT adapter instead)."""
    path = os.path.join(directory, BANK_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prefix bank file missing: {path!r}" + peft_format.bank_file_hint(directory))
    return path


def write(directory: str, saved: SavedBank) -> None:
    from safetensors.torch import save as st_save

    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory!r} is a file; give a folder (a bank is saved as "
                                 f"FOLDER/{BANK_FILE})")
    meta = {
        "format": "pt",
        "prefix_attn_bank": FORMAT,
        "names": json.dumps(saved.names),
        "kinds": json.dumps(saved.kinds),
        SIGNATURES: json.dumps(saved.signatures),
        **{k: str(v) for k, v in zip(("num_layers", "num_kv_heads", "head_dim"), saved.dims)},
    }
    if saved.default is not None:  # an added key: readers before it ignore it
        meta["default_prefix"] = json.dumps(saved.default)
    data = st_save({f"entry_{i}": t for i, t in enumerate(saved.tensors)}, metadata=meta)
    # after the bytes are made, and taken back if the write fails: a failure leaves no folder
    atomic.write_files(directory, {BANK_FILE: data})


def read(directory: str, tensors: bool = True) -> SavedBank:
    """The bank saved in ``directory`` (``tensors=False``: its header only)."""
    from safetensors import safe_open

    path = path_in(directory)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("prefix_attn_bank") != FORMAT:
                raise ValueError(f"format {meta.get('prefix_attn_bank')!r}, this version of "
                                 f"prefix_attn reads format {FORMAT!r}")
            names = json.loads(meta["names"])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names) \
                    or len(set(names)) != len(names):
                raise ValueError(f"bad entry names {names!r} (strings, each once)")
            kinds = json.loads(meta.get("kinds", "null")) or ["fixed"] * len(names)
            if len(kinds) != len(names) or not all(k in KINDS for k in kinds):
                raise ValueError(f"bad entry kinds {kinds!r}")
            # older files sampled other weights ("model_signatures"): not compared
            signatures = json.loads(meta.get(SIGNATURES, "null")) or [None] * len(names)
            if len(signatures) != len(names):
                raise ValueError(f"bad model signatures {signatures!r}")
            dims = tuple(int(meta[k]) for k in ("num_layers", "num_kv_heads", "head_dim"))
            default = json.loads(meta.get("default_prefix", "null"))
            if default is not None and default not in names:
                raise ValueError(f"default_prefix {default!r} is not one of the entries")
            # copies: get_tensor maps the file, which the entries would keep mapped (a file
            # rewritten in place, by a cp of a newer bank, changed a running server's prefixes;
            # truncated, it ended the process with SIGBUS)
            loaded = [f.get_tensor(f"entry_{i}").clone() for i in range(len(names))] if tensors else []
    except (KeyError, ValueError, json.JSONDecodeError, OSError) as exc:
        raise ValueError(f"{path}: not a readable prefix bank file ({exc!r})") from exc
    except Exception as exc:  # safetensors' own errors for a corrupt header
        raise ValueError(f"{path}: corrupt prefix bank file ({exc})") from exc
    return SavedBank(names, kinds, signatures, dims, loaded, default)


def entry_lengths(directory: str) -> Dict[str, int]:
    """Each entry's P of the bank saved in ``directory``, read from the file's header (no tensor
    read); {} where the file does not read (:func:`read` says why)."""
    from safetensors import safe_open

    try:
        with safe_open(path_in(directory), framework="pt", device="cpu") as f:
            names = json.loads((f.metadata() or {})["names"])
            return {name: int(f.get_slice(f"entry_{i}").get_shape()[3]) for i, name in enumerate(names)}
    except Exception:  # a broken file: read() names the problem where the bank loads
        return {}
