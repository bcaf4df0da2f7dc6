"""CLIP byte-level BPE tokenizer, read from a local `tokenizer/` folder, offline.

The folder is what diffusers ships: `vocab.json` + `merges.txt` (+ `tokenizer_config.json`,
`special_tokens_map.json`), or a `tokenizer.json`. We rebuild CLIP's text pipeline on the
`tokenizers` library (the same Rust BPE transformers uses): NFC, whitespace runs to one space,
lower case; split into words, contractions, single digits and punctuation runs; byte-level
characters; BPE with a `</w>` end-of-word suffix. Special tokens, padding and truncation are done
here, as the SD pipelines' `tokenizer(prompt, padding="max_length", truncation=True)` does.

`write_clip_tokenizer` builds a small tokenizer in the same format from a word list, for tests and
for the bundled demo model.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from cones_jax.errors import ConfigError
from cones_jax.fileio import CheckpointError, atomic_output

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_EOW = "</w>"
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_DEFAULT_MAX_LENGTH = 77  # CLIP's context length, used when a folder does not say


def byte_characters() -> list[str]:
    """The 256 printable characters that stand for bytes in GPT-2/CLIP vocabularies, in CLIP's vocab order.

    Byte b is itself where it is a printable, non-space Latin-1 character; the other 68 bytes take
    the characters from U+0100 upward, in byte order, after the printable ones.
    """
    printable = [b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255)]
    rest = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def _special_token_text(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _build_backend(vocab: dict[str, int], merges: Sequence[tuple[str, str]], unk_token: str) -> Tokenizer:
    backend = Tokenizer(BPE(vocab=dict(vocab), merges=list(merges), dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix=_EOW, fuse_unk=False, unk_token=unk_token))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


class ClipTokenizer:
    """CLIP BPE tokenizer producing fixed-length rows of ids for the text encoder.

    `added_tokens` lists tokens matched whole before BPE runs, as `(content, id, special, normalized)`:
    the special tokens (whose `id` may be None when they are in `vocab`) and any token a fine-tuning
    added past the vocabulary. `normalized` says whether the token is matched after lower-casing.
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *, bos_token: str = BOS_TOKEN,
                 eos_token: str = EOS_TOKEN, pad_token: str = EOS_TOKEN, unk_token: str = EOS_TOKEN,
                 max_length: int = _DEFAULT_MAX_LENGTH,
                 added_tokens: Iterable[tuple[str, int | None, bool, bool]] = ()) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (start and end tokens), got {max_length}")
        self.max_length = int(max_length)
        self._backend = _build_backend(vocab, merges, unk_token)
        entries: dict[str, tuple[int | None, bool, bool]] = {}
        for tok in (bos_token, eos_token, unk_token, pad_token):
            entries[tok] = (vocab.get(tok), True, False)
        for content, idx, special, normalized in added_tokens:
            if idx is None:
                idx = vocab.get(content, entries.get(content, (None,))[0])
            entries[content] = (idx, bool(special), bool(normalized))
        # Tokens outside the vocabulary get ids in the order they are added: add them by id.
        order = sorted(entries.items(), key=lambda kv: (kv[1][0] is None, kv[1][0] or 0))
        for content, (idx, special, normalized) in order:
            token = AddedToken(content, special=special, normalized=normalized)
            if special:
                self._backend.add_special_tokens([token])
            else:
                self._backend.add_tokens([token])
            got = self._backend.token_to_id(content)
            if idx is not None and got != idx:
                raise CheckpointError(f"tokenizer: added token {content!r} has id {idx} in the folder but "
                                      f"would get id {got}; the added-token list is inconsistent")
        ids = {}
        for name, tok in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            idx = self._backend.token_to_id(tok)
            if idx is None or (tok not in vocab and entries[tok][0] is None):
                raise CheckpointError(f"tokenizer: {name} token {tok!r} is not in the vocabulary")
            ids[name] = idx
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def _tokens(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def encode(self, prompts: list[str] | str) -> np.ndarray:
        """[B, max_length] int32: start token, tokens (truncated), end token, padding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
        keep = self.max_length - 2
        for row, ids in zip(out, self._tokens(prompts)):
            ids = ids[:keep]
            row[0] = self.bos_id
            row[1:1 + len(ids)] = ids
            row[1 + len(ids)] = self.eos_id
        return out

    __call__ = encode

    def n_tokens(self, prompt: str) -> int:
        """Untruncated length with the start and end tokens (compare with max_length)."""
        return len(self._tokens([prompt])[0]) + 2

    def word_ids(self, word: str) -> list[int]:
        """Sub-word ids of a word or phrase, as they appear inside an encoded prompt (no start/end)."""
        ids = self._tokens([word])[0]
        if not ids:
            raise ConfigError(f"{word!r} tokenises to nothing; give a word with at least one letter, digit or symbol")
        return list(ids)

    def find_word(self, ids_row: Sequence[int], word: str) -> list[list[int]]:
        """Positions of every (non-overlapping) occurrence of `word`'s sub-word sequence in an encoded row.

        The search stops at the first end token after position 0, so padding never matches.
        """
        target = self.word_ids(word)
        row = [int(i) for i in np.asarray(ids_row).reshape(-1)]
        end = len(row)
        for i in range(1, len(row)):
            if row[i] == self.eos_id:
                end = i
                break
        found, n, i = [], len(target), 0
        while i + n <= end:
            if row[i:i + n] == target:
                found.append(list(range(i, i + n)))
                i += n
            else:
                i += 1
        return found

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of a row of ids. With skip_special_tokens, the start token is dropped and decoding stops
        at the first end token after it (padding included)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if skip_special_tokens:
            if ids and ids[0] == self.bos_id:
                ids = ids[1:]
            if self.eos_id in ids:
                ids = ids[:ids.index(self.eos_id)]
            ids = [i for i in ids if i not in (self.bos_id, self.eos_id)]
        text = self._backend.decode(ids, skip_special_tokens=False)
        return text.replace(_EOW, " ").strip()

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self._backend.id_to_token(int(i)) for i in np.asarray(ids).reshape(-1)]


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _parse_merges(lines: Iterable, path: str) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(lines):
        if isinstance(line, (list, tuple)):
            parts = list(line)
        else:
            line = line.rstrip("\r\n")
            if not line or (n == 0 and line.startswith("#version")):
                continue
            parts = line.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{path}: merge {n + 1} ({line!r}) is not two space-separated symbols")
        merges.append((parts[0], parts[1]))
    return merges


def _token_spec(value: object) -> tuple[str, bool] | None:
    """A special token as written in tokenizer_config / special_tokens_map -> (content, normalized).

    transformers reads a plain string as an AddedToken with normalized=False, a dict with its own flag
    (False when absent, as for any special token)."""
    if isinstance(value, str):
        return value, False
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"], bool(value.get("normalized", False))
    return None


def load_tokenizer(folder: str) -> ClipTokenizer:
    """Reads a CLIP tokenizer folder (diffusers' `tokenizer/`), as transformers' CLIPTokenizer does."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: tokenizer folder not found")
    config = {}
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        config.update(_read_json(cfg_path))
    decoder = config.get("added_tokens_decoder")
    map_path = os.path.join(folder, "special_tokens_map.json")
    if not isinstance(decoder, dict) and os.path.isfile(map_path):
        # Legacy layout (what diffusers' SD folders have): the map overrides the config.
        config.update({k: v for k, v in _read_json(map_path).items() if v is not None})

    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    json_path = os.path.join(folder, "tokenizer.json")
    listed: dict[str, tuple[int, bool, bool | None]] = {}  # content -> (id, special, normalized)
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        vocab = _read_json(vocab_path)
        with open(merges_path, encoding="utf-8") as f:
            merges = _parse_merges(f, merges_path)
        added_path = os.path.join(folder, "added_tokens.json")
        if not isinstance(decoder, dict) and os.path.isfile(added_path):
            for content, idx in _read_json(added_path).items():
                listed[content] = (int(idx), False, None)
    elif os.path.isfile(json_path):
        data = _read_json(json_path)
        model = data.get("model") or {}
        if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise CheckpointError(f"{json_path}: not a BPE tokenizer (a CLIP tokenizer is expected)")
        vocab = model["vocab"]
        merges = _parse_merges(model.get("merges") or [], json_path)
        if not isinstance(decoder, dict):
            for t in data.get("added_tokens") or []:
                listed[t["content"]] = (int(t["id"]), bool(t.get("special")), bool(t.get("normalized", True)))
    else:
        raise CheckpointError(f"{folder}: no tokenizer files (expected vocab.json and merges.txt, or tokenizer.json)")
    if isinstance(decoder, dict):
        for idx, t in decoder.items():
            if isinstance(t, dict) and isinstance(t.get("content"), str):
                special = bool(t.get("special", False))
                listed[t["content"]] = (int(idx), special, bool(t.get("normalized", not special)))

    tokens, flags = {}, {}
    for key, default in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN), ("unk_token", EOS_TOKEN),
                         ("pad_token", None)):
        spec = _token_spec(config.get(key))
        if spec is None:
            spec = (default or tokens["eos_token"], False)
        tokens[key] = spec[0]
        flags[spec[0]] = spec[1]  # a token named twice (pad = eos) keeps the later flag, as transformers does
    added = []
    for content, normalized in flags.items():
        idx, _, listed_norm = listed.pop(content, (None, True, None))
        added.append((content, idx, True, normalized if listed_norm is None else listed_norm))
    for content, (idx, special, normalized) in listed.items():
        added.append((content, idx, special, (not special) if normalized is None else normalized))

    max_length = config.get("model_max_length")
    if not isinstance(max_length, (int, float)) or isinstance(max_length, bool) or not 2 <= max_length <= 1_000_000:
        max_length = _DEFAULT_MAX_LENGTH  # unset, or transformers' "very large" placeholder
    return ClipTokenizer(vocab, merges, max_length=int(max_length), added_tokens=added, **tokens)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Applies merges by rank (lowest first), as BPE does."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        pairs = [p for p in pairs if p[0] is not None]
        if not pairs:
            break
        rank = min(pairs)[0]
        a, b = next((symbols[i], symbols[i + 1]) for r, i in pairs if r == rank)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def clip_vocabulary(words: list[str], *, max_merges: int | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocab and merges that `write_clip_tokenizer` writes for `words` (pure: no files)."""
    chars = byte_characters()
    vocab: dict[str, int] = {}
    for tok in chars + [c + _EOW for c in chars]:
        vocab[tok] = len(vocab)
    splitter = _build_backend({EOS_TOKEN: 0}, [], EOS_TOKEN)
    counts: collections.Counter = collections.Counter()
    first_seen: dict[str, int] = {}
    for text in words:
        normal = splitter.normalizer.normalize_str(text)
        for piece, _ in splitter.pre_tokenizer.pre_tokenize_str(normal):
            if piece in (BOS_TOKEN, EOS_TOKEN):
                continue
            counts[piece] += 1
            first_seen.setdefault(piece, len(first_seen))
    order = sorted(counts, key=lambda p: (-counts[p], first_seen[p]))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for piece in order:
        symbols = _bpe(list(piece[:-1]) + [piece[-1] + _EOW], ranks)
        while len(symbols) > 1 and (max_merges is None or len(merges) < max_merges):
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = [pair[0] + pair[1]] + symbols[2:]
    for tok in (BOS_TOKEN, EOS_TOKEN):
        vocab[tok] = len(vocab)
    return vocab, merges


def write_clip_tokenizer(folder: str, words: list[str], *, pad_token: str = EOS_TOKEN, max_length: int = 77,
                         max_merges: int | None = None) -> ClipTokenizer:
    """Writes a small CLIP-format tokenizer (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) to `folder` and returns it loaded.

    The vocabulary is CLIP's layout in miniature: the 256 byte characters, the same with `</w>`,
    one token per merge, then `<|startoftext|>` and `<|endoftext|>`. Merges are added so that every
    word (each word of each listed phrase) becomes a single token, the most frequent first; with
    `max_merges` the rarer ones stay split. Any other word is spelled with shorter pieces, down to
    single bytes. `pad_token="!"` mimics SD 2.x (pad id 0, the id of "!").
    """
    vocab, merges = clip_vocabulary(words, max_merges=max_merges)
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary (use {EOS_TOKEN!r} or '!')")

    os.makedirs(folder, exist_ok=True)

    def special(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    special_map = {"bos_token": special(BOS_TOKEN), "eos_token": special(EOS_TOKEN),
                   "pad_token": pad_token, "unk_token": special(EOS_TOKEN)}
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": int(max_length), "tokenizer_class": "CLIPTokenizer", **special_map}
    files = {name: json.dumps(obj, indent=2, ensure_ascii=False) + "\n" for name, obj in
             (("vocab.json", vocab), ("special_tokens_map.json", special_map), ("tokenizer_config.json", config))}
    files["merges.txt"] = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    for name, text in files.items():
        with atomic_output(os.path.join(folder, name), "wb") as f:
            f.write(text.encode("utf-8"))
    return load_tokenizer(folder)
