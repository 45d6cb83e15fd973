"""Data: input formats converted to ChatML records, validation with errors that say what to fix,
tokenization (a mirror of the official `prepare_chatml_sample`), audio and audio-code loading, one
`Sample` per record, and the data command line:

    python data.py check FILE|DIR [--model CKPT|tiny]     # validate and report; exit 1 if invalid
    python data.py prepare FILE|DIR --tokenizer TOK_DIR   # write the .codes.npy sidecars

A record is `{"messages": [...], "start_index": int|null, "speaker": str|null, "misc": {...}}`
(SPEC section 3). Flat voice-cloning records, ms-swift / ShareGPT chats with `<audio>` tags and
folders of transcribed clips are converted to it when read. Audio codes are computed offline and
cached next to each audio file as `<audio stem>.codes.npy`, an integer array of shape
(num_codebooks, T) at 25 frames/s.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CODES_FRAME_RATE = 25  # audio tokenizer: 24 kHz / hop 960
CODES_SAMPLE_RATE = 24000
CODES_HOP = 960
WHISPER_SAMPLE_RATE = 16000
ROLES = ("system", "user", "assistant")
DEFAULT_SYSTEM_PROMPT = "Generate audio following instruction."  # the official examples' prompt
FORMATS = ("chatml", "flat", "swift", "sharegpt", "folder")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
# flat voice-cloning records: each field is read from the first of its aliases present
FLAT_KEYS = {
    "audio": ("audio", "target_audio", "audio_path", "audio_filepath", "wav"),
    "text": ("text", "target_text", "transcript", "transcription", "sentence"),
    "ref_audio": ("ref_audio", "reference_audio", "ref_audio_path", "prompt_audio", "ref_wav"),
    "ref_text": ("ref_text", "reference_text", "prompt_text", "ref_transcript"),
    "speaker": ("speaker", "speaker_id", "spk"),
    "system": ("system", "system_prompt"),
}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
METADATA_HEADERS = ("file", "filename", "file_name", "path", "audio", "wav", "id")
FORMAT_HINT = ("supported: ChatML {\"messages\": [...]}, ms-swift {\"messages\", \"audios\"} with "
               "<audio> tags, ShareGPT {\"conversations\": [{\"from\", \"value\"}]}, flat "
               "{\"audio\", \"text\", \"ref_audio\", \"ref_text\"}, or a folder of NAME.wav + NAME.txt "
               "/ an LJSpeech metadata.csv (README 'Data'); force one with --format")
SPEAKING_RATE_FACTOR = 2.5  # flag targets this many times faster or slower than the median


class DataError(ValueError):
    """Bad input, with a message that names the file, the record, the field and the fix."""


@dataclass
class Invalid:
    """A record that cannot be used: its position, where it is, and the DataError message."""
    index: int
    source: str
    reason: str


# ----------------------------------------------------------------------------------------------
# Types


@dataclass
class TextPart:
    text: str
    type: str = "text"


@dataclass
class AudioPart:
    audio_url: str | None = None
    raw_audio: str | None = None  # base64-encoded audio file bytes
    offset: float | None = None
    duration: float | None = None
    type: str = "audio"


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
    source: str = "<memory>"  # "file:line (record i)" for error messages
    base_dir: str = "."  # relative audio paths resolve here
    index: int = 0  # position in its data set
    fields: dict = field(default_factory=dict)  # (message, part or None) -> the input's own name


@dataclass
class AudioSegment:
    """One audio part of a record, in order of appearance."""
    codes: torch.Tensor | None  # (K, T) int64
    waveform: torch.Tensor | None  # mono float32 at WHISPER_SAMPLE_RATE (Whisper path only)
    is_out: bool  # assistant audio (generated) vs system/user audio (audio-in)


@dataclass
class Sample:
    """One tokenized record: text tokens with placeholders, their labels, and its audio."""
    input_ids: torch.Tensor  # (S,) int64
    label_ids: torch.Tensor  # (S,) int64, -100 = not supervised
    audios: list[AudioSegment] = field(default_factory=list)
    source: str = "<memory>"


def field_name(record: Record, i: int, j: int | None = None) -> str:
    """How the user's input names message i (or its part j): a flat key, a clip's file or a chat
    path, so that errors point at what the user wrote rather than at the converted ChatML."""
    if (i, j) in record.fields:
        return record.fields[(i, j)]
    if j is None:
        return f"messages[{i}]"
    return f"messages[{i}].content" + (f"[{j}]" if len(record.messages[i].content) > 1 else "")


# ----------------------------------------------------------------------------------------------
# ChatML records


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
                                      or value < 0):
                raise DataError(f"{where}.{key} must be a number of seconds >= 0 or null, "
                                f"got {value!r}")
        return AudioPart(audio_url=url, raw_audio=raw, offset=obj.get("offset"),
                         duration=obj.get("duration"))
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


# ----------------------------------------------------------------------------------------------
# Input formats, each converted to ChatML


def cloning_record(ref_text: str, ref_audio: str, text: str, audio: str, speaker=None,
                   system: str = DEFAULT_SYSTEM_PROMPT) -> dict:
    """The official zero-shot voice-cloning layout (SPEC section 3): system prompt, reference
    transcript and audio as context, then the target text and the trained target audio."""
    audio_part = lambda url: {"type": "audio", "audio_url": url}  # noqa: E731
    return {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": ref_text},
                         {"role": "assistant", "content": audio_part(ref_audio)},
                         {"role": "user", "content": text},
                         {"role": "assistant", "content": audio_part(audio)}],
            "start_index": 4, "speaker": speaker}


def _cloning(ref_text, ref_audio, text, audio, speaker, system, labels) -> tuple[dict, dict]:
    """A cloning record and its field names (labels: system, ref text, ref audio, text, audio)."""
    return (cloning_record(ref_text, ref_audio, text, audio, speaker, system),
            {(i, 0): label for i, label in enumerate(labels)})


@dataclass
class Clip:
    """A transcribed audio file still waiting for its reference (flat records without one, folders)."""
    text: str
    audio: str  # path relative to the data's base folder
    speaker: str | None
    text_label: str  # how the input names the text and the audio, for error messages
    audio_label: str
    system: str = DEFAULT_SYSTEM_PROMPT
    system_label: str = "the default system prompt"


def _from_chatml(obj, where: str):
    if isinstance(obj, dict) and "audios" in obj:
        raise DataError(f"{where}: has \"audios\" (ms-swift <audio> tags) but the file is read as "
                        "ChatML; pass --format swift")
    return obj, {}


def _flat_field(obj: dict, name: str, where: str) -> tuple[str | None, str | None]:
    """(key, value) of the first alias of flat field `name` present, or (None, None)."""
    key = next((k for k in FLAT_KEYS[name] if obj.get(k) is not None), None)
    if key is None:
        return None, None
    value = obj[key]
    if name == "speaker" and isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: \"{key}\" must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: \"{key}\" is empty; fill it in or remove the key")
    return key, value


def _from_flat(obj, where: str):
    """A flat record: a cloning record when it names its reference, else a Clip to be paired."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record is a JSON object, got {type(obj).__name__}")
    (a_key, audio), (t_key, text), (ra_key, ref_audio), (rt_key, ref_text), (_, speaker), \
        (s_key, system) = (_flat_field(obj, name, where) for name in
                           ("audio", "text", "ref_audio", "ref_text", "speaker", "system"))
    if audio is None:
        raise DataError(f"{where}: no target audio; add \"audio\" (or one of "
                        f"{', '.join(FLAT_KEYS['audio'][1:])}), the path of the speech to learn")
    if text is None:
        raise DataError(f"{where}: no target text; add \"text\" (or one of "
                        f"{', '.join(FLAT_KEYS['text'][1:])}), the transcript of \"{a_key}\"")
    system_label = f"\"{s_key}\"" if s_key else "the default system prompt"
    system = system or DEFAULT_SYSTEM_PROMPT
    if ref_audio is None and ref_text is None:
        return Clip(text, audio, speaker, f"\"{t_key}\"", f"\"{a_key}\"", system, system_label)
    if ref_audio is None or ref_text is None:
        have, missing = ("ref_audio", "ref_text") if ref_text is None else ("ref_text", "ref_audio")
        raise DataError(f"{where}: has a {have} but no {missing}; the cloning prompt needs the "
                        "reference audio and its transcript (or drop both, and clips of the same "
                        "speaker are paired)")
    return _cloning(ref_text, ref_audio, text, audio, speaker, system,
                    (system_label, f"\"{rt_key}\"", f"\"{ra_key}\"", f"\"{t_key}\"", f"\"{a_key}\""))


def _from_tagged_chat(obj, where: str):
    """ms-swift {"messages": [{"role", "content"}], "audios": [...]} or ShareGPT {"conversations":
    [{"from", "value"}]}: each <audio> tag in a text takes the next path of "audios". Without a
    start_index only the final assistant turns are trained (the earlier ones are context, like the
    reference of the cloning layout)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record is a JSON object, got {type(obj).__name__}")
    key, role_key, text_key = ("conversations", "from", "value") if "conversations" in obj \
        else ("messages", "role", "content")
    turns, audios = obj.get(key), obj.get("audios", [])
    audios = [audios] if isinstance(audios, str) else audios
    if not isinstance(turns, list):
        raise DataError(f"{where}: \"{key}\" must be a list of turns")
    if not isinstance(audios, list) or not all(isinstance(a, str) and a for a in audios):
        raise DataError(f"{where}: \"audios\" must be a list of audio file paths")
    messages, fields, used = [], {}, 0
    if obj.get("system"):
        messages.append({"role": "system", "content": obj["system"]})
        fields.update({(0, None): "\"system\"", (0, 0): "\"system\""})
    for k, turn in enumerate(turns):
        label, i = f"{key}[{k}]", len(messages)
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise DataError(f"{where}: {label} must be an object with \"{role_key}\" and a string "
                            f"\"{text_key}\" (audio as <audio> tags)")
        role = SHAREGPT_ROLES.get(turn.get(role_key), turn.get(role_key))
        if role not in ROLES:
            raise DataError(f"{where}: {label}.{role_key} is {turn.get(role_key)!r}; use one of "
                            f"{', '.join(ROLES)} (ShareGPT: human, gpt)")
        pieces = re.split(r"\s*<audio>\s*", turn[text_key])
        content = []
        for n, piece in enumerate(pieces):
            if n > 0:
                if used == len(audios):
                    raise DataError(f"{where}: {label} has more <audio> tags than the {len(audios)} "
                                    "paths of \"audios\"; each tag takes the next path")
                fields[(i, len(content))] = f"audios[{used}]"
                content.append({"type": "audio", "audio_url": audios[used]})
                used += 1
            if piece or len(pieces) == 1:
                fields[(i, len(content))] = f"{label}.{text_key}"
                content.append({"type": "text", "text": piece})
        fields[(i, None)] = label
        messages.append({"role": role, "content": content})
    if used != len(audios):
        raise DataError(f"{where}: \"audios\" has {len(audios)} paths but the turns have {used} "
                        "<audio> tags; put one tag where each audio belongs")
    last_prompt = max((i for i, m in enumerate(messages) if m["role"] != "assistant"), default=-1)
    start = obj.get("start_index", last_prompt + 1)
    return {"messages": messages, "start_index": start, "speaker": obj.get("speaker")}, fields


CONVERTERS = {"chatml": _from_chatml, "flat": _from_flat, "swift": _from_tagged_chat,
              "sharegpt": _from_tagged_chat}


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; a data file is JSON, JSONL or a `file|text` list "
                        "(a folder of audio files is passed as the folder)")


def _read_json(path: str) -> list[tuple[str, object]]:
    """(source, object) per record of a JSON list, one JSON object, or JSONL; a JSONL line that is
    not JSON gets a DataError in place of its object, so the other lines still count."""
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: empty file, no records")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        error = DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")
        if text.lstrip().startswith("["):
            raise error
    else:
        if isinstance(whole, list):
            return [(f"{path}:{line} (record {i})", o)
                    for i, (o, line) in enumerate(zip(whole, _list_item_lines(text)))]
        if "\n" in text.strip():  # one multi-line object
            return [(f"{path}: record 0", whole)]
    out = []  # JSONL (one line parsed as a whole is JSONL too, so that errors name its line)
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        source = f"{path}:{lineno} (record {len(out)})"
        try:
            out.append((source, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((source, DataError(f"{source}: invalid JSON at column {e.colno}: {e.msg}; "
                                          "a JSONL file holds one JSON object per line")))
    if all(isinstance(o, DataError) for _, o in out):
        raise error
    return out


def _list_item_lines(text: str) -> list[int]:
    """The line on which each element of a (valid) top-level JSON list starts."""
    decoder, i, line, lines = json.JSONDecoder(), text.index("[") + 1, 1, []
    line += text.count("\n", 0, i)
    while True:
        j = i
        while text[j] in " \t\r\n,":
            j += 1
        if text[j] == "]":
            return lines
        line += text.count("\n", i, j)
        lines.append(line)
        _, i = decoder.raw_decode(text, j)
        line += text.count("\n", j, i)


def _is_swift(obj: dict) -> bool:
    turns = obj.get("messages") if isinstance(obj.get("messages"), list) else []
    return "audios" in obj or any(isinstance(t, dict) and isinstance(t.get("content"), str)
                                  and "<audio>" in t["content"] for t in turns)


def _detect(path: str, objs: list) -> str:
    """A JSON file's format, from its first record's keys (a "messages" file is ms-swift when any
    record has "audios" or <audio> tags)."""
    dicts = [o for _, o in objs if isinstance(o, dict)]
    if not dicts:
        raise DataError(f"{path}: unknown format, no record is a JSON object; {FORMAT_HINT}")
    first = dicts[0]
    if "conversations" in first:
        return "sharegpt"
    if "messages" in first:
        return "swift" if any(_is_swift(o) for o in dicts) else "chatml"
    if first.keys() & {k for keys in FLAT_KEYS.values() for k in keys}:
        return "flat"
    raise DataError(f"{path}: unknown format, the first record has keys {sorted(first)}; {FORMAT_HINT}")


def _metadata_clips(csv_path: str, root: str, speaker: str, listed: set, out: list) -> None:
    """Clips of a `file|text` list (LJSpeech: `id|text|normalized text`, audio in wavs/ID.wav or
    ID.wav; the last non-empty text column is used), appended to `out`."""
    folder = os.path.dirname(csv_path)
    for lineno, line in enumerate(_read_text(csv_path).split("\n"), 1):
        cols = [c.strip() for c in line.split("|")]
        if not line.strip() or (lineno == 1 and cols[0].lower() in METADATA_HEADERS):
            continue
        source = f"{csv_path}:{lineno} (record {len(out)})"
        text = next((c for c in reversed(cols[1:]) if c), "")
        if not text:
            out.append((source, DataError(f"{source}: expected `FILE|TEXT` (a transcript after a "
                                          "`|`); write the transcript or remove the line")))
            continue
        names = [cols[0]] if os.path.splitext(cols[0])[1] else \
            [os.path.join("wavs", cols[0] + ".wav"), cols[0] + ".wav"]
        name = next((n for n in names if os.path.isfile(os.path.join(folder, n))), names[0])
        path = os.path.normpath(os.path.join(folder, name))
        listed.add(path)
        out.append((source, Clip(text, os.path.relpath(path, root), speaker,
                                 f"the text of {os.path.basename(csv_path)}:{lineno}", name)))


def _folder_clips(path: str) -> tuple[str, list]:
    """(base folder, [(source, Clip | DataError)]) of a folder of NAME.wav + NAME.txt pairs and
    metadata.csv lists, or of one `file|text` list. The speaker is the top-level subfolder, or the
    folder's own name for clips directly in it."""
    out, listed = [], set()
    if os.path.isfile(path):
        root = os.path.dirname(os.path.abspath(path))
        _metadata_clips(path, root, os.path.basename(root), listed, out)
        return root, out
    root = os.path.normpath(path)
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        rel = os.path.relpath(folder, root)
        speaker = os.path.basename(os.path.abspath(root)) if rel == "." else rel.split(os.sep)[0]
        if "metadata.csv" in files:
            _metadata_clips(os.path.join(folder, "metadata.csv"), root, speaker, listed, out)
        for name in sorted(files):
            audio = os.path.join(folder, name)
            stem, ext = os.path.splitext(name)
            if ext.lower() not in AUDIO_EXTENSIONS or os.path.normpath(audio) in listed:
                continue
            source, txt = f"{audio} (record {len(out)})", os.path.join(folder, stem + ".txt")
            try:
                if not os.path.isfile(txt):
                    raise DataError(f"{source}: no transcript {stem}.txt next to it; write it (the "
                                    "words spoken) or remove the audio")
                text = _read_text(txt).strip()
                if not text:
                    raise DataError(f"{source}: {txt} is empty; write the transcript")
                out.append((source, Clip(text, os.path.relpath(audio, root), speaker, stem + ".txt",
                                         name)))
            except DataError as e:
                out.append((source, e))
    if not out:
        raise DataError(f"{root}: no audio clips found; a data folder holds NAME.wav + NAME.txt pairs "
                        "(one subfolder per speaker) or an LJSpeech metadata.csv, and a JSON/JSONL "
                        "data file is passed as the file itself")
    return os.path.abspath(root), out


def _pair_clips(items: list) -> list:
    """Each Clip becomes the target of a cloning record whose reference is the next clip of the
    same speaker (in input order, wrapping round): a different recording of the same voice."""
    speakers: dict = {}
    for n, (_, payload) in enumerate(items):
        if isinstance(payload, Clip):
            speakers.setdefault(payload.speaker, []).append(n)
    out = list(items)
    for members in speakers.values():
        for k, n in enumerate(members):
            source, clip = items[n]
            if len(members) == 1:
                who = f"speaker {clip.speaker!r}" if clip.speaker else "this data set"
                out[n] = (source, DataError(
                    f"{source}: {who} has no other clip to use as the voice reference; add another "
                    "clip of this speaker, or give the record a ref_audio and ref_text"))
                continue
            ref_source, ref = items[members[(k + 1) % len(members)]]
            out[n] = (source, _cloning(
                ref.text, ref.audio, clip.text, clip.audio, clip.speaker, clip.system,
                (clip.system_label, f"reference {ref.text_label} from {ref_source}",
                 f"reference {ref.audio_label} from {ref_source}", clip.text_label, clip.audio_label)))
    return out


def read_records(path: str, fmt: str = "auto") -> tuple[list[Record], list[Invalid], str]:
    """(records, invalid records, format) of a data file or folder in any supported format,
    converted to ChatML. A record that cannot be converted is returned as Invalid; input that
    cannot be read at all (missing, not text, not JSON, unknown format) raises DataError."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown --format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    if os.path.isdir(path) or fmt == "folder" or (fmt == "auto" and path.lower().endswith(".csv")):
        if fmt not in ("auto", "folder"):
            raise DataError(f"{path}: --format {fmt} reads a JSON or JSONL file, not a folder or list")
        base_dir, items = _folder_clips(path)
        fmt = "folder"
    else:
        base_dir = os.path.dirname(os.path.abspath(path))
        objs = _read_json(path)
        fmt = _detect(path, objs) if fmt == "auto" else fmt
        items = []
        for source, obj in objs:
            try:
                if isinstance(obj, DataError):
                    raise obj
                items.append((source, CONVERTERS[fmt](obj, source)))
            except DataError as e:
                items.append((source, e))
    records, invalid = [], []
    for index, (source, payload) in enumerate(_pair_clips(items)):
        try:
            if isinstance(payload, DataError):
                raise payload
            obj, fields = payload
            record = record_from_json(obj, source, base_dir)
            record.index, record.fields = index, fields
            records.append(record)
        except DataError as e:
            invalid.append(Invalid(index, source, str(e)))
    return records, invalid, fmt


def invalid_summary(path: str, invalid: list[Invalid], total: int) -> str:
    return "\n".join([f"{path}: {len(invalid)} of {total} records are invalid:"] +
                     [f"  {x.reason}" for x in invalid])


def load_records(path: str, fmt: str = "auto") -> list[Record]:
    """Every record of a data file or folder; any record that cannot be read is an error."""
    records, invalid, _ = read_records(path, fmt)
    if invalid:
        raise DataError(invalid_summary(path, invalid, len(records) + len(invalid)))
    return records


# ----------------------------------------------------------------------------------------------
# Tokenization (mirror of boson_multimodal.dataset.chatml_dataset.prepare_chatml_sample)


def tokenize_record(record: Record, tokenizer) -> tuple[list[int], list[int], list[tuple[AudioPart, bool]]]:
    """(input ids, label ids, [(audio part, is_out)]). Each piece is encoded on its own with
    add_special_tokens=False, exactly as the official code does."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    inputs, labels, audios = [], [], []
    n = len(record.messages)
    for turn, msg in enumerate(record.messages):
        trained = record.start_index is None or turn >= record.start_index
        prefix = ("<|begin_of_text|>" if turn == 0 else "") + \
            f"<|start_header_id|>{msg.role}<|end_header_id|>\n\n"
        ids = enc(prefix)
        inputs += ids
        labels += [-100] * len(ids)
        if msg.recipient:
            ids = enc(f"{msg.recipient}<|recipient|>")
            inputs += ids
            labels += ids  # official quirk: recipient tokens are always labelled
        for part in msg.content:
            if isinstance(part, TextPart):
                ids = enc(part.text)
                supervised = msg.role == "assistant" and trained
            else:
                is_out = msg.role == "assistant"
                audios.append((part, is_out))
                ids = enc("<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>" if is_out
                          else "<|audio_bos|><|AUDIO|><|audio_eos|>")
                supervised = is_out and trained
            inputs += ids
            labels += ids if supervised else [-100] * len(ids)
        next_is_assistant = turn + 1 < n and record.messages[turn + 1].role == "assistant"
        ids = enc("<|eom_id|>" if msg.role == "assistant" and next_is_assistant else "<|eot_id|>")
        inputs += ids
        labels += ids if msg.role == "assistant" and trained else [-100] * len(ids)
    return inputs, labels, audios


# ----------------------------------------------------------------------------------------------
# Audio and codes


def codes_path(audio_path: str) -> str:
    return os.path.splitext(audio_path)[0] + ".codes.npy"


def resolve_audio_path(part: AudioPart, base_dir: str) -> str:
    return part.audio_url if os.path.isabs(part.audio_url) else os.path.join(base_dir, part.audio_url)


def expected_frames(num_samples: int, sample_rate: int) -> int:
    """Frames the Higgs-Audio v2 audio tokenizer gives for audio of `num_samples` at `sample_rate`:
    of n samples at 24 kHz (torchaudio's resampled length), ceil(n / 960), except floor(n / 960)
    when n mod 960 is 1..118 (measured, see demo/make_demo.py)."""
    n = -(-num_samples * CODES_SAMPLE_RATE // sample_rate)
    return n // CODES_HOP if 1 <= n % CODES_HOP <= 118 else -(-n // CODES_HOP)


def _window(part: AudioPart, rate: float, round_stop=round) -> slice:
    """The part's offset/duration window, in frames at `rate` per second."""
    start = int(round((part.offset or 0.0) * rate))
    stop = None if part.duration is None else start + int(round_stop(part.duration * rate))
    return slice(start, stop)


def _audio_source(part: AudioPart, base_dir: str, where: str):
    """(what soundfile reads, label for messages): the audio file, or the raw_audio bytes."""
    if part.raw_audio:
        try:
            return io.BytesIO(base64.b64decode(part.raw_audio, validate=True)), "raw_audio"
        except ValueError as e:
            raise DataError(f"{where}: raw_audio is not base64 ({e}); put the base64 of the audio "
                            "file's bytes there, or save the audio to a file and use audio_url")
    path = resolve_audio_path(part, base_dir)
    if not os.path.isfile(path):
        start = "" if os.path.isabs(part.audio_url) else f" (relative paths start at {base_dir})"
        raise DataError(f"{where}: audio file {path} not found; fix the path{start} or add the file")
    return path, path


def audio_info(part: AudioPart, base_dir: str, where: str):
    """soundfile's header info of the part's audio (rate, channels, frames), without decoding."""
    source, label = _audio_source(part, base_dir, where)
    try:
        info = sf.info(source)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise DataError(f"{where}: cannot read audio {label}: {e}; convert it to WAV or FLAC")
    if info.frames <= 0:
        raise DataError(f"{where}: audio {label} is empty (no samples); re-export it or remove "
                        "the record")
    return info


def read_codes(part: AudioPart, base_dir: str, num_codebooks: int, codebook_size: int,
               where: str) -> np.ndarray:
    """The part's whole `<stem>.codes.npy` sidecar, checked: integers (>= num_codebooks, T), the
    first num_codebooks rows in [0, codebook_size)."""
    if part.audio_url is None:
        raise DataError(f"{where}: audio given as raw_audio has no codes sidecar; save it to a "
                        "file, reference it with audio_url and run `python data.py prepare`")
    path = codes_path(resolve_audio_path(part, base_dir))
    if not os.path.isfile(path):
        raise DataError(f"{where}: audio codes {path} not found for {part.audio_url}; create them "
                        "with `python data.py prepare DATA --tokenizer AUDIO_TOKENIZER_DIR` (DATA: "
                        "this data file or folder)")
    try:
        codes = np.load(path)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{where}: cannot read codes {path}: {e}; delete it and rerun "
                        "`python data.py prepare`")
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise DataError(f"{where}: codes {path} must be an integer array (num_codebooks, T), got "
                        f"{codes.dtype} {codes.shape}; delete it and rerun `python data.py prepare`")
    if codes.shape[0] < num_codebooks:
        raise DataError(f"{where}: codes {path} have {codes.shape[0]} codebooks, the model needs "
                        f"{num_codebooks}; re-encode with the model's audio tokenizer")
    used = codes[:num_codebooks]
    if used.size and (used.min() < 0 or used.max() >= codebook_size):
        raise DataError(f"{where}: codes {path} hold values in [{used.min()}, {used.max()}], outside "
                        f"[0, {codebook_size}); re-encode with the model's audio tokenizer")
    return codes


def load_codes(part: AudioPart, base_dir: str, num_codebooks: int, codebook_size: int,
               where: str) -> torch.Tensor:
    """(K, T) codes from the `<stem>.codes.npy` sidecar, cut to the part's offset/duration."""
    codes = read_codes(part, base_dir, num_codebooks, codebook_size, where)
    codes = codes[:num_codebooks, _window(part, CODES_FRAME_RATE, math.ceil)]
    if codes.shape[1] == 0:
        raise DataError(f"{where}: codes of {part.audio_url} are empty; the audio (or its "
                        "offset/duration window) has no frames")
    return torch.from_numpy(np.ascontiguousarray(codes)).long()


def load_audio(part: AudioPart, base_dir: str, sample_rate: int, where: str) -> torch.Tensor:
    """Mono float32 waveform at `sample_rate` (soundfile decode, channel mean, torchaudio resample)."""
    import torchaudio.functional as AF

    source, label = _audio_source(part, base_dir, where)
    try:
        data, sr = sf.read(source, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{where}: cannot decode audio {label}: {e}; convert it to WAV or FLAC")
    data = data[_window(part, sr)]
    if len(data) == 0:
        raise DataError(f"{where}: audio {label} is empty (or its offset/duration window is)")
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    return AF.resample(wav, sr, sample_rate) if sr != sample_rate else wav


# ----------------------------------------------------------------------------------------------
# Sample


def check_special_tokens(tokenizer, cfg) -> None:
    """The placeholder ids the collator expands must be the tokenizer's own."""
    for token, want in (("<|AUDIO|>", cfg.audio_in_token_id), ("<|AUDIO_OUT|>", cfg.audio_out_token_id)):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != want:
            raise DataError(f"tokenizer maps {token} to {got} but the model config says {want}: "
                            "load the tokenizer that belongs to the checkpoint")


def make_sample(record: Record, tokenizer, cfg) -> Sample:
    """Tokenize a record and load its audio codes (and waveforms when the model uses Whisper)."""
    inputs, labels, audio_parts = tokenize_record(record, tokenizer)
    audios = []
    for i, (part, is_out) in enumerate(audio_parts):
        where = f"{record.source}: audio {i} ({part.audio_url or 'raw_audio'})"
        needs_codes = is_out or cfg.encode_audio_in_tokens
        codes = load_codes(part, record.base_dir, cfg.audio_num_codebooks, cfg.audio_codebook_size,
                           where) if needs_codes else None
        wav = load_audio(part, record.base_dir, WHISPER_SAMPLE_RATE, where) \
            if (not is_out and cfg.uses_whisper) else None
        audios.append(AudioSegment(codes, wav, is_out))
    return Sample(torch.tensor(inputs, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                  audios, record.source)


def expanded_length(sample: Sample, cfg) -> int:
    """Positions the collator gives `sample` (collate.Collator._expand), from its token ids, code
    lengths and Whisper waveform lengths, without collating: each audio placeholder becomes its
    codes with stream BOS/EOS (T + 2, plus K - 1 with the delay pattern); Whisper audio-in becomes
    the tower states of each 30 s chunk (with its codes), each extra chunk repeating
    <|audio_eos|><|audio_bos|>. For length checks and length-aware batching."""
    from collate import WHISPER_CHUNK_SECONDS, Collator

    wrap = 2 + (cfg.audio_num_codebooks - 1 if cfg.use_delay_pattern else 0)
    chunk = WHISPER_CHUNK_SECONDS * WHISPER_SAMPLE_RATE
    frames = WHISPER_CHUNK_SECONDS * CODES_FRAME_RATE  # codes per chunk
    n = len(sample.input_ids)
    for seg in sample.audios:
        if seg.is_out or (cfg.encode_audio_in_tokens and not cfg.uses_whisper):
            n += seg.codes.shape[1] + wrap - 1
        elif cfg.uses_whisper:
            starts = range(0, len(seg.waveform), chunk)
            n += 2 * (len(starts) - 1) - 1
            for c, s in enumerate(starts):
                n += Collator._whisper_states(min(chunk, len(seg.waveform) - s))
                t = seg.codes[:, c * frames:(c + 1) * frames].shape[1] if seg.codes is not None else 0
                n += t + wrap if t else 0
    return n


def load_tokenizer(ckpt_dir: str):
    """The checkpoint's text tokenizer (a fast tokenizer: tokenizer.json + its config)."""
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(os.path.join(ckpt_dir, "tokenizer.json")):
        raise DataError(f"{ckpt_dir}/tokenizer.json not found: the checkpoint folder must carry "
                        "its text tokenizer (copy tokenizer.json and tokenizer_config.json there)")
    return PreTrainedTokenizerFast.from_pretrained(ckpt_dir)


# ----------------------------------------------------------------------------------------------
# Validation, shared by `python data.py check` and training


@dataclass
class Checked:
    """A valid record and what the report needs; `sample` and `length` when a tokenizer was given."""
    record: Record
    target_seconds: float = 0.0
    target_chars: int | None = None  # text of the single target, for its speaking rate
    audio: dict = field(default_factory=dict)  # audio file -> soundfile info
    sample: Sample | None = None
    length: int | None = None


def _check_audio(part: AudioPart, record: Record, where: str, cfg, needs_codes: bool,
                 cache: dict, checked: Checked) -> float:
    """Seconds in the part's window; raises if its audio is missing, unreadable or empty, or (when
    the model needs codes) its sidecar is missing, malformed, or does not match the audio length."""
    key = None if part.raw_audio else resolve_audio_path(part, record.base_dir)
    info = cache.get(key) or audio_info(part, record.base_dir, where)
    if key:
        cache[key] = checked.audio[key] = info
    window = _window(part, info.samplerate)
    seconds = len(range(info.frames)[window]) / info.samplerate
    if seconds == 0:
        raise DataError(f"{where}: the offset/duration window ({part.offset}, {part.duration}) "
                        f"holds no audio of the {info.frames / info.samplerate:.2f} s file; fix "
                        "offset/duration")
    if needs_codes and (key, "codes") not in cache:
        codes = read_codes(part, record.base_dir, cfg.audio_num_codebooks, cfg.audio_codebook_size,
                           where)
        want = expected_frames(info.frames, info.samplerate)
        if abs(codes.shape[1] - want) > 1:
            raise DataError(f"{where}: codes {codes_path(key)} have {codes.shape[1]} frames but "
                            f"the audio ({info.frames / info.samplerate:.2f} s) gives {want} at 25 "
                            "frames/s: the sidecar belongs to another file or an older version of "
                            "it; delete it and rerun `python data.py prepare`")
        cache[(key, "codes")] = True
    return seconds


def check_record(record: Record, cfg, cache: dict | None = None,
                 require_audio: bool = True) -> Checked:
    """Everything about a record that needs no text tokenizer: role order, empty text, a trained
    assistant turn (with audio, for training data: `require_audio`), audio files and (as `cfg`
    needs them) their codes sidecars. `cache` shares per-file results between the records."""
    cache = {} if cache is None else cache
    src, msgs, start = record.source, record.messages, record.start_index
    if not msgs:
        raise DataError(f"{src}: \"messages\" is empty; a record needs a user turn and an assistant "
                        "audio turn")
    for i, m in enumerate(msgs):
        if m.role == "system" and i > 0:
            raise DataError(f"{src}: {field_name(record, i)} is a system message after the first "
                            "turn; a system prompt can only come first: move it there or make it a "
                            "user turn")
    first = int(msgs[0].role == "system")
    if first < len(msgs) and msgs[first].role != "user":
        raise DataError(f"{src}: {field_name(record, first)} is an {msgs[first].role} turn where the "
                        "conversation must start with a user turn (after the optional system "
                        "prompt); in the cloning layout it is the reference transcript")
    for i, m in enumerate(msgs):
        if not m.content:
            raise DataError(f"{src}: {field_name(record, i)} has no content; write its text or "
                            "audio, or remove it")
        for j, p in enumerate(m.content):
            if isinstance(p, TextPart) and not p.text.strip():
                raise DataError(f"{src}: {field_name(record, i, j)} is empty text; write the text "
                                "(for a turn before audio: its transcript) or remove it")
    trained = [i for i, m in enumerate(msgs) if m.role == "assistant" and (start is None or i >= start)]
    if not trained:
        after = "" if start is None else f" at or after start_index {start} (of {len(msgs)} messages)"
        raise DataError(f"{src}: no trainable assistant audio or text (what the old pipeline "
                        f"called \"Missing required message types\"): no assistant message{after}, "
                        "so there is nothing to learn; make the target speech an assistant audio "
                        "part" + (", or lower start_index" if start else ""))
    targets = [(i, j) for i in trained for j, p in enumerate(msgs[i].content)
               if isinstance(p, AudioPart)]
    if require_audio and not targets:
        raise DataError(f"{src}: no trainable assistant audio (what the old pipeline called "
                        f"\"Missing required message types\"): the trained assistant turn"
                        f"{'s' if len(trained) > 1 else ''} {', '.join(f'messages[{i}]' for i in trained)} "
                        "hold only text, so there is no voice to learn; add the target speech as "
                        "an assistant audio part (text-only records are accepted by --eval_only "
                        "and by `data.py check --allow_text_only`)")
    checked = Checked(record)
    for i, m in enumerate(msgs):
        for j, p in enumerate(m.content):
            if isinstance(p, AudioPart):
                needs_codes = m.role == "assistant" or cfg.encode_audio_in_tokens
                seconds = _check_audio(p, record, f"{src}: {field_name(record, i, j)}", cfg,
                                       needs_codes, cache, checked)
                checked.target_seconds += seconds if (i, j) in targets else 0.0
    prev = msgs[targets[0][0] - 1] if len(targets) == 1 else None  # a user turn precedes a target
    if prev and prev.role == "user" and all(isinstance(p, TextPart) for p in prev.content):
        checked.target_chars = sum(len(p.text.strip()) for p in prev.content)
    return checked


def validate(records: list[Record], cfg, tokenizer=None, max_seq_len: int | None = None,
             require_audio: bool = True) -> tuple[list[Checked], list[Invalid]]:
    """Every record checked, the failures returned with their reasons instead of raised. With a
    tokenizer each record is also made into a Sample whose expanded length must fit max_seq_len."""
    cache, checked, invalid = {}, [], []
    for r in records:
        try:
            c = check_record(r, cfg, cache, require_audio)
            if tokenizer is not None:
                c.sample = make_sample(r, tokenizer, cfg)
                c.length = expanded_length(c.sample, cfg)
                if max_seq_len and c.length > max_seq_len:
                    raise DataError(f"{r.source}: {c.length} positions after audio expansion, more "
                                    f"than --max_seq_len {max_seq_len}; split its audio into shorter "
                                    "clips, or raise --max_seq_len if the GPU memory allows")
            checked.append(c)
        except DataError as e:
            invalid.append(Invalid(r.index, r.source, str(e)))
    return checked, invalid


def load_dataset(path: str, tokenizer, cfg, max_seq_len: int | None = None, fmt: str = "auto",
                 require_audio: bool = True) -> tuple[list[Sample], list[Invalid]]:
    """Samples of the valid records of a data file or folder, and the invalid ones with reasons."""
    records, invalid, _ = read_records(path, fmt)
    checked, bad = validate(records, cfg, tokenizer, max_seq_len, require_audio)
    return [c.sample for c in checked], sorted(invalid + bad, key=lambda x: x.index)


# ----------------------------------------------------------------------------------------------
# python data.py check


def model_spec(model: str):
    """(text tokenizer, HiggsConfig) of a checkpoint folder, or of `tiny` (the demo tokenizer)."""
    from model import HiggsConfig

    if model == "tiny":
        tokenizer, cfg = load_tokenizer(os.path.join(HERE, "demo", "tokenizer")), HiggsConfig.tiny()
    else:
        try:
            cfg = HiggsConfig.from_checkpoint(model)
        except (KeyError, TypeError) as e:
            raise DataError(f"{model}/config.json is not a Higgs-Audio config (no {e})")
        tokenizer = load_tokenizer(model)
    check_special_tokens(tokenizer, cfg)
    return tokenizer, cfg


def _sidecar_spec(records: list[Record]):
    """(config, Counter of codebook counts) for checks without --model: the released shape with
    the codebook count most sidecars have; the other counts are reported."""
    from model import HiggsConfig

    paths = {codes_path(resolve_audio_path(p, r.base_dir)) for r in records for m in r.messages
             for p in m.content if isinstance(p, AudioPart) and p.audio_url}
    counts = Counter()
    for path in paths:
        try:
            counts[np.load(path, mmap_mode="r").shape[0]] += 1
        except Exception:  # noqa: BLE001 - missing or unreadable sidecars are reported by validation
            continue
    return HiggsConfig(audio_num_codebooks=counts.most_common(1)[0][0] if counts else 8), counts


def _audio_problem(path: str, info) -> str | None:
    """Why a (readable) audio file looks wrong: low sample rate, undecodable, near-silent, clipped."""
    if info.samplerate < 16000:
        return f"{info.samplerate} Hz: band-limited speech, the model would learn its muffled sound"
    try:
        data, _ = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001
        return f"cannot be decoded beyond its header ({e}); re-export it"
    peak = float(np.abs(data).max())
    if peak < 0.01:
        return f"near-silent (peak {peak:.4f} of full scale): an empty or wrong recording?"
    clipped = float((np.abs(data) >= 0.999).mean())
    if clipped > 0.001:
        return f"clipped ({100 * clipped:.1f}% of samples at full scale)"
    return None


def _flags(checked: list[Checked], rates: list, median: float) -> list[str]:
    """Valid but suspicious records: text-only targets, a target speaking far faster or slower
    than the data set's median (usually a wrong transcript or a wrong file), odd audio files."""
    flags = [f"{c.record.source}: trains text only, no assistant audio to learn the voice from"
             for c in checked if not c.target_seconds]
    low, high = median / SPEAKING_RATE_FACTOR, median * SPEAKING_RATE_FACTOR
    flags += [f"{c.record.source}: speaking rate {r:.1f} characters/s, {r / median:.1f}x the "
              f"median {median:.1f}: wrong transcript or wrong audio file?" for c, r in rates
              if len(rates) >= 5 and not low <= r <= high]
    used_by = {}
    for c in checked:
        for path, info in c.audio.items():
            used_by.setdefault(path, (c.record.source, info))
    for path, (source, info) in used_by.items():
        problem = _audio_problem(path, info)
        if problem:
            flags.append(f"{path} (used by {source}): {problem}")
    return flags


def check(path: str, model: str | None = None, fmt: str = "auto", max_seq_len: int = 4096,
          allow_text_only: bool = False) -> int:
    """`python data.py check`: validate everything training would, print a report, and return the
    exit code (0 all valid, 1 some records invalid)."""
    records, invalid, fmt = read_records(path, fmt)
    if model:
        (tokenizer, cfg), counts = model_spec(model), Counter()
    else:
        tokenizer, (cfg, counts) = None, _sidecar_spec(records)
    checked, bad = validate(records, cfg, tokenizer, max_seq_len, not allow_text_only)
    invalid = sorted(invalid + bad, key=lambda x: x.index)
    print(f"{path}: {fmt} format, {len(checked) + len(invalid)} records: {len(checked)} valid, "
          f"{len(invalid)} invalid")
    speakers = Counter(c.record.speaker or "(unnamed)" for c in checked)
    print(f"speakers: {len(speakers)} (" + ", ".join(f"{s}: {n}" for s, n in speakers.most_common(10))
          + (", ..." if len(speakers) > 10 else "") + ")")
    seconds = sum(c.target_seconds for c in checked)
    print(f"target audio: {seconds / 3600:.2f} h ({seconds:.1f} s)")
    files = {f: info for c in checked for f, info in c.audio.items()}
    rates = Counter(info.samplerate for info in files.values())
    print(f"audio files: {len(files)} (" + ", ".join(f"{r} Hz: {n}" for r, n in sorted(rates.items()))
          + f"; {sum(info.channels > 1 for info in files.values())} multi-channel, mixed down to mono; "
          "the audio tokenizer reads 24 kHz, prepare resamples)")
    print(f"codes: {cfg.audio_num_codebooks} codebooks of {cfg.audio_codebook_size} values, checked "
          + (f"against --model {model}" if model else "against the most common codebook count of the "
             "sidecars (pass --model CKPT to check against a checkpoint)"))
    if len(counts) > 1:
        print("  sidecars disagree on the codebook count: " +
              ", ".join(f"{k} codebooks: {n} files" for k, n in sorted(counts.items())))
    if tokenizer is None:
        print("sequence length: not checked (pass --model CKPT, or tiny, to tokenize)")
    elif checked:
        n = np.array([c.length for c in checked])
        print(f"sequence length after audio expansion: min {n.min()}, median {np.median(n):.0f}, "
              f"p95 {np.percentile(n, 95):.0f}, max {n.max()} (--max_seq_len {max_seq_len})")
    rates = [(c, c.target_chars / c.target_seconds) for c in checked if c.target_chars]
    median = float(np.median([r for _, r in rates])) if rates else 0.0
    if rates:
        print(f"speaking rate of targets: median {median:.1f} text characters per second of audio "
              f"({min(r for _, r in rates):.1f} to {max(r for _, r in rates):.1f})")
    flags = _flags(checked, rates, median)
    if flags:
        print(f"flagged ({len(flags)}; kept, but worth a look):")
        print("\n".join(f"  {f}" for f in flags))
    if invalid:
        print(f"invalid ({len(invalid)}; training stops on them, or drops them with --skip_invalid):")
        print("\n".join(f"  {x.reason}" for x in invalid))
    return 1 if invalid else 0


# ----------------------------------------------------------------------------------------------
# python data.py prepare


def load_audio_tokenizer(path: str, device: str):
    """transformers' HiggsAudioV2TokenizerModel from a `save_pretrained` folder, in eval mode."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DataError(f"{path}/config.json not found: --tokenizer is a folder holding a transformers "
                        "HiggsAudioV2TokenizerModel (config.json + model.safetensors)")
    from transformers import HiggsAudioV2TokenizerModel

    model = HiggsAudioV2TokenizerModel.from_pretrained(path).eval().to(device)
    c = model.config
    if (c.sample_rate, c.hop_length) != (CODES_SAMPLE_RATE, CODES_HOP):
        raise DataError(f"{path}: a {c.sample_rate} Hz tokenizer with hop {c.hop_length}; Higgs-"
                        f"Audio v2 codes come from the {CODES_SAMPLE_RATE} Hz, hop {CODES_HOP} one "
                        "(25 frames/s)")
    return model


def _sidecar_ok(audio: str, info, num_codebooks: int, codebook_size: int) -> bool:
    """Whether `audio` already has codes this tokenizer would write (kept by a resumed prepare)."""
    try:
        codes = read_codes(AudioPart(audio), "", num_codebooks, codebook_size, audio)
    except DataError:
        return False
    return codes.shape[0] == num_codebooks and \
        abs(codes.shape[1] - expected_frames(info.frames, info.samplerate)) <= 1


def _equal_length_batches(files: list[str], sample_rate: int, batch_size: int, failed: list):
    """Decoded clips (path, waveform) in batches of equal length: the tokenizer takes no padding
    mask (its HuBERT attends over the whole input), so padding would change the codes."""
    batch = []
    for path in files:
        try:
            wav = load_audio(AudioPart(path), "", sample_rate, path)
        except DataError as e:
            failed.append(str(e))
            continue
        if batch and (len(wav) != len(batch[0][1]) or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append((path, wav))
    if batch:
        yield batch


def save_codes(path: str, codes: np.ndarray) -> None:
    """Write a sidecar whole or not at all (an interrupted prepare leaves no truncated file)."""
    with open(path + ".tmp", "wb") as f:
        np.save(f, codes.astype(np.int16 if codes.max(initial=0) < 2 ** 15 else np.int32))
    os.replace(path + ".tmp", path)


@torch.no_grad()
def prepare(path: str, tokenizer_dir: str, fmt: str = "auto", device: str = "auto",
            batch_size: int = 16, write_chatml: bool = False) -> int:
    """`python data.py prepare`: encode every audio file the records use with the audio tokenizer
    and write its `.codes.npy` sidecar; valid sidecars are kept, so a rerun resumes. Returns the
    exit code (0 done, 1 some records or files failed)."""
    records, invalid, fmt = read_records(path, fmt)
    for x in invalid:
        print(f"skipped: {x.reason}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model = load_audio_tokenizer(tokenizer_dir, device)
    K, size = model.config.num_quantizers, model.config.codebook_size
    files = sorted({resolve_audio_path(p, r.base_dir) for r in records for m in r.messages
                    for p in m.content if isinstance(p, AudioPart) and p.audio_url})
    todo, failed = [], []
    for f in files:
        try:
            info = audio_info(AudioPart(f), "", f)
            if _sidecar_ok(f, info, K, size):
                continue
            if expected_frames(info.frames, info.samplerate) == 0:
                raise DataError(f"{f}: {info.frames / info.samplerate * 1000:.1f} ms is shorter than "
                                "one 40 ms frame of codes; remove it or use a longer clip")
            todo.append((-(-info.frames * CODES_SAMPLE_RATE // info.samplerate), f))
        except DataError as e:
            failed.append(str(e))
    print(f"prepare: {len(files)} audio files, {len(files) - len(todo) - len(failed)} with valid "
          f"codes already, {len(todo)} to encode on {device}")
    t0, last, done = time.time(), 0.0, 0
    by_length = [f for _, f in sorted(todo)]
    for batch in _equal_length_batches(by_length, CODES_SAMPLE_RATE, batch_size, failed):
        try:
            codes = model.encode(torch.stack([w for _, w in batch])[:, None].to(device),
                                 return_dict=False).cpu().numpy()
        except RuntimeError as e:  # e.g. out of memory on a very long file
            failed += [f"{f}: the audio tokenizer failed: {e}" for f, _ in batch]
            continue
        for (f, wav), c in zip(batch, codes):
            want = expected_frames(len(wav), CODES_SAMPLE_RATE)
            if abs(c.shape[1] - want) > 1:
                raise DataError(f"{tokenizer_dir}: encoded {f} to {c.shape[1]} frames, expected {want} "
                                "at 25 frames/s; is it a Higgs-Audio v2 audio tokenizer?")
            save_codes(codes_path(f), c)
        done += len(batch)
        if time.time() - last > 1 or done == len(todo):
            last, rate = time.time(), done / max(time.time() - t0, 1e-9)
            print(f"\rencoded {done}/{len(todo)} files, {rate:.1f} files/s, "
                  f"{(len(todo) - done) / rate:.0f} s left   ", end="", file=sys.stderr, flush=True)
    if todo:
        print(file=sys.stderr)
    if write_chatml:
        base = os.path.normpath(path)
        out = (base if os.path.isdir(path) else os.path.splitext(base)[0]) + ".chatml.jsonl"
        with open(out, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(record_to_json(r, os.path.dirname(os.path.abspath(out))),
                                   ensure_ascii=False) + "\n")
        print(f"wrote {out} ({len(records)} ChatML records)")
    for reason in failed:
        print(f"failed: {reason}")
    print(f"prepare: {done} encoded, {len(failed)} failed, {len(invalid)} records skipped")
    return 1 if failed or invalid else 0


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a data file or folder and print a report")
    c.add_argument("data", help="data file (JSON, JSONL, metadata.csv) or folder")
    c.add_argument("--model", help="checkpoint folder, or tiny: also tokenize and check lengths")
    c.add_argument("--max_seq_len", type=int, default=4096, help="as train.py's (with --model)")
    c.add_argument("--allow_text_only", action="store_true",
                   help="accept records whose trained turns hold only text (evaluation data)")
    r = sub.add_parser("prepare", help="write the .codes.npy sidecars with the audio tokenizer")
    r.add_argument("data", help="data file (JSON, JSONL, metadata.csv) or folder")
    r.add_argument("--tokenizer", required=True, help="HiggsAudioV2TokenizerModel folder")
    r.add_argument("--device", default="auto", help="auto (cuda when present), cuda or cpu")
    r.add_argument("--batch_size", type=int, default=16, help="clips of equal length per batch")
    r.add_argument("--write_chatml", action="store_true",
                   help="also write the records as ChatML JSONL next to the input (NAME.chatml.jsonl)")
    for s in (c, r):
        s.add_argument("--format", default="auto", choices=("auto",) + FORMATS,
                       help="input format (default: detected per file)")
    args = p.parse_args(argv)
    try:
        if args.command == "check":
            return check(args.data, args.model, args.format, args.max_seq_len, args.allow_text_only)
        return prepare(args.data, args.tokenizer, args.format, args.device, args.batch_size,
                       args.write_chatml)
    except (DataError, OSError, ValueError) as e:  # bad input: a message, never a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
