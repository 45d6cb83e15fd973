"""Input formats, each converted to ChatML records when read: ChatML itself, flat voice-cloning
records (with field aliases), ms-swift and ShareGPT chats with `<audio>` tags, and folders of
transcribed clips (NAME.wav + NAME.txt, or an LJSpeech metadata.csv). README "Data" describes
each. A new format is a converter here: a function from one input object to a ChatML dict and the
names the input uses for its fields (so errors point at what the user wrote).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from chatml import DEFAULT_SYSTEM_PROMPT, ROLES, Record, cloning_record, record_from_json
from errors import DataError

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


@dataclass
class Invalid:
    """A record that cannot be used: its position, where it is, and the DataError message."""
    index: int
    source: str
    reason: str


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
    """(source, record) of a JSON list, one JSON object, or JSONL. A JSONL line stays bytes,
    parsed when its record is made (parse_line), so a large file is parsed in the workers that
    validate it; the file is an error only if no line is JSON at all."""
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
        if line.strip():
            out.append((f"{path}:{lineno} (record {len(out)})", line.encode()))
    for source, line in out:
        if not isinstance(_try(parse_line, source, line), DataError):
            return out
    raise error


def parse_line(source: str, line: bytes):
    """A JSONL line, kept as bytes until its record is made (cheap to send to a worker)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}: invalid JSON at column {e.colno}: {e.msg}; a JSONL file holds "
                        "one JSON object per line")


def _try(f, *args):
    try:
        return f(*args)
    except DataError as e:
        return e


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


def _is_swift(obj) -> bool:
    turns = obj.get("messages") if isinstance(obj, dict) and isinstance(obj.get("messages"), list) \
        else []
    return isinstance(obj, dict) and ("audios" in obj or any(
        isinstance(t, dict) and isinstance(t.get("content"), str) and "<audio>" in t["content"]
        for t in turns))


def _detect(path: str, items: list) -> str:
    """A JSON file's format, from its first record's keys (a "messages" file is ms-swift when any
    record has "audios" or <audio> tags)."""
    def parsed(source, obj, hint=""):  # JSONL lines are parsed only where the answer is in them
        return _try(parse_line, source, obj) if isinstance(obj, bytes) and hint.encode() in obj \
            else obj
    first = next((o for o in (parsed(s, o) for s, o in items) if isinstance(o, dict)), None)
    if first is None:
        raise DataError(f"{path}: unknown format, no record is a JSON object; {FORMAT_HINT}")
    if "conversations" in first:
        return "sharegpt"
    if "messages" in first:
        tagged = any(_is_swift(parsed(s, o, hint)) for hint in ("audios", "<audio>") for s, o in items)
        return "swift" if tagged else "chatml"
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


def read_items(path: str, fmt: str = "auto") -> tuple[list, str, str]:
    """(items, format, base folder) of a data file or folder in any supported format: each item
    (source, payload) becomes a record through `to_record`. Input that cannot be read at all
    (missing, not text, not JSON, unknown format) raises DataError."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder; --train_data / --eval_data / DATA name "
                        "a data file or a folder of clips")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: not readable (permission denied)")
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown --format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    if os.path.isdir(path) or fmt == "folder" or (fmt == "auto" and path.lower().endswith(".csv")):
        if fmt not in ("auto", "folder"):
            raise DataError(f"{path}: --format {fmt} reads a JSON or JSONL file, not a folder or list")
        base_dir, items = _folder_clips(path)
        return _pair_clips(items), "folder", base_dir
    items = _read_json(path)
    fmt = _detect(path, items) if fmt == "auto" else fmt
    if fmt == "flat":  # converted now: records without a reference are paired by speaker
        items = _pair_clips([(source, _try(_converted, source, obj, fmt)) for source, obj in items])
    return items, fmt, os.path.dirname(os.path.abspath(path))


def _converted(source: str, obj, fmt: str):
    if isinstance(obj, DataError):
        raise obj
    return CONVERTERS[fmt](parse_line(source, obj) if isinstance(obj, bytes) else obj, source)


def to_record(source: str, payload, fmt: str, base_dir: str, index: int) -> Record:
    """The ChatML record of an item of read_items (DataError if it is not a valid one)."""
    obj, fields = payload if isinstance(payload, tuple) else _converted(source, payload, fmt)
    record = record_from_json(obj, source, base_dir)
    record.index, record.fields = index, fields
    return record


def read_records(path: str, fmt: str = "auto") -> tuple[list[Record], list[Invalid], str]:
    """(records, invalid records, format) of a data file or folder, converted to ChatML; a record
    that cannot be converted is returned as Invalid."""
    items, fmt, base_dir = read_items(path, fmt)
    records, invalid = [], []
    for index, (source, payload) in enumerate(items):
        try:
            records.append(to_record(source, payload, fmt, base_dir, index))
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
