"""ChatML records, the format everything is converted to, and their tokenization (a mirror of the
official `prepare_chatml_sample`; OFFICIAL.md sections 3 and 4).

A record is `{"messages": [...], "start_index": int|null, "speaker": str|null, "misc": {...}}`;
a message is `{"role", "content", "recipient"}` whose content is a string, a text part, an audio
part, or a list of those. Turns before `start_index` are context: they carry no loss.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from errors import DataError

ROLES = ("system", "user", "assistant")
DEFAULT_SYSTEM_PROMPT = "Generate audio following instruction."  # the official examples' prompt
IGNORE = -100  # label of a position that is not supervised


@dataclass
class TextPart:
    text: str


@dataclass
class AudioPart:
    audio_url: str | None = None  # relative paths resolve against the data file's folder
    raw_audio: str | None = None  # base64-encoded audio file bytes
    offset: float | None = None  # seconds
    duration: float | None = None  # seconds


@dataclass
class Message:
    role: str
    content: list  # of TextPart | AudioPart
    recipient: str | None = None


@dataclass
class Record:
    messages: list[Message]
    start_index: int | None = None
    speaker: str | None = None
    misc: dict | None = None
    source: str = "<memory>"  # "file:line (record i)", for error messages
    base_dir: str = "."  # relative audio paths resolve here
    index: int = 0  # position in its data set
    fields: dict = field(default_factory=dict)  # (message, part or None) -> the input's own name


@dataclass
class AudioSegment:
    """One audio part of a record, in order of appearance."""
    codes: torch.Tensor | None  # (K, T) int16 (int32 for large codebooks)
    waveform: torch.Tensor | None  # mono float32 at 16 kHz (Whisper input only)
    is_out: bool  # assistant audio (generated) vs system/user audio (audio-in)


@dataclass
class Sample:
    """One tokenized record: text tokens with audio placeholders, their labels, and its audio."""
    input_ids: torch.Tensor  # (S,) int64
    label_ids: torch.Tensor  # (S,) int64, IGNORE = not supervised
    audios: list[AudioSegment] = field(default_factory=list)
    source: str = "<memory>"


def resolve_audio_path(part: AudioPart, base_dir: str) -> str:
    return part.audio_url if os.path.isabs(part.audio_url) else os.path.join(base_dir, part.audio_url)


def audio_paths(records: list[Record]) -> set[str]:
    """The audio files the records name (not the raw-audio parts)."""
    return {resolve_audio_path(p, r.base_dir) for r in records for m in r.messages
            for p in m.content if isinstance(p, AudioPart) and p.audio_url}


def field_name(record: Record, i: int, j: int | None = None) -> str:
    """How the user's input names message i (or its part j), so errors point at what they wrote."""
    if j is None or (i, j) in record.fields:
        return record.fields.get((i, j), f"messages[{i}]")
    return f"messages[{i}].content" + (f"[{j}]" if len(record.messages[i].content) > 1 else "")


def _part_from_json(obj, where: str):
    if isinstance(obj, str):
        return TextPart(obj)
    if not isinstance(obj, dict):
        raise DataError(f"{where}: content part must be a string or an object with a \"type\", "
                        f"got {type(obj).__name__}")
    kind = obj.get("type")
    if kind == "text":
        if not isinstance(obj.get("text"), str):
            raise DataError(f"{where}: text part needs a string field \"text\"")
        return TextPart(obj["text"])
    if kind == "audio":
        url, raw = obj.get("audio_url"), obj.get("raw_audio")
        if not url and not raw:
            raise DataError(f"{where}: audio part needs \"audio_url\" (a path relative to the data "
                            "file) or \"raw_audio\" (base64)")
        for key in ("audio_url", "raw_audio"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise DataError(f"{where}.{key} must be a string, got {type(obj[key]).__name__}")
        for key in ("offset", "duration"):
            value = obj.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value < math.inf):
                raise DataError(f"{where}.{key} must be a finite number of seconds >= 0 or null, "
                                f"got {value!r}")
        return AudioPart(url, raw, obj.get("offset"), obj.get("duration"))
    raise DataError(f"{where}: unknown content type {kind!r}; use \"text\" or \"audio\"")


def record_from_json(obj, source: str, base_dir: str) -> Record:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise DataError(f"{source}: a ChatML record is an object with a \"messages\" list")
    messages = []
    for i, m in enumerate(obj["messages"]):
        where = f"{source}: messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: a message is an object with \"role\" and \"content\"")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}.role is {role!r}; must be one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None:
            raise DataError(f"{where}.content is missing")
        parts = content if isinstance(content, list) else [content]
        parts = [_part_from_json(p, f"{where}.content") for p in parts]
        recipient = m.get("recipient")
        if recipient and role != "assistant":
            raise DataError(f"{where}.recipient is only allowed on assistant messages")
        messages.append(Message(role, parts, recipient or None))
    start = obj.get("start_index")
    if start is not None and (not isinstance(start, int) or isinstance(start, bool) or start < 0):
        raise DataError(f"{source}: start_index must be a non-negative integer or null, got {start!r}")
    speaker = obj.get("speaker")
    return Record(messages, start, None if speaker is None else str(speaker), obj.get("misc"),
                  source, base_dir)


def record_to_json(record: Record, out_dir: str) -> dict:
    """The record as ChatML JSON, its audio paths relative to `out_dir`."""
    def part(p):
        if isinstance(p, TextPart):
            return {"type": "text", "text": p.text}
        url = p.audio_url and os.path.relpath(resolve_audio_path(p, record.base_dir), out_dir)
        return {"type": "audio", "audio_url": url, "raw_audio": p.raw_audio, "offset": p.offset,
                "duration": p.duration}
    return {"messages": [{"role": m.role, "content": [part(p) for p in m.content],
                          "recipient": m.recipient} for m in record.messages],
            "start_index": record.start_index, "speaker": record.speaker, "misc": record.misc}


def cloning_record(ref_text: str, ref_audio: str, text: str, audio: str, speaker=None,
                   system: str = DEFAULT_SYSTEM_PROMPT) -> dict:
    """The official zero-shot voice-cloning layout: the reference as context, then the target."""
    audio_part = lambda url: {"type": "audio", "audio_url": url}  # noqa: E731
    return {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": ref_text},
                         {"role": "assistant", "content": audio_part(ref_audio)},
                         {"role": "user", "content": text},
                         {"role": "assistant", "content": audio_part(audio)}],
            "start_index": 4, "speaker": speaker}


def tokenize_records(records: list[Record], tokenizer) -> list[tuple[np.ndarray, np.ndarray, list]]:
    """(input ids, label ids, [(audio part, is_out)]) of each record. Each piece is encoded on its
    own without special tokens, as the official code does: the constant pieces once per tokenizer,
    the records' distinct texts in one batch."""
    constants = tokenizer.__dict__.setdefault("_piece_ids", {})

    def const(piece: str) -> list[int]:
        if piece not in constants:
            constants[piece] = tokenizer.encode(piece, add_special_tokens=False)
        return constants[piece]
    header = {(first, role): const(("<|begin_of_text|>" if first else "") +
                                   f"<|start_header_id|>{role}<|end_header_id|>\n\n")
              for first in (True, False) for role in ROLES}
    audio_in = const("<|audio_bos|><|AUDIO|><|audio_eos|>")
    audio_out = const("<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>")
    eom, eot = const("<|eom_id|>"), const("<|eot_id|>")
    plans = []  # per record: its pieces (ids, or a text to encode; trained) and its audio parts
    for record in records:
        plan, audios, msgs = [], [], record.messages
        for turn, msg in enumerate(msgs):
            assistant = msg.role == "assistant"
            trained = assistant and (record.start_index is None or turn >= record.start_index)
            plan.append((header[turn == 0, msg.role], False))
            if msg.recipient:  # official quirk: recipient tokens are always labelled
                plan.append((f"{msg.recipient}<|recipient|>", True))
            for part in msg.content:
                if isinstance(part, TextPart):
                    plan.append((part.text, trained))
                else:
                    audios.append((part, assistant))
                    plan.append((audio_out if assistant else audio_in, trained))
            next_is_assistant = turn + 1 < len(msgs) and msgs[turn + 1].role == "assistant"
            plan.append((eom if assistant and next_is_assistant else eot, trained))
        plans.append((plan, audios))
    texts = list(dict.fromkeys(p for plan, _ in plans for p, _ in plan if isinstance(p, str)))
    encoded = dict(zip(texts, (e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(
        texts, add_special_tokens=False)))) if texts else {}
    out = []
    for plan, audios in plans:
        pieces = [encoded[p] if isinstance(p, str) else p for p, _ in plan]
        lengths = [len(p) for p in pieces]
        ids = np.fromiter(itertools.chain.from_iterable(pieces), np.int64, sum(lengths))
        supervised = np.repeat([s for _, s in plan], lengths)
        out.append((ids, np.where(supervised, ids, IGNORE), audios))
    return out
