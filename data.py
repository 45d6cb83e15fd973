"""Data: records become validated Samples, and the data command line:

    python data.py check DATA [--model CKPT|tiny]      # validate and report; exit 1 if invalid
    python data.py prepare DATA --tokenizer AUDIO_TOK  # write the .codes.npy sidecars

DATA is a data file or folder in any format of formats.py. Validation is shared by `check` and
training: every problem is reported with the file, the record, the field as the input names it,
and the fix; nothing is invented or silently dropped.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import torch

from audio import (CODES_SAMPLE_RATE, WHISPER_SAMPLE_RATE, audio_info, codes_path, encode_files,
                   expected_frames, frames_match, has_valid_sidecar, load_audio,
                   load_audio_tokenizer, load_codes, read_codes, resampled_length, window)
from chatml import (AudioPart, AudioSegment, DataError, Record, Sample, TextPart, audio_paths,
                    field_name, record_to_json, resolve_audio_path, tokenize_record)
from checkpoint import model_spec
from cli import option, parse
from device import resolve_device
from collate import expanded_length
from formats import FORMATS, Invalid, read_records
from health import SPEAKING_RATE_FACTOR
from model import HiggsConfig


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
    seconds = len(range(info.frames)[window(part, info.samplerate)]) / info.samplerate
    if seconds == 0:
        raise DataError(f"{where}: the offset/duration window ({part.offset}, {part.duration}) "
                        f"holds no audio of the {info.frames / info.samplerate:.2f} s file; fix "
                        "offset/duration")
    if needs_codes and (key, "codes") not in cache:
        codes = read_codes(part, record.base_dir, cfg.audio_num_codebooks, cfg.audio_codebook_size,
                           where)
        if not frames_match(codes.shape[1], info.frames, info.samplerate):
            want = expected_frames(info.frames, info.samplerate)
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
        raise DataError(f"{src}: no trainable assistant audio or text (other Higgs-Audio training "
                        f"scripts report \"Missing required message types\"): no assistant message{after}, "
                        "so there is nothing to learn; make the target speech an assistant audio "
                        "part" + (", or lower start_index" if start else ""))
    targets = [(i, j) for i in trained for j, p in enumerate(msgs[i].content)
               if isinstance(p, AudioPart)]
    if require_audio and not targets:
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


def _sidecar_spec(records: list[Record]):
    """(config, Counter of codebook counts) for checks without --model: the released shape with
    the codebook count most sidecars have; the other counts are reported."""
    paths = {codes_path(p) for p in audio_paths(records)}
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


def prepare(path: str, tokenizer_dir: str, fmt: str = "auto", device: str = "auto",
            batch_size: int = 16, write_chatml: bool = False) -> int:
    """`python data.py prepare`: encode every audio file the records use with the audio tokenizer
    and write its `.codes.npy` sidecar; valid sidecars are kept, so a rerun resumes. Returns the
    exit code (0 done, 1 some records or files failed)."""
    records, invalid, fmt = read_records(path, fmt)
    for x in invalid:
        print(f"skipped: {x.reason}")
    device, _ = resolve_device(device)
    model = load_audio_tokenizer(tokenizer_dir, device)
    K, size = model.config.num_quantizers, model.config.codebook_size
    files = sorted(audio_paths(records))
    todo, failed = [], []
    for f in files:
        try:
            info = audio_info(AudioPart(f), "", f)
            if has_valid_sidecar(f, info, K, size):
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
            for r in records:
                f.write(json.dumps(record_to_json(r, os.path.dirname(os.path.abspath(out))),
                                   ensure_ascii=False) + "\n")
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
                              "expansion (as train.py's)", min=16)
    allow_text_only: bool = option(False, "accept records whose trained turns hold only text "
                                   "(evaluation data)")


@dataclass
class PrepareConfig(DataInput):
    """Write the .codes.npy sidecar of every audio file the records use"""
    tokenizer: str = option("", "the audio tokenizer: a HiggsAudioV2TokenizerModel folder or Hub "
                            "id (bosonai/higgs-audio-v2-tokenizer in transformers layout)")
    device: str = option("auto", "auto: cuda when a GPU is present", choices=("auto", "cpu", "cuda"))
    batch_size: int = option(16, "clips of equal length encoded together", min=1)
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
            raise DataError(f"python data.py {command} DATA: name a data file or folder")
        if command == "check":
            return check(cfg.data, cfg.model, cfg.format, cfg.max_seq_len, cfg.allow_text_only)
        if not cfg.tokenizer:
            raise DataError("python data.py prepare needs --tokenizer AUDIO_TOKENIZER (a "
                            "HiggsAudioV2TokenizerModel folder or Hub id)")
        return prepare(cfg.data, cfg.tokenizer, cfg.format, cfg.device, cfg.batch_size,
                       cfg.write_chatml)
    except (DataError, OSError, ValueError) as e:  # bad input: a message, never a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
