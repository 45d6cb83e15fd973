"""ChatML records: types, loading, tokenization (a mirror of the official `prepare_chatml_sample`),
audio and audio-code loading, and one `Sample` per record.

A record is `{"messages": [...], "start_index": int|null, "speaker": str|null, "misc": {...}}`
(SPEC section 3). Audio codes are computed offline and cached next to each audio file as
`<audio stem>.codes.npy`, an integer array of shape (num_codebooks, T) at 25 frames/s.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

CODES_FRAME_RATE = 25  # audio tokenizer: 24 kHz / hop 960
WHISPER_SAMPLE_RATE = 16000
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input, with a message that names the file, the record, the field and the fix."""


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
    source: str = "<memory>"  # "file:line" for error messages
    base_dir: str = "."  # relative audio paths resolve here


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


# ----------------------------------------------------------------------------------------------
# Loading records


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
    if start is not None and (not isinstance(start, int) or isinstance(start, bool)):
        raise DataError(f"{source}: start_index must be an integer or null, got {start!r}")
    return Record(messages, start, obj.get("speaker"), obj.get("misc"), source, base_dir)


def load_records(path: str) -> list[Record]:
    """Read a JSON list or JSONL file of ChatML records."""
    base_dir = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            objs = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")
        return [record_from_json(o, f"{path}: record {i}", base_dir) for i, o in enumerate(objs)]
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON at column {e.colno}: {e.msg}")
        records.append(record_from_json(obj, f"{path}:{lineno} (record {len(records)})", base_dir))
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


def load_codes(part: AudioPart, base_dir: str, num_codebooks: int, codebook_size: int,
               where: str) -> torch.Tensor:
    """(K, T) codes from the `<stem>.codes.npy` sidecar, cut to the part's offset/duration."""
    if part.audio_url is None:
        raise DataError(f"{where}: audio given as raw_audio has no codes sidecar; save it to a "
                        "file, reference it with audio_url and run `python data.py prepare`")
    audio_path = resolve_audio_path(part, base_dir)
    path = codes_path(audio_path)
    if not os.path.isfile(path):
        raise DataError(f"{where}: audio codes {path} not found for {part.audio_url}; create them "
                        "with `python data.py prepare DATA_FILE --tokenizer AUDIO_TOKENIZER_DIR`")
    try:
        codes = np.load(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise DataError(f"{where}: cannot read codes {path}: {e}; delete it and rerun "
                        "`python data.py prepare`")
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise DataError(f"{where}: codes {path} must be an integer array (num_codebooks, T), got "
                        f"{codes.dtype} {codes.shape}")
    if codes.shape[0] < num_codebooks:
        raise DataError(f"{where}: codes {path} have {codes.shape[0]} codebooks, the model needs "
                        f"{num_codebooks}; re-encode with the model's audio tokenizer")
    codes = codes[:num_codebooks]
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise DataError(f"{where}: codes {path} hold values outside [0, {codebook_size}); "
                        "re-encode with the model's audio tokenizer")
    if part.offset or part.duration:
        start = int(round((part.offset or 0.0) * CODES_FRAME_RATE))
        stop = codes.shape[1] if part.duration is None else \
            start + int(math.ceil(part.duration * CODES_FRAME_RATE))
        codes = codes[:, start:stop]
    if codes.shape[1] == 0:
        raise DataError(f"{where}: codes {path} are empty for {part.audio_url}; the audio (or its "
                        "offset/duration window) has no frames")
    return torch.from_numpy(np.ascontiguousarray(codes)).long()


def load_audio(part: AudioPart, base_dir: str, sample_rate: int, where: str) -> torch.Tensor:
    """Mono float32 waveform at `sample_rate` (soundfile decode, channel mean, torchaudio resample)."""
    import soundfile as sf
    import torchaudio.functional as AF

    if part.raw_audio:
        source, label = io.BytesIO(base64.b64decode(part.raw_audio)), "raw_audio"
    else:
        source = label = resolve_audio_path(part, base_dir)
        if not os.path.isfile(source):
            raise DataError(f"{where}: audio file {source} not found (audio_url "
                            f"{part.audio_url!r} resolves against the data file's folder)")
    try:
        data, sr = sf.read(source, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{where}: cannot decode audio {label}: {e}; convert it to WAV/FLAC")
    if part.offset or part.duration:
        start = int(round((part.offset or 0.0) * sr))
        stop = len(data) if part.duration is None else start + int(round(part.duration * sr))
        data = data[start:stop]
    if len(data) == 0:
        raise DataError(f"{where}: audio {label} is empty")
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


def load_tokenizer(ckpt_dir: str):
    """The checkpoint's text tokenizer (a fast tokenizer: tokenizer.json + its config)."""
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(os.path.join(ckpt_dir, "tokenizer.json")):
        raise DataError(f"{ckpt_dir}/tokenizer.json not found: the checkpoint folder must carry "
                        "its text tokenizer (copy tokenizer.json and tokenizer_config.json there)")
    return PreTrainedTokenizerFast.from_pretrained(ckpt_dir)
