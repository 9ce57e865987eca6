"""Datasets in the formats TRL users already have, tokenized for training, and batch collation.

Formats (one record per line of a JSONL file, an element of a JSON list, a parquet row, or a
``datasets`` row), detected from the columns:

- ``messages``: a chat, ``[{"role": ..., "content": ...}, ...]``; SFT trains on assistant turns.
- ``prompt`` / ``completion``: strings (concatenated as is) or message lists (chat template).
- ``prompt`` / ``chosen`` / ``rejected``: a preference pair with an explicit prompt; or only
  ``chosen`` / ``rejected`` (implicit prompt): the prompt is their longest common prefix (whole
  messages for chats; for strings, characters up to the last whitespace or the first difference).
- ``prompt`` alone: prompt-only data for RL.

Records come as a list of dicts (local files, a built-in task) or, from a ``save_to_disk`` folder or
a Hub dataset, as a ``datasets.Dataset``: such data stays an Arrow table through tokenization
(``Dataset.map(batched=True)``, kept in memory, never written next to the user's data) and the
trainers read it through :class:`ExampleTable`, a list-like view that makes one example's dict at a
time, so a million-row dataset never exists as a million Python dicts.

Each tokenized example is a dict of Python int lists, batched by :func:`pad_batch`:
SFT ``{"input_ids", "labels"}`` (labels are -100 outside completion/assistant tokens); preference
``{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}``; prompt-only
``{"prompt_ids"}``.  An end-of-sequence token closes every completion (unless the chat template
already put one there).

Truncation never cuts a prompt: a prompt that leaves no room for one completion token within
``max_length`` is an error naming the record; completions are cut from the right to fit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import torch

from .config import UserError

IGNORE_INDEX = -100
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "preference_implicit": ("chosen", "rejected"),
    "prompt_only": ("prompt",),
}
# What each trainer accepts.
SFT_FORMATS = ("messages", "prompt_completion")
PREFERENCE_FORMATS = ("preference", "preference_implicit")


class DataError(UserError, ValueError):
    """Bad training data: the message names the file/record and the problem."""


# --------------------------------------------------------------------------------------------
# Loading


def is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``: its
    ``dataset_info.json`` and ``state.json``; a ``DatasetDict``: its ``dataset_dict.json``)."""
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_dict.json"))
        or all(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "state.json")))


def _load_saved(source: str, split: str):
    from .optional import required

    datasets = required("datasets", f"the dataset folder {source!r} (written by save_to_disk)",
                        hint="pip install datasets")
    try:
        data = datasets.load_from_disk(source)
    except Exception as e:
        raise DataError(f"dataset folder {source!r} could not be read with datasets.load_from_disk: "
                        f"{' '.join(str(e).split())[:300]}") from e
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"dataset folder {source!r} has splits {sorted(data)}; --dataset-split {split!r} "
                            f"is not one of them")
        data = data[split]
    return data


def is_table(records) -> bool:
    """Whether ``records`` is a ``datasets.Dataset`` (an Arrow table) rather than a list of dicts."""
    return hasattr(records, "column_names") and hasattr(records, "map")


def take(records, n: int) -> list[dict]:
    """The first ``n`` records (of a list or a ``datasets.Dataset``) as a list of dicts."""
    if is_table(records):
        return records.select(range(min(n, len(records)))).to_list()
    return list(records[:n])


class ExampleTable:
    """Tokenized examples held in a ``datasets.Dataset``, read like a list: ``len``, ``t[i]`` (one
    example's dict), ``t[a:b]`` and iteration (lists of dicts, made on demand).  Columns computed
    later (DPO's reference log-probs, a reward margin) are kept beside the table by
    :func:`set_columns`, as plain lists of numbers."""

    def __init__(self, table, extra: dict[str, list] | None = None):
        self.table = table
        self.extra = dict(extra or {})

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        row = dict(self.table[i])
        for c, values in self.extra.items():
            row[c] = values[i]
        return row

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __add__(self, other):
        return ConcatExamples(self, other)

    def __radd__(self, other):
        return ConcatExamples(other, self)

    def __repr__(self) -> str:
        return f"ExampleTable({len(self)} examples, columns {self.table.column_names + list(self.extra)})"


class _Column:
    """One column of an :class:`ExampleTable`, read like a list (``len``, ``c[i]``)."""

    def __init__(self, examples: ExampleTable, name: str):
        self.examples, self.name = examples, name

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.examples.table[int(i)][self.name]


def column(examples, name: str):
    """``[e[name] for e in examples]``: a list for a list of examples, a lazy view of an :class:`ExampleTable`."""
    if isinstance(examples, ExampleTable) and name in examples.table.column_names:
        return _Column(examples, name)
    return [e[name] for e in examples]


class ConcatExamples:
    """Two example collections read as one (``a + b``); :func:`set_columns` writes through to both."""

    def __init__(self, a, b):
        self.parts = (a, b)

    def __len__(self) -> int:
        return len(self.parts[0]) + len(self.parts[1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        a, b = self.parts
        return a[i] if i < len(a) else b[i - len(a)]

    def __iter__(self):
        for part in self.parts:
            yield from part


def set_columns(examples, columns: dict[str, list]) -> None:
    """Add per-example values (``{name: [value per example]}``) to a list of example dicts, an
    :class:`ExampleTable` or a concatenation of them."""
    if isinstance(examples, ConcatExamples):
        a, b = examples.parts
        set_columns(a, {k: v[:len(a)] for k, v in columns.items()})
        set_columns(b, {k: v[len(a):] for k, v in columns.items()})
    elif isinstance(examples, ExampleTable):
        examples.extra.update({k: list(v) for k, v in columns.items()})
    else:
        for k, values in columns.items():
            for ex, v in zip(examples, values):
                ex[k] = v


def _tokenize_each(records, encode, columns: tuple[str, ...]):
    """``[encode(record, i) for each record]``: a list for a list of records; for a ``datasets.Dataset``
    an :class:`ExampleTable` made by ``Dataset.map(batched=True)`` (in memory, no cache file)."""
    if not is_table(records):
        return [encode(r, i) for i, r in enumerate(records)]

    def batch(rows: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = [encode(dict(zip(rows, values)), i) for i, values in zip(indices, zip(*rows.values()))]
        return {c: [o[c] for o in out] for c in columns}

    import datasets

    progress = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one line per error, and the trainers' own progress
    try:
        table = records.map(batch, batched=True, batch_size=1000, with_indices=True,
                            remove_columns=records.column_names, keep_in_memory=True, load_from_cache_file=False)
    finally:
        if progress:
            datasets.enable_progress_bars()
    return ExampleTable(table)


def load_records(source: str, split: str = "train", config: str | None = None) -> list[dict]:
    """Records from a local ``.jsonl`` / ``.json`` / ``.parquet`` file, a ``save_to_disk`` folder, or a
    Hub dataset name (``config``: its configuration, the ``name`` of ``datasets.load_dataset``).

    Local files need no ``datasets`` package; saved folders and Hub names do (a clear error when it
    is missing)."""
    if is_saved_dataset(source):
        records = _load_saved(source, split)
    elif os.path.isfile(source):
        try:
            records = _read_file(source)
        except OSError as e:  # unreadable (permissions, I/O)
            raise DataError(f"dataset file {source!r} cannot be read: {e.strerror or e}") from e
    elif os.path.sep in source and not os.path.exists(source) and (source.startswith((".", "/", "~"))):
        raise DataFileNotFound(f"dataset file {source!r} does not exist")
    else:
        from .optional import required

        datasets = required("datasets", f"the dataset {source!r} (not a local file: a Hub dataset)",
                            hint="pip install datasets")
        try:
            records = datasets.load_dataset(source, name=config, split=split)
        except Exception as e:
            what = f"split {split!r}" + (f", configuration {config!r}" if config else "")
            raise DataError(f"could not load dataset {source!r} ({what}): "
                            f"{' '.join(str(e).split())[:300]}") from e
    if not len(records):
        raise DataError(f"dataset {source!r} is empty")
    if is_table(records):
        return records
    if not all(isinstance(r, dict) for r in records):
        raise DataError(f"dataset {source!r}: every record must be a mapping of column -> value")
    return records


class DataFileNotFound(DataError, FileNotFoundError):
    """A dataset path that does not exist."""


def _read_file(source: str) -> list:
    """The records of a local .jsonl / .json / .parquet file (UTF-8 text)."""
    ext = os.path.splitext(source)[1].lower()
    if ext == ".jsonl":
        records = []
        with open(source, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{source}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start + 1} "
                                    f"of the line)") from e
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{source}:{lineno}: not valid JSON ({e})") from e
        return records
    if ext == ".json":
        try:
            with open(source, encoding="utf-8") as fh:
                data = json.load(fh)
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{e.lineno}: not valid JSON ({e.msg})") from e
        records = data if isinstance(data, list) else data.get("data", data.get("train")) \
            if isinstance(data, dict) else None
        if not isinstance(records, list):
            raise DataError(f"{source}: expected a JSON list of records (or {{'data': [...]}})")
        return records
    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(source).to_pylist()
        except Exception as e:  # pyarrow's ArrowInvalid: not a parquet file
            if isinstance(e, OSError) and e.errno is not None:
                raise
            raise DataError(f"{source}: not a readable parquet file ({' '.join(str(e).split())[:200]})") from e
    raise DataError(f"{source}: unsupported file type {ext!r}; use .jsonl, .json or .parquet")


def detect_format(records: list[dict], allowed: Iterable[str] | None = None, name: str = "dataset") -> str:
    """The format of ``records`` (see module doc), checked against the formats a trainer accepts."""
    if not len(records):
        raise DataError(f"{name} is empty")
    columns = set(records.column_names) if is_table(records) else set(records[0])
    if {"chosen", "rejected"} <= columns:
        fmt = "preference" if "prompt" in columns else "preference_implicit"
    elif "messages" in columns:
        fmt = "messages"
    elif {"prompt", "completion"} <= columns:
        fmt = "prompt_completion"
    elif "prompt" in columns:
        fmt = "prompt_only"
    else:
        fmt = None
    allowed = tuple(allowed) if allowed is not None else tuple(FORMAT_COLUMNS)
    if fmt not in allowed:
        need = " or ".join("/".join(FORMAT_COLUMNS[f]) for f in allowed)
        raise DataError(f"{name} has columns {sorted(columns)}; this trainer needs columns {need}")
    for i, r in enumerate(records):
        missing = [c for c in FORMAT_COLUMNS[fmt] if c not in r or r[c] is None]
        if missing:
            raise DataError(f"{name} record {i} is missing column(s) {missing} (format {fmt})")
        for c in FORMAT_COLUMNS[fmt]:
            v = r[c]
            if c == "messages":
                ok = _is_chat(v) and len(v) > 0
            else:
                ok = isinstance(v, str) or _is_chat(v)
            if not ok:
                want = "a list of {'role', 'content'} messages" if c == "messages" else \
                    "a string or a list of {'role', 'content'} messages"
                raise DataError(f"{name} record {i}: column {c!r} must be {want}, got {type(v).__name__} {v!r:.40}")
    return fmt


# --------------------------------------------------------------------------------------------
# Rendering and tokenizing


def _is_chat(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m for m in x)


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data holds chat messages but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _close(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def encode_prompt_completion(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) for string or chat prompts/completions; the completion ends in EOS."""
    if _is_chat(prompt) or _is_chat(completion):
        prompt_msgs = prompt if _is_chat(prompt) else [{"role": "user", "content": str(prompt)}]
        completion_msgs = completion if _is_chat(completion) else [{"role": "assistant", "content": str(completion)}]
        prompt_text = _render(tokenizer, prompt_msgs, generation_prompt=True)
        full_text = _render(tokenizer, prompt_msgs + completion_msgs, generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise DataError("the chat template does not render the prompt as a prefix of the full chat")
        p = _encode(tokenizer, prompt_text, special=False)
        full = _encode(tokenizer, full_text, special=False)
        return p, _close(tokenizer, full[len(p):])
    p = _encode(tokenizer, str(prompt), special=True)
    c = _encode(tokenizer, str(completion), special=False)
    return p, _close(tokenizer, c)


def encode_messages(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a chat: labels are the ids on assistant turns, -100 elsewhere."""
    if not _is_chat(messages) or not messages:
        raise DataError("`messages` must be a non-empty list of {'role', 'content'} dicts")
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        # Render the prefix up to this turn; the tokens the turn adds are trained on if assistant.
        upto = _encode(tokenizer, _render(tokenizer, messages[: i + 1], generation_prompt=False), special=False)
        if m["role"] == "assistant":
            before = _encode(tokenizer, _render(tokenizer, messages[:i], generation_prompt=True), special=False)
            if upto[: len(before)] != before or ids != before[: len(ids)]:
                raise DataError("the chat template does not tokenize turns as prefixes of the whole chat")
            labels += [IGNORE_INDEX] * (len(before) - len(ids)) + upto[len(before):]
        else:
            labels += [IGNORE_INDEX] * (len(upto) - len(ids))
        ids = upto
    if all(x == IGNORE_INDEX for x in labels):
        raise DataError("a `messages` record has no assistant turn to train on")
    return ids, labels


def _fit(prompt_ids: list[int], completion_ids: list[int], max_length: int, where: str) -> list[int]:
    """Cut the completion so prompt + completion fits; a prompt that leaves no room is an error."""
    if len(prompt_ids) >= max_length:
        raise DataError(
            f"{where}: the prompt is {len(prompt_ids)} tokens, which leaves no room for a completion "
            f"within max_length={max_length}; raise max_length or shorten the prompt"
        )
    return completion_ids[: max_length - len(prompt_ids)]


def tokenize_sft(records: list[dict], tokenizer, max_length: int, name: str = "dataset") -> list[dict]:
    """SFT examples ``{"input_ids", "labels"}`` with loss only on completion / assistant tokens."""
    fmt = detect_format(records, SFT_FORMATS, name)

    def encode(r: dict, i: int) -> dict:
        where = f"{name} record {i}"
        if fmt == "messages":
            ids, labels = encode_messages(tokenizer, r["messages"])
            first = next(k for k, x in enumerate(labels) if x != IGNORE_INDEX)
            if first >= max_length:
                raise DataError(f"{where}: the first assistant turn starts at token {first}, beyond "
                                f"max_length={max_length}; raise max_length")
            ids, labels = ids[:max_length], labels[:max_length]
        else:
            p, c = encode_prompt_completion(tokenizer, r["prompt"], r["completion"])
            c = _fit(p, c, max_length, where)
            ids, labels = p + c, [IGNORE_INDEX] * len(p) + c
        return {"input_ids": ids, "labels": labels}

    return _tokenize_each(records, encode, ("input_ids", "labels"))


def _common_prefix(a, b):
    if _is_chat(a) and _is_chat(b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return a[:n], a[n:], b[n:]
    a, b = str(a), str(b)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    cut = max(a.rfind(" ", 0, n) + 1, 0) if n < min(len(a), len(b)) and " " in a[:n] else n
    return a[:cut], a[cut:], b[cut:]


def split_preference(record: dict, fmt: str) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) with an implicit prompt taken from the common prefix."""
    if fmt == "preference":
        return record["prompt"], record["chosen"], record["rejected"]
    return _common_prefix(record["chosen"], record["rejected"])


def tokenize_preference(records: list[dict], tokenizer, max_length: int, name: str = "dataset") -> list[dict]:
    """Preference examples ``{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}``."""
    fmt = detect_format(records, PREFERENCE_FORMATS, name)
    n_equal = 0

    def encode(r: dict, i: int) -> dict:
        nonlocal n_equal
        where = f"{name} record {i}"
        prompt, chosen, rejected = split_preference(r, fmt)
        p, c = encode_prompt_completion(tokenizer, prompt, chosen)
        p2, rj = encode_prompt_completion(tokenizer, prompt, rejected)
        if p2 != p:
            raise DataError(f"{where}: the prompt tokenizes differently before chosen and rejected")
        c, rj = _fit(p, c, max_length, where), _fit(p, rj, max_length, where)
        n_equal += c == rj
        return {
            "chosen_ids": p + c, "chosen_labels": [IGNORE_INDEX] * len(p) + c,
            "rejected_ids": p + rj, "rejected_labels": [IGNORE_INDEX] * len(p) + rj,
        }

    out = _tokenize_each(records, encode, ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"))
    if n_equal == len(out):
        raise DataError(f"{name}: chosen equals rejected in every record; there is no preference to learn")
    return out


def tokenize_prompts(records: list[dict], tokenizer, max_length: int, name: str = "dataset") -> list[dict]:
    """Prompt-only examples ``{"prompt_ids"}`` (chat prompts get the generation prompt)."""
    detect_format(records, ("prompt_only", "prompt_completion", "preference"), name)

    def encode(r: dict, i: int) -> dict:
        prompt = r["prompt"]
        if _is_chat(prompt):
            ids = _encode(tokenizer, _render(tokenizer, prompt, generation_prompt=True), special=False)
        else:
            ids = _encode(tokenizer, str(prompt), special=True)
        if not ids:
            raise DataError(f"{name} record {i}: the prompt is empty")
        if len(ids) >= max_length:
            raise DataError(f"{name} record {i}: the prompt is {len(ids)} tokens, which leaves no room "
                            f"to generate within max_length={max_length}")
        return {"prompt_ids": ids}

    return _tokenize_each(records, encode, ("prompt_ids",))


# --------------------------------------------------------------------------------------------
# Batching


def pad_batch(seqs: list[list[int]], pad_value: int, padding_side: str = "right") -> torch.Tensor:
    """``[B, T]`` int64 tensor of ``seqs`` padded to the longest with ``pad_value``."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(s) for s in seqs)
    rows = [
        (s + [pad_value] * (width - len(s))) if padding_side == "right" else ([pad_value] * (width - len(s)) + s)
        for s in seqs
    ]
    return torch.tensor(rows, dtype=torch.long)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` positions counting real tokens only (0 on padding), for left or right padding: what
    ``generate`` computes, so a padded row gives the outputs of the row alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def collate(ids: list[list[int]], labels: list[list[int]] | None, pad_token_id: int,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """A model batch: ``input_ids``, ``attention_mask``, ``position_ids`` (from the mask, so left and
    right padding give the same outputs) and, with ``labels``, ``labels`` padded with -100."""
    input_ids = pad_batch(ids, pad_token_id, padding_side)
    attention_mask = pad_batch([[1] * len(s) for s in ids], 0, padding_side)
    position_ids = position_ids_from_mask(attention_mask)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if labels is not None:
        batch["labels"] = pad_batch(labels, IGNORE_INDEX, padding_side)
    return batch


def collate_sft(examples: list[dict], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    return collate([e["input_ids"] for e in examples], [e["labels"] for e in examples], pad_token_id, padding_side)


def collate_preference(examples: list[dict], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, in one ``[2B, T]`` batch (one forward for both)."""
    ids = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    labels = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
    return collate(ids, labels, pad_token_id, padding_side)


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held_out): a seeded random ``fraction`` of ``items`` held out (at least one if > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(items), []
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(items), generator=g).tolist()
    n_eval = max(1, round(fraction * len(items)))
    held = set(order[:n_eval])
    if is_table(items):
        return (items.select([i for i in range(len(items)) if i not in held]),
                items.select(sorted(held)))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
