"""Data: records become validated samples, and the data command line:

    python data.py check DATA [--model CKPT|tiny] [--workers N]   # report; exit 1 if invalid
    python data.py prepare DATA --tokenizer AUDIO_TOK            # write the .codes.npy sidecars

Validation is shared by `check` and training, and names the file, the record, the field as the
input names it, and the fix. Training keeps what it found in an index beside the data (Dataset),
reused while the data is unchanged; a sample's codes are read when it is batched.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import multiprocessing
import multiprocessing.forkserver
import os
import random
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import torch

from audio import (CODES_FRAME_RATE, CODES_SAMPLE_RATE, WHISPER_SAMPLE_RATE, audio_info, codes_path,
                   codes_values, encode_files, expected_frames, file_sha256, frames_match,
                   has_valid_sidecar, load_audio, load_audio_tokenizer, load_codes, npy_header,
                   provenance_path, read_codes, resampled_length, window)
from audio_tower import tower_lengths
from chatml import (IGNORE, AudioPart, AudioSegment, Record, Sample, TextPart, audio_paths,
                    field_name, record_to_json, resolve_audio_path, tokenize_records)
from checkpoint import model_spec
from cli import option, parse
from device import resolve_device
from errors import ConfigError, DataError, UserError
from formats import FORMATS, Invalid, read_items, read_records, to_record
from model import HiggsConfig

SPEAKING_RATE_FACTOR = 2.5  # a target this many times faster or slower than the median is odd
INDEX_VERSION = 3
CHUNK = 1000  # records validated together: one tokenizer batch, one task of a worker

# ----------------------------------------------------------------------------------------------
# What a sample becomes: the collator's expansion (OFFICIAL.md section 6), counted in positions

WHISPER_CHUNK_SECONDS = 30
WHISPER_HOP = 160  # samples per mel frame of WhisperFeatureExtractor
TEXT, AUDIO_IN_CODES, AUDIO_OUT, WHISPER = 0, 1, 2, 3  # position kinds in the expanded sequence


def audio_plan(sample: Sample, cfg) -> list[tuple[int, list[tuple[int, object]]]]:
    """What each audio placeholder becomes, in order: (token index, pieces); a piece is
    (AUDIO_OUT or AUDIO_IN_CODES, codes (K, T)), (WHISPER, a waveform chunk of at most 30 s) or
    (TEXT, token index) for the <|audio_eos|><|audio_bos|> each further 30 s chunk repeats."""
    K, plan, audios = cfg.audio_num_codebooks, [], iter(sample.audios)
    ids = np.asarray(sample.input_ids)

    def next_audio(i):
        seg = next(audios, None)
        if seg is None:
            raise DataError(f"{sample.source}: token {i} is an audio placeholder with no audio part; "
                            "does a text contain <|AUDIO|> or <|AUDIO_OUT|> literally?")
        return seg
    chunk = WHISPER_CHUNK_SECONDS * WHISPER_SAMPLE_RATE
    frames = WHISPER_CHUNK_SECONDS * CODES_FRAME_RATE  # codes per chunk
    for i in np.flatnonzero((ids == cfg.audio_out_token_id) | (ids == cfg.audio_in_token_id)):
        i, seg = int(i), next_audio(int(i))
        if ids[i] == cfg.audio_out_token_id:
            plan.append((i, [(AUDIO_OUT, seg.codes[:K])]))
            continue
        pieces = []
        if cfg.uses_whisper:  # a chunk's codes are its own 30 s (OFFICIAL.md section 8)
            for c, s in enumerate(range(0, len(seg.waveform), chunk)):
                if c > 0:
                    pieces += [(TEXT, i + 1), (TEXT, i - 1)]
                pieces.append((WHISPER, seg.waveform[s:s + chunk]))
                if cfg.encode_audio_in_tokens and seg.codes[:, c * frames:].shape[1]:
                    pieces.append((AUDIO_IN_CODES, seg.codes[:K, c * frames:(c + 1) * frames]))
        elif cfg.encode_audio_in_tokens:
            pieces.append((AUDIO_IN_CODES, seg.codes[:K]))
        plan.append((i, pieces or [(TEXT, i)]))  # nothing to fill in: it stays a text token
    if next(audios, None) is not None:
        raise DataError(f"{sample.source}: {len(sample.audios)} audio parts but fewer audio "
                        "placeholders in the tokens")
    return plan


def piece_length(kind: int, payload, cfg) -> int:
    """Positions a piece of audio_plan takes in the expanded sequence."""
    if kind == WHISPER:
        return int(tower_lengths(-(-len(payload) // WHISPER_HOP))[1])
    if kind == TEXT:
        return 1
    return payload.shape[1] + 2 + (cfg.audio_num_codebooks - 1 if cfg.use_delay_pattern else 0)


def expanded_length(sample: Sample, cfg) -> int:
    """Positions the collator gives `sample`; only the shapes of its codes and waveforms count."""
    return len(sample.input_ids) + sum(sum(piece_length(k, p, cfg) for k, p in pieces) - 1
                                       for _, pieces in audio_plan(sample, cfg))


# ----------------------------------------------------------------------------------------------
# Validation


@dataclass
class Spec:
    """What validation checks the records against, besides the data."""
    cfg: HiggsConfig
    tokenizer: object = None  # None: no tokens, lengths or samples (`check` without --model)
    max_seq_len: int | None = None
    require_audio: bool = True  # training data must have trained assistant audio
    values: bool = False  # read every codes value and check its range (else headers only)

    def key(self) -> str:
        """What an index depends on besides the data."""
        c, tok = self.cfg, self.tokenizer
        vocab = hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest() if tok else ""
        return json.dumps([INDEX_VERSION, vocab, c.audio_num_codebooks, c.audio_codebook_size,
                           c.use_delay_pattern, c.encode_audio_in_tokens, c.uses_whisper,
                           c.audio_in_token_id, c.audio_out_token_id, self.max_seq_len,
                           self.require_audio, self.values])


@dataclass
class Checked:
    """A valid record and what the report needs."""
    record: Record
    target_seconds: float = 0.0
    target_chars: int | None = None  # text of the single target, for its speaking rate
    segments: list = field(default_factory=list)  # (part, file, is_out, frames, 16 kHz samples)


def _check_audio(part: AudioPart, key: str | None, record: Record, where: str, spec: Spec,
                 needs_codes: bool, cache: dict) -> tuple[float, int, int]:
    """(seconds in the part's window, codes frames in it, its 16 kHz samples) of the audio file
    `key` (None: raw audio); raises if it is unusable or (when the model needs codes) its sidecar
    is missing, malformed, stale or of another length. `cache` keeps each file's results."""
    info = cache.get(key) or audio_info(part, record.base_dir, where)
    if key:
        cache[key] = info
    n = len(range(info.frames)[window(part, info.samplerate)])
    if n == 0:
        raise DataError(f"{where}: the offset/duration window ({part.offset}, {part.duration}) "
                        f"holds no audio of the {info.frames / info.samplerate:.2f} s file; fix "
                        "offset/duration")
    frames = 0
    if needs_codes:
        if (key, "codes") not in cache:
            shape, _ = read_codes(part, record.base_dir, spec.cfg.audio_num_codebooks,
                                  spec.cfg.audio_codebook_size, where, spec.values)
            if not frames_match(shape[1], info.frames, info.samplerate):
                raise DataError(f"{where}: codes {codes_path(key)} have {shape[1]} frames but the "
                                f"audio ({info.frames / info.samplerate:.2f} s) gives "
                                f"{expected_frames(info.frames, info.samplerate)} at 25 frames/s: "
                                "the sidecar belongs to another file or an older version of it; "
                                "delete it and rerun `python data.py prepare`")
            cache[(key, "codes")] = shape[1]
        frames = len(range(cache[(key, "codes")])[window(part, CODES_FRAME_RATE, math.ceil)])
        if frames == 0:
            raise DataError(f"{where}: codes of {part.audio_url} are empty; the audio (or its "
                            "offset/duration window) has no frames")
    return n / info.samplerate, frames, resampled_length(n, info.samplerate, WHISPER_SAMPLE_RATE)


def check_record(record: Record, spec: Spec, cache: dict | None = None) -> Checked:
    """Everything about a record that needs no text tokenizer: role order, empty text, a trained
    assistant turn (with audio, for training data), audio files and (as the model needs them)
    their codes sidecars. `cache` shares per-file results between the records."""
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
        raise DataError(f"{src}: no trainable assistant audio or text (other Higgs-Audio training "
                        f"scripts report \"Missing required message types\"): no assistant message{after}, "
                        "so there is nothing to learn; make the target speech an assistant audio "
                        "part" + (", or lower start_index" if start else ""))
    targets = [(i, j) for i in trained for j, p in enumerate(msgs[i].content)
               if isinstance(p, AudioPart)]
    if spec.require_audio and not targets:
        raise DataError(f"{src}: no trainable assistant audio (other Higgs-Audio training scripts "
                        "report \"Missing required message types\"): the trained assistant turn"
                        f"{'s' if len(trained) > 1 else ''} {', '.join(f'messages[{i}]' for i in trained)} "
                        "hold only text, so there is no voice to learn; add the target speech as "
                        "an assistant audio part (text-only records are accepted by --eval_only "
                        "and by `data.py check --allow_text_only`)")
    checked = Checked(record)
    for i, m in enumerate(msgs):
        for j, p in enumerate(m.content):
            if isinstance(p, AudioPart):
                is_out, key = m.role == "assistant", \
                    p.audio_url and resolve_audio_path(p, record.base_dir)
                seconds, frames, samples = _check_audio(
                    p, key, record, f"{src}: {field_name(record, i, j)}", spec,
                    is_out or spec.cfg.encode_audio_in_tokens, cache)
                checked.target_seconds += seconds if (i, j) in targets else 0.0
                checked.segments.append((p, key, is_out, frames, samples))
    prev = msgs[targets[0][0] - 1] if len(targets) == 1 else None  # a user turn precedes a target
    if prev and prev.role == "user" and all(isinstance(p, TextPart) for p in prev.content):
        checked.target_chars = sum(len(p.text.strip()) for p in prev.content)
    return checked


def shape_sample(ids: np.ndarray, segments: list, cfg, source: str) -> Sample:
    """A Sample with stand-ins of the right shapes for its codes and waveforms (no memory):
    enough for expanded_length before any codes are read."""
    shaped = lambda *shape: np.broadcast_to(np.int16(0), shape)  # noqa: E731
    return Sample(ids, ids, [AudioSegment(shaped(cfg.audio_num_codebooks, frames), shaped(samples),
                                          is_out) for _, _, is_out, frames, samples in segments],
                  source)


def load_segment(part: AudioPart, base_dir: str, is_out: bool, cfg, where: str) -> AudioSegment:
    """A segment's codes (when the model reads them) and 16 kHz waveform (Whisper input only)."""
    codes = load_codes(part, base_dir, cfg.audio_num_codebooks, cfg.audio_codebook_size, where) \
        if is_out or cfg.encode_audio_in_tokens else None
    wav = load_audio(part, base_dir, WHISPER_SAMPLE_RATE, where) \
        if not is_out and cfg.uses_whisper else None
    return AudioSegment(codes, wav, is_out)


def make_sample(record: Record, tokenizer, cfg) -> Sample:
    """A record tokenized, with its audio codes (and waveforms when the model uses Whisper)."""
    inputs, labels, audio_parts = tokenize_records([record], tokenizer)[0]
    audios = [load_segment(part, record.base_dir, is_out, cfg,
                           f"{record.source}: audio {i} ({part.audio_url or 'raw_audio'})")
              for i, (part, is_out) in enumerate(audio_parts)]
    return Sample(torch.from_numpy(inputs), torch.from_numpy(labels), audios, record.source)


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def item_hash(payload) -> int:
    """A record's identity for the fingerprint: its JSONL line, or its (converted) object."""
    return hash64(payload.decode() if isinstance(payload, bytes) else json.dumps(
        payload if not isinstance(payload, tuple) else payload[0], sort_keys=True, default=str))


def file_states(audio: str) -> tuple[str, list[int], list[int]]:
    """The state of an audio file, its codes sidecar and its provenance file: "path|size|time"
    lines ("path|-" when missing: one that appears changes the data), and hashes of each path
    and each state, so that changes can be counted."""
    lines = []
    for p in (audio, codes_path(audio), provenance_path(audio)):
        try:
            st = os.stat(p)
            lines.append((p, f"{st.st_size}|{st.st_mtime_ns}"))
        except OSError:
            lines.append((p, "-"))
    return ("".join(f"{p}|{state}\n" for p, state in lines), [hash64(p) for p, _ in lines],
            [hash64(state) for _, state in lines])


def validate_chunk(task) -> dict:
    """Validate a chunk of read_items (records start..): the valid ones as arrays (tokens,
    segments, lengths), the invalid ones with reasons, every record's hash, the state of every
    file they use, and the report's figures. Runs in a worker process (reads _SPEC)."""
    items, start, fmt, base_dir = task
    spec, cache, good, invalid, media = _SPEC, {}, [], [], set()
    for index, (source, payload) in enumerate(items, start):
        try:
            record = to_record(source, payload, fmt, base_dir, index)
        except DataError as e:
            invalid.append(Invalid(index, source, str(e)))
            continue
        try:
            good.append(check_record(record, spec, cache))
            media.update(f for _, f, _, _, _ in good[-1].segments if f)
        except DataError as e:
            invalid.append(Invalid(index, source, str(e)))
            media |= audio_paths([record])
    tokens = tokenize_records([c.record for c in good], spec.tokenizer) if spec.tokenizer else \
        [([], [], [])] * len(good)
    out = dict(index=[], source=[], ids=[], supervised=[], segments=[], lengths=[], speaker=[],
               seconds=[], chars=[], invalid=invalid, hashes=[item_hash(p) for _, p in items],
               files={}, media={f: file_states(f) for f in media})
    for c, (ids, labels, _) in zip(good, tokens):
        r = c.record
        if spec.tokenizer is not None:
            length = expanded_length(shape_sample(ids, c.segments, spec.cfg, r.source), spec.cfg)
            if spec.max_seq_len and length > spec.max_seq_len:
                invalid.append(Invalid(r.index, r.source, (
                    f"{r.source}: {length} positions after audio expansion, more than --max_seq_len "
                    f"{spec.max_seq_len}; split its audio into shorter clips, or raise "
                    "--max_seq_len if the GPU memory allows")))
                continue
            out["lengths"].append(length)
            out["ids"].append(ids.astype(np.int32))
            out["supervised"].append(labels != IGNORE)
        for key, value in (("index", r.index), ("source", r.source), ("speaker", r.speaker),
                           ("seconds", c.target_seconds), ("chars", c.target_chars)):
            out[key].append(value)
        out["segments"].append([(f or p.raw_audio, not f, p.offset, p.duration, is_out)
                                for p, f, is_out, _, _ in c.segments])
        for f in (f for _, f, _, _, _ in c.segments if f):
            out["files"].setdefault(f, (*cache[f], r.source))
    invalid.sort(key=lambda x: x.index)
    return out


_SPEC: Spec | None = None  # the Spec of the task functions in this (worker) process


def validate(path: str, spec: Spec, fmt: str = "auto", workers: int = 1, task=validate_chunk):
    """(items, format, base folder, `task` of each chunk of items) of a data file or folder."""
    items, fmt, base_dir = read_items(path, fmt)
    chunks = [(items[i:i + CHUNK], i, fmt, base_dir) for i in range(0, len(items), CHUNK)]
    return items, fmt, base_dir, parallel_map(task, chunks, workers, spec)


def parallel_map(task, inputs: list, workers: int, spec: Spec | None = None) -> list:
    """[task(x) for x in inputs] in `workers` processes when there are several; `task` reads
    `spec` as _SPEC. The processes come from a fork server, a fresh process: a child forked
    from this one could inherit a lock that one of its threads held."""
    workers = min(workers, len(inputs))
    if workers <= 1:
        set_spec(spec)
        return [task(x) for x in inputs]
    with start_workers().Pool(workers, initializer=set_spec, initargs=(spec, True)) as pool:
        return pool.map(task, inputs, chunksize=1)


def start_workers():
    """parallel_map's process context; the fork server starts importing this module at once, so
    call it early."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["data"])
    multiprocessing.forkserver.ensure_running()
    return context


def set_spec(spec: Spec | None, worker: bool = False) -> None:
    global _SPEC
    _SPEC = spec
    if worker:  # what the worker imported is never garbage: the collector need not scan it
        gc.freeze()


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 16))


# ----------------------------------------------------------------------------------------------
# The index: a validated data set, kept beside the data and reused while it is unchanged


def records_digest(path: str) -> str:
    """SHA-256 of the records: the data file's bytes, or for a folder the names, sizes and times
    of its transcripts and lists (its audio is media)."""
    if os.path.isfile(path):
        return file_sha256(path)
    h = hashlib.sha256()
    for folder, subfolders, files in sorted(os.walk(path)):
        subfolders[:] = sorted(d for d in subfolders if d != ".higgs_index")
        for name in sorted(f for f in files if f.endswith((".txt", ".csv"))):
            st = os.stat(os.path.join(folder, name))
            h.update(f"{os.path.relpath(os.path.join(folder, name), path)}|{st.st_size}|"
                     f"{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def media_state(states: list[tuple]) -> tuple[str, np.ndarray, np.ndarray]:
    """The file_states of a data set's audio files, in order: their SHA-256 and their hashes."""
    return (hashlib.sha256("".join(s[0] for s in states).encode()).hexdigest(),
            np.array([h for s in states for h in s[1]], dtype=np.uint64),
            np.array([h for s in states for h in s[2]], dtype=np.uint64))


@dataclass
class Fingerprint:
    """What a run trained on: the records (their content, a hash per record) and the media (sizes
    and times, a hash per file), so that a change can be said in words."""
    records: str
    media: str
    hashes: np.ndarray  # uint64, one per record of the data set, valid or not
    media_paths: np.ndarray  # uint64 per media file
    media_states: np.ndarray

    def state(self) -> dict:
        """What a checkpoint keeps of it."""
        return {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in vars(self).items()}

    def change_from(self, old: "Fingerprint") -> str | None:
        """What changed since `old`, in words; None if nothing did."""
        if (self.records, self.media) == (old.records, old.media):
            return None
        words = []
        if self.records != old.records:
            new, was = Counter(self.hashes.tolist()), Counter(old.hashes.tolist())
            added, removed = sum((new - was).values()), sum((was - new).values())
            edited = min(added, removed)
            words += [f"{n} records {what}" for n, what in ((edited, "edited"),
                      (added - edited, "added"), (removed - edited, "removed")) if n]
            words = words or ["the records were reordered or reformatted"]
        was = dict(zip(old.media_paths.tolist(), old.media_states.tolist()))
        changed = sum(was.get(p, s) != s for p, s in zip(self.media_paths.tolist(),
                                                        self.media_states.tolist()))
        if changed:
            words.append(f"{changed} audio or codes files changed (size or modification time)")
        return ", ".join(words) or "the records now use other audio files"


ARRAYS = dict(ids=np.int32, supervised=bool, id_offsets=np.int64, seg_file=np.int32,
              seg_offset=np.float64, seg_duration=np.float64, seg_out=bool, seg_offsets=np.int64,
              lengths=np.int32, hashes=np.uint64, media_paths=np.uint64, media_states=np.uint64,
              sources=bytes)


class Dataset:
    """The valid samples of a data set as validation left them: token ids and supervision masks
    (concatenated), each sample's audio segments (file, window, direction) and expanded length,
    the invalid records and the fingerprint. The arrays are memory-mapped, so every rank and
    DataLoader worker shares one copy; codes are read and range-checked by __getitem__."""

    def __init__(self, folder: str, spec: Spec):
        self.folder, self.spec = folder, spec
        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = json.load(f)
        for name in ARRAYS:
            setattr(self, name, np.load(os.path.join(folder, name + ".npy"), mmap_mode="r"))
        with open(os.path.join(folder, "files.json")) as f:
            self.files = json.load(f)
        self.invalid = [Invalid(*x) for x in self.meta["invalid"]]
        self.fingerprint = Fingerprint(self.meta["records"], self.meta["media"], self.hashes,
                                       self.media_paths, self.media_states)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> Sample:
        """Sample i, its codes read from the sidecars validation checked (and their values)."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        cfg, tokens = self.spec.cfg, slice(self.id_offsets[i], self.id_offsets[i + 1])
        ids = torch.from_numpy(self.ids[tokens].astype(np.int64))
        labels = torch.where(torch.from_numpy(np.array(self.supervised[tokens])), ids, IGNORE)
        segments = []
        for s in range(self.seg_offsets[i], self.seg_offsets[i + 1]):
            (f, raw), is_out = self.files[self.seg_file[s]], bool(self.seg_out[s])
            part = AudioPart(None if raw else f, f if raw else None, *(
                None if math.isnan(x) else float(x) for x in (self.seg_offset[s],
                                                               self.seg_duration[s])))
            codes = torch.from_numpy(np.ascontiguousarray(codes_values(
                codes_path(f), cfg.audio_num_codebooks, cfg.audio_codebook_size, self.source(i),
                window(part, CODES_FRAME_RATE, math.ceil)))) \
                if is_out or cfg.encode_audio_in_tokens else None
            wav = load_audio(part, "", WHISPER_SAMPLE_RATE, self.source(i)) \
                if not is_out and cfg.uses_whisper else None
            segments.append(AudioSegment(codes, wav, is_out))
        return Sample(ids, labels, segments, self.source(i))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def source(self, i: int) -> str:
        """Where sample i is: file:line (record N)."""
        return self.sources[i].decode()

    def unchanged(self, path: str) -> bool:
        if self.meta["records"] != records_digest(path):
            return False
        with open(os.path.join(self.folder, "audio_files.txt")) as f:
            audio = f.read().split("\n")[:-1]
        return self.meta["media"] == media_state([file_states(f) for f in audio])[0]

    @staticmethod
    def write(folder: str, path: str, spec: Spec, workers: int) -> None:
        """Validate `path` and write its index into `folder` (renamed into place: no reader sees
        half an index)."""
        records = records_digest(path)
        _, fmt, _, parts = validate(path, spec, workers=workers)
        files, arrays, media = {}, {n: [] for n in ARRAYS}, {}
        for part in parts:
            for name in ("ids", "supervised", "lengths", "hashes"):
                arrays[name] += part[name]
            arrays["sources"] += [s.encode() for s in part["source"]]
            media.update(part["media"])
            for segs in part["segments"]:
                for f, raw, offset, duration, is_out in segs:
                    arrays["seg_file"].append(files.setdefault((f, raw), len(files)))
                    arrays["seg_offset"].append(math.nan if offset is None else offset)
                    arrays["seg_duration"].append(math.nan if duration is None else duration)
                    arrays["seg_out"].append(is_out)
                arrays["seg_offsets"].append(len(segs))
        audio = sorted(media)
        digest, arrays["media_paths"], arrays["media_states"] = media_state(
            [media[f] for f in audio])
        n_ids = [len(x) for x in arrays["ids"]]
        for name in ("ids", "supervised"):
            arrays[name] = np.concatenate(arrays[name]) if n_ids else []
        arrays["id_offsets"] = np.concatenate([[0], np.cumsum(n_ids)])
        arrays["seg_offsets"] = np.concatenate([[0], np.cumsum(arrays["seg_offsets"])])
        tmp, old = f"{folder}.tmp{os.getpid()}", f"{folder}.old{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        for name, dtype in ARRAYS.items():
            np.save(os.path.join(tmp, name + ".npy"), np.asarray(arrays[name], dtype=dtype))
        meta = dict(version=INDEX_VERSION, format=fmt, path=os.path.abspath(path), records=records,
                    media=digest, invalid=[(x.index, x.source, x.reason) for p in parts
                                           for x in p["invalid"]])
        for name, content in (("meta.json", meta), ("files.json", sorted(files, key=files.get))):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f)
        with open(os.path.join(tmp, "audio_files.txt"), "w") as f:  # whose state is the media's
            f.writelines(a + "\n" for a in audio)
        if os.path.isdir(folder):
            os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)


def index_folder(path: str, spec: Spec) -> str:
    """Where the index of `path` for `spec` lives: .higgs_index/ beside the data, or a cache
    folder (HIGGS_INDEX_CACHE, default ~/.cache/higgs-lora/index) when that is not writable."""
    path = os.path.abspath(path)
    key = hashlib.sha256((path + spec.key()).encode()).hexdigest()[:16]
    name = f"{os.path.basename(path)}.{key}"
    beside = os.path.join(os.path.dirname(path), ".higgs_index")
    try:
        os.makedirs(beside, exist_ok=True)
        if os.access(beside, os.W_OK):
            return os.path.join(beside, name)
    except OSError:
        pass
    cache = os.environ.get("HIGGS_INDEX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                             "higgs-lora", "index"))
    os.makedirs(cache, exist_ok=True)
    return os.path.join(cache, name)


def open_dataset(path: str, spec: Spec, workers: int | None = None, log=print) -> Dataset:
    """The Dataset of `path`: its index if the data is unchanged since it was written, else
    validated anew (by `workers` processes) and indexed."""
    folder = index_folder(path, spec)
    if os.path.isfile(os.path.join(folder, "meta.json")):
        try:
            dataset = Dataset(folder, spec)
            if dataset.unchanged(path):
                return dataset
        except (OSError, ValueError, KeyError):
            pass  # an index of another version, or damaged: written anew
    workers = default_workers() if workers is None else workers
    log(f"{path}: validating (index in {folder})")
    if workers > 1:
        start_workers()
    Dataset.write(folder, path, spec, workers)
    return Dataset(folder, spec)


def load_dataset(path: str, tokenizer, cfg, max_seq_len: int | None = None, fmt: str = "auto",
                 require_audio: bool = True) -> tuple[list[Sample], list[Invalid]]:
    """The samples of the valid records of a small data set, read whole (every codes value
    checked, nothing kept on disk), and the invalid ones with reasons."""
    items, fmt, base_dir, parts = validate(path, Spec(cfg, tokenizer, max_seq_len, require_audio,
                                                      values=True), fmt)
    samples = [make_sample(to_record(*items[i], fmt, base_dir, i), tokenizer, cfg)
               for part in parts for i in part["index"]]
    return samples, sorted((x for part in parts for x in part["invalid"]), key=lambda x: x.index)


# ----------------------------------------------------------------------------------------------
# python data.py check


def count_codebooks(task) -> dict:
    """{sidecar: codebook count} of a chunk of records (headers only; unreadable ones are
    reported by validation)."""
    items, start, fmt, base_dir = task
    counts = {}
    for index, (source, payload) in enumerate(items, start):
        try:
            for path in map(codes_path, audio_paths([to_record(source, payload, fmt, base_dir,
                                                                index)])):
                counts[path] = npy_header(path)[0][0]
        except (DataError, OSError, ValueError, IndexError):
            continue
    return counts


def audio_problem(task) -> str | None:
    """Why a readable audio file looks wrong: low sample rate, undecodable, near-silent, clipped."""
    path, samplerate = task
    if samplerate < 16000:
        return f"{samplerate} Hz: band-limited speech, the model would learn its muffled sound"
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


def check(path: str, model: str | None = None, fmt: str = "auto", max_seq_len: int = 4096,
          allow_text_only: bool = False, workers: int = 1, audio_checks: int = -1) -> int:
    """`python data.py check`: validate what training would (and every codes value), print a
    report; the exit code is 0 if every record is valid, else 1."""
    if model:
        (tokenizer, cfg), counts = model_spec(model), Counter()
    else:  # the released shape with the codebook count most sidecars have
        files = {k: v for part in validate(path, None, fmt, workers, count_codebooks)[3]
                 for k, v in part.items()}
        counts = Counter(files.values())
        tokenizer, cfg = None, HiggsConfig(audio_num_codebooks=counts.most_common(1)[0][0]
                                           if counts else 8)
    items, fmt, _, parts = validate(path, Spec(cfg, tokenizer, max_seq_len, not allow_text_only,
                                               values=True), fmt, workers)
    invalid = sorted((x for p in parts for x in p["invalid"]), key=lambda x: x.index)
    col = lambda key: [x for p in parts for x in p[key]]  # noqa: E731
    sources, speakers, seconds, chars = col("source"), col("speaker"), col("seconds"), col("chars")
    files = {f: info for p in parts for f, info in p["files"].items()}
    print(f"{path}: {fmt} format, {len(items)} records: {len(sources)} valid, {len(invalid)} invalid")
    by_speaker = Counter(s or "(unnamed)" for s in speakers)
    print(f"speakers: {len(by_speaker)} (" + ", ".join(
        f"{s}: {n}" for s, n in by_speaker.most_common(10)) + (", ..." if len(by_speaker) > 10
                                                                 else "") + ")")
    print(f"target audio: {sum(seconds) / 3600:.2f} h ({sum(seconds):.1f} s)")
    rates = Counter(rate for rate, _, _, _ in files.values())
    print(f"audio files: {len(files)} (" + ", ".join(f"{r} Hz: {n}" for r, n in sorted(rates.items()))
          + f"; {sum(ch > 1 for _, ch, _, _ in files.values())} multi-channel, mixed down to mono; "
          "the audio tokenizer reads 24 kHz, prepare resamples)")
    print(f"codes: {cfg.audio_num_codebooks} codebooks of {cfg.audio_codebook_size} values, checked "
          + (f"against --model {model}" if model else "against the most common codebook count of the "
             "sidecars (pass --model CKPT to check against a checkpoint)"))
    if len(counts) > 1:
        print("  sidecars disagree on the codebook count: " +
              ", ".join(f"{k} codebooks: {n} files" for k, n in sorted(counts.items())))
    if tokenizer is None:
        print("sequence length: not checked (pass --model CKPT, or tiny, to tokenize)")
    elif sources:
        n = np.array(col("lengths"))
        print(f"sequence length after audio expansion: min {n.min()}, median {np.median(n):.0f}, "
              f"p95 {np.percentile(n, 95):.0f}, max {n.max()} (--max_seq_len {max_seq_len})")
    flags = [f"{s}: trains text only, no assistant audio to learn the voice from"
             for s, sec in zip(sources, seconds) if not sec]
    speed = [(s, c / sec) for s, c, sec in zip(sources, chars, seconds) if c]
    if speed:
        median = float(np.median([r for _, r in speed]))
        print(f"speaking rate of targets: median {median:.1f} text characters per second of audio "
              f"({min(r for _, r in speed):.1f} to {max(r for _, r in speed):.1f})")
        low, high = median / SPEAKING_RATE_FACTOR, median * SPEAKING_RATE_FACTOR
        flags += [f"{s}: speaking rate {r:.1f} characters/s, {r / median:.1f}x the median "
                  f"{median:.1f}: wrong transcript or wrong audio file?" for s, r in speed
                  if len(speed) >= 5 and not low <= r <= high]
    decoded = sorted(files) if audio_checks < 0 or audio_checks >= len(files) else \
        sorted(random.Random(0).sample(sorted(files), audio_checks))
    problems = parallel_map(audio_problem, [(f, files[f][0]) for f in decoded], workers)
    flags += [f"{f} (used by {files[f][3]}): {p}" for f, p in zip(decoded, problems) if p]
    if len(decoded) < len(files):
        print(f"audio checks (silence, clipping): {len(decoded)} of {len(files)} files decoded "
              "(--audio_checks)")
    for title, lines in ((f"flagged ({len(flags)}; kept, but worth a look):", flags),
                         (f"invalid ({len(invalid)}; training stops on them, or drops them with "
                          "--skip_invalid):", [x.reason for x in invalid])):
        if lines:
            print(title + "".join(f"\n  {line}" for line in lines))
    return 1 if invalid else 0


# ----------------------------------------------------------------------------------------------
# python data.py prepare


def prepare(path: str, tokenizer_dir: str, fmt: str = "auto", device: str = "auto",
            batch_size: int = 16, write_chatml: bool = False) -> int:
    """`python data.py prepare`: encode every audio file the records use and write its sidecar
    and provenance; valid sidecars are kept (a rerun resumes), stale ones encoded again. The exit
    code is 0 if done, 1 if some records or files failed."""
    records, invalid, fmt = read_records(path, fmt)
    for x in invalid:
        print(f"skipped: {x.reason}")
    device, _ = resolve_device(device)
    model = load_audio_tokenizer(tokenizer_dir, device)
    files, todo, failed = sorted(audio_paths(records)), [], []
    for f in files:
        try:
            info = audio_info(AudioPart(f), "", f)
            if has_valid_sidecar(f, info, model):
                continue
            if expected_frames(info.frames, info.samplerate) == 0:
                raise DataError(f"{f}: {info.frames / info.samplerate * 1000:.1f} ms is shorter than "
                                "one 40 ms frame of codes; remove it or use a longer clip")
            todo.append((resampled_length(info.frames, info.samplerate, CODES_SAMPLE_RATE), f))
        except DataError as e:
            failed.append(str(e))
    print(f"prepare: {len(files)} audio files, {len(files) - len(todo) - len(failed)} with valid "
          f"codes already, {len(todo)} to encode on {device}")
    done = encode_files(model, [f for _, f in sorted(todo)], batch_size, failed)
    if write_chatml:
        base = os.path.normpath(path)
        out = (base if os.path.isdir(path) else os.path.splitext(base)[0]) + ".chatml.jsonl"
        with open(out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record_to_json(r, os.path.dirname(os.path.abspath(out))),
                                    ensure_ascii=False) + "\n" for r in records)
        print(f"wrote {out} ({len(records)} ChatML records)")
    for reason in failed:
        print(f"failed: {reason}")
    print(f"prepare: {done} encoded, {len(failed)} failed, {len(invalid)} records skipped")
    return 1 if failed or invalid else 0


# ----------------------------------------------------------------------------------------------


@dataclass
class DataInput:
    """The options every data command takes."""
    data: str = option("", "data file (JSON, JSONL, metadata.csv) or folder of clips")
    format: str = option("auto", "input format; auto: detected per file", choices=("auto",) + FORMATS)


@dataclass
class CheckConfig(DataInput):
    """Validate a data file or folder and print a report; exit 1 if any record is invalid"""
    model: str = option("", "checkpoint folder, Hub id, or tiny: also tokenize, and check lengths "
                        "and codes against this model; none: the released shape")
    max_seq_len: int = option(4096, "with --model: longest sample in positions after audio "
                              "expansion (as train.py's)", min=16, max=1 << 20)
    allow_text_only: bool = option(False, "accept records whose trained turns hold only text "
                                   "(evaluation data)")
    workers: int = option(1, "processes that validate and decode in parallel; 0: one per CPU core",
                          min=0, max=256)
    audio_checks: int = option(-1, "files decoded whole for the silence and clipping checks, "
                               "sampled at random; -1: all", min=-1)


@dataclass
class PrepareConfig(DataInput):
    """Write the .codes.npy sidecar of every audio file the records use"""
    tokenizer: str = option("", "the audio tokenizer: a HiggsAudioV2TokenizerModel folder or Hub "
                            "id (bosonai/higgs-audio-v2-tokenizer in transformers layout)")
    device: str = option("auto", "auto: cuda when a GPU is present", choices=("auto", "cpu", "cuda"))
    batch_size: int = option(16, "clips of equal length encoded together", min=1, max=4096)
    write_chatml: bool = option(False, "also write the records as ChatML JSONL next to the input "
                                "(NAME.chatml.jsonl)")


COMMANDS = {"check": CheckConfig, "prepare": PrepareConfig}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python data.py check DATA [--model CKPT] | python data.py prepare DATA "
              "--tokenizer AUDIO_TOKENIZER  (--help after the command lists its options)",
              file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if rest and not rest[0].startswith("-"):  # the data path comes first
        rest = ["--data", rest[0]] + rest[1:]
    cfg = parse(COMMANDS[command], rest, COMMANDS[command].__doc__)
    try:
        if not cfg.data:
            raise ConfigError(f"python data.py {command} DATA: name a data file or folder")
        if command == "check":
            return check(cfg.data, cfg.model, cfg.format, cfg.max_seq_len, cfg.allow_text_only,
                         cfg.workers or default_workers(), cfg.audio_checks)
        if not cfg.tokenizer:
            raise ConfigError("python data.py prepare needs --tokenizer AUDIO_TOKENIZER (a "
                              "HiggsAudioV2TokenizerModel folder or Hub id)")
        return prepare(cfg.data, cfg.tokenizer, cfg.format, cfg.device, cfg.batch_size,
                       cfg.write_chatml)
    except (UserError, OSError) as e:  # bad input: a message, never a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
