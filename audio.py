"""Audio files and their codes: decoding and resampling as the official pipeline does, the
`.codes.npy` sidecars that hold each file's audio-tokenizer codes, and the audio tokenizer.

Codes are computed once, offline (`python data.py prepare`), and cached next to each audio file as
`<stem>.codes.npy`: an integer array (num_codebooks, T) at 25 frames per second.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import io
import json
import math
import os
import re
import struct
import sys
import time

import numpy as np
import soundfile as sf
import torch

from chatml import AudioPart, resolve_audio_path
from errors import ConfigError, DataError, need_file
from checkpoint import resolve

CODES_SAMPLE_RATE = 24000  # the audio tokenizer reads 24 kHz
CODES_HOP = 960  # samples per frame: 25 frames per second
CODES_FRAME_RATE = CODES_SAMPLE_RATE // CODES_HOP
WHISPER_SAMPLE_RATE = 16000


def codes_path(audio_path: str) -> str:
    return os.path.splitext(audio_path)[0] + ".codes.npy"


def resampled_length(num_samples: int, sample_rate: int, target_rate: int) -> int:
    """Length of `resample`'s output: librosa's ceil(n * (target / rate)) with the ratio in float64
    (one more than the exact ceil(n * target / rate) when the float ratio overshoots a whole
    number: from 11.025, 22.05 or 44.1 kHz to 24 kHz at some multiples of 147 samples)."""
    if sample_rate == target_rate:
        return num_samples
    return int(math.ceil(num_samples * (float(target_rate) / sample_rate)))


def resample(wav: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """The official resampler, bit for bit: `librosa.resample` at its default "soxr_hq", which the
    official collator (Whisper input, to 16 kHz), audio tokenizer and serve engine (to 24 kHz)
    use. That is soxr's HQ resampler, whose output (round(n * target / rate) samples) librosa
    zero-pads, by at most one sample, to `resampled_length`. float32 in, float32 out."""
    import soxr

    if sample_rate == target_rate:
        return wav
    out = soxr.resample(wav, sample_rate, target_rate, quality="HQ")
    n = resampled_length(len(wav), sample_rate, target_rate)
    return out[:n] if len(out) >= n else np.pad(out, (0, n - len(out)))


def expected_frames(num_samples: int, sample_rate: int) -> int:
    """Frames the Higgs-Audio v2 audio tokenizer gives for audio of `num_samples` at `sample_rate`:
    of the n samples at 24 kHz that `resample` gives, ceil(n / 960), except floor(n / 960) when
    n mod 960 is 1..118 (measured, see demo/make_demo.py)."""
    n = resampled_length(num_samples, sample_rate, CODES_SAMPLE_RATE)
    return n // CODES_HOP if 1 <= n % CODES_HOP <= 118 else -(-n // CODES_HOP)


def frames_match(frames: int, num_samples: int, sample_rate: int) -> bool:
    """Whether `frames` code frames belong to audio of `num_samples` at `sample_rate`: one frame
    either way is allowed, since a resampler giving one sample more or less moves a length across
    the edges of expected_frames' rule."""
    return abs(frames - expected_frames(num_samples, sample_rate)) <= 1


def window(part: AudioPart, rate: float, round_stop=round) -> slice:
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
    start = "" if os.path.isabs(part.audio_url) else f" (relative paths start at {base_dir})"
    need_file(path, f"{where}: audio file", f"fix the path{start} or add the file")
    return path, path


AudioInfo = collections.namedtuple("AudioInfo", "samplerate channels frames")


def wav_info(path: str) -> AudioInfo | None:
    """The header of a plain PCM or float WAV file, read directly (soundfile's open costs more
    than the rest of a record's validation); None for anything else, which soundfile reads."""
    with open(path, "rb") as f:
        head = f.read(4096)
        size = f.seek(0, 2)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    at, fmt = 12, None
    while at + 8 <= len(head):
        kind, n = head[at:at + 4], int.from_bytes(head[at + 4:at + 8], "little")
        if kind == b"fmt " and n >= 16:
            tag, channels, rate = struct.unpack_from("<HHI", head, at + 8)
            block = struct.unpack_from("<H", head, at + 20)[0]
            fmt = (channels, rate, block) if tag in (1, 3) and block else None
        elif kind == b"data":
            if fmt is None or n == 0xFFFFFFFF:
                return None
            return AudioInfo(fmt[1], fmt[0], min(n, size - at - 8) // fmt[2])
        at += 8 + n + (n & 1)
    return None


def audio_info(part: AudioPart, base_dir: str, where: str) -> AudioInfo:
    """The header of the part's audio (rate, channels, frames), without decoding."""
    source, label = _audio_source(part, base_dir, where)
    try:
        info = (isinstance(source, str) and wav_info(source)) or \
            AudioInfo(*(getattr(sf.info(source), k) for k in AudioInfo._fields))
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise DataError(f"{where}: cannot read audio {label}: {e}; convert it to WAV or FLAC")
    if info.frames <= 0:
        raise DataError(f"{where}: audio {label} is empty (no samples); re-export it or remove "
                        "the record")
    return info


def load_audio(part: AudioPart, base_dir: str, sample_rate: int, where: str) -> torch.Tensor:
    """Mono float32 waveform at `sample_rate`: soundfile decode to float32 and the mean over
    channels (the samples of the official `librosa.load(path, mono=True)`), then `resample`."""
    source, label = _audio_source(part, base_dir, where)
    try:
        data, sr = sf.read(source, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{where}: cannot decode audio {label}: {e}; convert it to WAV or FLAC")
    data = data[window(part, sr)]
    if len(data) == 0:
        raise DataError(f"{where}: audio {label} is empty (or its offset/duration window is)")
    return torch.from_numpy(np.ascontiguousarray(resample(data.mean(axis=1), sr, sample_rate)))


def provenance_path(audio_path: str) -> str:
    """`<stem>.codes.json`: what prepare encoded (the audio's size, time and SHA-256, the tokenizer)."""
    return os.path.splitext(audio_path)[0] + ".codes.json"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stale_reason(audio: str) -> str | None:
    """Why the codes sidecar of `audio` no longer encodes it, or None. Codes (and their
    provenance file) written after the audio are its codes (make's rule). Older ones are, after
    a copy or a checkout, when the provenance file that prepare writes says that the audio is
    the one encoded: the same size, and the same time or content."""
    now = os.stat(audio)
    try:
        prov = os.stat(provenance_path(audio)).st_mtime_ns
    except FileNotFoundError:
        prov = None
    if os.stat(codes_path(audio)).st_mtime_ns >= now.st_mtime_ns and \
            (prov is None or prov >= now.st_mtime_ns):
        return None
    if prov is None:
        return "the codes are older than the audio (changed after they were encoded)"
    try:
        with open(provenance_path(audio), "rb") as f:
            was = json.loads(f.read())
    except (OSError, ValueError) as e:
        return f"its provenance file {provenance_path(audio)} is unreadable ({e})"
    if was.get("audio_bytes") != now.st_size:
        return f"they encode {was.get('audio_bytes')} bytes of audio, the file has {now.st_size}"
    if was.get("audio_mtime_ns") != now.st_mtime_ns and was.get("audio_sha256") != file_sha256(audio):
        return "the audio's content changed after it was encoded"
    return None


NPY_HEADER = re.compile(r"\{'descr': '([^']+)', 'fortran_order': (True|False), 'shape': \(([\d, ]*)\), \}")


def npy_header(path: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of a .npy file from its header alone: the header np.save writes is parsed
    directly (numpy parses it as Python source, slower than the rest of a record's checks)."""
    with open(path, "rb") as f:
        head = f.read(256)
    m = NPY_HEADER.match(head[10:].decode("latin1")) if head[:8] == b"\x93NUMPY\x01\x00" else None
    if m is None or m.group(2) == "True":
        with open(path, "rb") as f:
            read = np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(f) == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        return shape, dtype
    return tuple(int(x) for x in m.group(3).split(",") if x.strip()), np.dtype(m.group(1))


def read_codes(part: AudioPart, base_dir: str, num_codebooks: int, codebook_size: int, where: str,
               values: bool = True) -> tuple[tuple, np.ndarray | None]:
    """(shape, codes) of the part's whole `<stem>.codes.npy` sidecar, checked: an integer .npy
    array (>= num_codebooks, T) that still encodes its audio. `values` also reads the first
    num_codebooks rows (int16, or int32 for large codebooks) and checks them against
    [0, codebook_size); without it only the header is read (codes None)."""
    if part.audio_url is None:
        raise DataError(f"{where}: audio given as raw_audio has no codes sidecar; save it to a "
                        "file, reference it with audio_url and run `python data.py prepare`")
    audio = resolve_audio_path(part, base_dir)
    path = need_file(codes_path(audio), f"{where}: audio codes", f"for {part.audio_url}, create "
                     "them with `python data.py prepare DATA --tokenizer AUDIO_TOKENIZER` (DATA: this "
                     "data file or folder)")
    fix = "delete it and rerun `python data.py prepare`"
    try:
        shape, dtype = npy_header(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise DataError(f"{where}: cannot read codes {path}: {e} (a .npy array is needed); {fix}")
    if dtype.hasobject:
        raise DataError(f"{where}: cannot read codes {path}: it holds Python objects (a pickle), "
                        f"not integers; {fix}")
    if len(shape) != 2 or not np.issubdtype(dtype, np.integer):
        raise DataError(f"{where}: codes {path} must be an integer array (num_codebooks, T), got "
                        f"{dtype} {shape}; {fix}")
    if shape[0] < num_codebooks:
        raise DataError(f"{where}: codes {path} have {shape[0]} codebooks, the model needs "
                        f"{num_codebooks}; re-encode with the model's audio tokenizer")
    stale = stale_reason(audio)
    if stale:
        raise DataError(f"{where}: codes {path} are stale: {stale}; rerun `python data.py "
                        "prepare` (it re-encodes stale codes)")
    return shape, codes_values(path, num_codebooks, codebook_size, where) if values else None


def codes_values(path: str, num_codebooks: int, codebook_size: int, where: str,
                 frames: slice = slice(None)) -> np.ndarray:
    """The first num_codebooks rows of a sidecar (its `frames`), checked against
    [0, codebook_size), as int16 (int32 for larger codebooks)."""
    try:
        codes = np.load(path, mmap_mode="r", allow_pickle=False)[:num_codebooks, frames]
        lo, hi = (int(codes.min()), int(codes.max())) if codes.size else (0, 0)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{where}: cannot read codes {path}: {e}; delete it and rerun `python "
                        "data.py prepare`")
    if lo < 0 or hi >= codebook_size:
        raise DataError(f"{where}: codes {path} hold values in [{lo}, {hi}], outside "
                        f"[0, {codebook_size}); re-encode with the model's audio tokenizer")
    return codes.astype(np.int16 if codebook_size <= 2 ** 15 else np.int32)


def load_codes(part: AudioPart, base_dir: str, num_codebooks: int, codebook_size: int,
               where: str) -> torch.Tensor:
    """(K, T) codes from the `<stem>.codes.npy` sidecar, cut to the part's offset/duration."""
    _, codes = read_codes(part, base_dir, num_codebooks, codebook_size, where)
    codes = codes[:, window(part, CODES_FRAME_RATE, math.ceil)]
    if codes.shape[1] == 0:
        raise DataError(f"{where}: codes of {part.audio_url} are empty; the audio (or its "
                        "offset/duration window) has no frames")
    return torch.from_numpy(np.ascontiguousarray(codes))


def save_codes(audio: str, codes: np.ndarray, tokenizer: str) -> None:
    """Write a sidecar whole or not at all (an interrupted prepare leaves no truncated file), then
    its provenance: the audio it encodes and the tokenizer that encoded it."""
    path = codes_path(audio)
    with open(path + ".tmp", "wb") as f:
        np.save(f, codes.astype(np.int16 if codes.max(initial=0) < 2 ** 15 else np.int32))
    os.replace(path + ".tmp", path)
    write_provenance(audio, tokenizer)


def write_provenance(audio: str, tokenizer: str) -> None:
    """`<stem>.codes.json`: the audio its sidecar encodes (size, time, SHA-256) and the tokenizer."""
    st = os.stat(audio)
    with open(provenance_path(audio) + ".tmp", "w") as f:
        json.dump(dict(audio_bytes=st.st_size, audio_mtime_ns=st.st_mtime_ns,
                       audio_sha256=file_sha256(audio), tokenizer=tokenizer), f)
    os.replace(provenance_path(audio) + ".tmp", provenance_path(audio))


# ----------------------------------------------------------------------------------------------
# The audio tokenizer (transformers' HiggsAudioV2TokenizerModel)


def load_audio_tokenizer(path: str, device):
    """transformers' HiggsAudioV2TokenizerModel from a `save_pretrained` folder, in eval mode."""
    path = resolve(path, "--audio_tokenizer")
    config = need_file(os.path.join(path, "config.json"), "audio tokenizer config",
                       "--tokenizer / --audio_tokenizer is a folder holding a transformers "
                       "HiggsAudioV2TokenizerModel (config.json + model.safetensors)", ConfigError)
    from transformers import HiggsAudioV2TokenizerModel

    model = HiggsAudioV2TokenizerModel.from_pretrained(path).eval().to(device)
    c = model.config
    if (c.sample_rate, c.hop_length) != (CODES_SAMPLE_RATE, CODES_HOP):
        raise ConfigError(f"{path}: a {c.sample_rate} Hz tokenizer with hop {c.hop_length}; Higgs-"
                          f"Audio v2 codes come from the {CODES_SAMPLE_RATE} Hz, hop {CODES_HOP} "
                          "one (25 frames/s)")
    # which tokenizer wrote a sidecar (its provenance): its config and the sizes of its weights
    weights = sorted((n, os.path.getsize(os.path.join(path, n))) for n in os.listdir(path)
                     if n.endswith(".safetensors"))
    with open(config, "rb") as f:
        model.fingerprint = hashlib.sha256(f.read() + repr(weights).encode()).hexdigest()[:16]
    return model


@torch.no_grad()
def decode_codes(audio_tokenizer, codes: torch.Tensor) -> torch.Tensor:
    """24 kHz mono waveform of (K, T) codes."""
    if not codes.shape[1]:
        return torch.zeros(0)
    wav = audio_tokenizer.decode(codes[None].to(audio_tokenizer.device), return_dict=False)
    return wav[0, 0].float().cpu()


def has_valid_sidecar(audio: str, info, audio_tokenizer) -> bool:
    """Whether `audio` already has the codes this tokenizer would write (a rerun keeps them): not
    stale, of the right shape, and written by this tokenizer (as far as its provenance tells)."""
    c = audio_tokenizer.config
    try:
        shape, _ = read_codes(AudioPart(audio), "", c.num_quantizers, c.codebook_size, audio)
        with open(provenance_path(audio)) as f:
            tokenizer = json.load(f).get("tokenizer")
    except FileNotFoundError:
        tokenizer = None
    except (DataError, ValueError):
        return False
    return tokenizer in (None, audio_tokenizer.fingerprint) and shape[0] == c.num_quantizers and \
        frames_match(shape[1], info.frames, info.samplerate)


def _equal_length_batches(files: list[str], batch_size: int, failed: list):
    """Decoded 24 kHz clips (path, waveform) in batches of equal length: the tokenizer takes no
    padding mask (its HuBERT attends over the whole input), so padding would change the codes."""
    batch = []
    for path in files:
        try:
            wav = load_audio(AudioPart(path), "", CODES_SAMPLE_RATE, path)
        except DataError as e:
            failed.append(str(e))
            continue
        if batch and (len(wav) != len(batch[0][1]) or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append((path, wav))
    if batch:
        yield batch


@torch.no_grad()
def encode_files(audio_tokenizer, files: list[str], batch_size: int, failed: list) -> int:
    """Encode each audio file and write its sidecar; clips of equal length share a batch. Files
    that cannot be encoded are appended to `failed` with the reason. Returns the count encoded."""
    t0, last, done = time.time(), 0.0, 0
    for batch in _equal_length_batches(files, batch_size, failed):
        x = torch.stack([w for _, w in batch])[:, None].to(audio_tokenizer.device)
        try:
            codes = audio_tokenizer.encode(x, return_dict=False).cpu().numpy()
        except RuntimeError as e:  # e.g. out of memory on a very long file
            failed += [f"{f}: the audio tokenizer failed: {e}" for f, _ in batch]
            continue
        for (f, wav), c in zip(batch, codes):
            if not frames_match(c.shape[1], len(wav), CODES_SAMPLE_RATE):
                want = expected_frames(len(wav), CODES_SAMPLE_RATE)
                raise DataError(f"encoded {f} to {c.shape[1]} frames, expected {want} at 25 frames/s; "
                                "is the tokenizer a Higgs-Audio v2 audio tokenizer?")
            save_codes(f, c, audio_tokenizer.fingerprint)
        done += len(batch)
        if time.time() - last > 1 or done == len(files):
            last, rate = time.time(), done / max(time.time() - t0, 1e-9)
            print(f"\rencoded {done}/{len(files)} files, {rate:.1f} files/s, "
                  f"{(len(files) - done) / rate:.0f} s left   ", end="", file=sys.stderr, flush=True)
    if files:
        print(file=sys.stderr)
    return done
