"""Health checks of generated speech for the usual fine-tuning failures, and optional scorers;
README "Listening to checkpoints" says what each failure means and what to do."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import soundfile as sf
import torch

from audio import (CODES_FRAME_RATE, CODES_HOP, CODES_SAMPLE_RATE, codes_path, decode_codes,
                   load_audio_tokenizer, resample)
from checkpoint import resolve

SPEAKING_RATE_FACTOR = 2.5  # a target this many times faster or slower than the median is odd
SILENT_RMS = 0.01  # -40 dBFS over a 40 ms frame: below any speech at a normal recording level
MAX_SILENT_FRACTION = 0.5  # pauses take 10-30% of natural speech; a majority of silence is broken
MAX_LOOP_SECONDS = 2.0  # whole frames repeating with a period <= 1 s for 2 s never happen in speech
MAX_LOOP_PERIOD = CODES_FRAME_RATE  # frames
MAX_WER = 0.5  # more than half the words wrong: another text, or unintelligible
MIN_SPEAKER_SIMILARITY = 0.75  # x-vector cosine; wavlm-base-plus-sv puts one speaker above ~0.86
MIN_SCORED_SECONDS = 0.5  # shorter audio is too little for the scorers' models


def frame_rms(wav: torch.Tensor) -> torch.Tensor:
    """RMS of each 40 ms codes frame."""
    n = len(wav) // CODES_HOP
    return wav[:n * CODES_HOP].view(n, CODES_HOP).float().pow(2).mean(1).sqrt()


def silence_code(reference: torch.Tensor | None, codes: torch.Tensor | None) -> int | None:
    """The first-codebook code of silence: the commonest over the reference's silent frames."""
    if reference is None or codes is None:
        return None
    silent = frame_rms(reference)[:codes.shape[1]] < SILENT_RMS
    return int(codes[0, :len(silent)][silent].mode().values) if silent.any() else None


def loop_seconds(codes: torch.Tensor) -> float:
    """Longest stretch of whole frames repeating with a period of 1..MAX_LOOP_PERIOD frames."""
    longest = 0
    for period in range(1, min(MAX_LOOP_PERIOD, codes.shape[1] - 1) + 1):
        run = 0
        for same in (codes[:, period:] == codes[:, :-period]).all(0).tolist():
            run = run + 1 if same else 0
            longest = max(longest, run + period if run else 0)
    return longest / CODES_FRAME_RATE


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over the reference's word count (case and punctuation ignored)."""
    ref, hyp = (re.findall(r"[\w']+", t.lower()) for t in (reference, hypothesis))
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)


class AsrScorer:
    """A transformers speech recognition model (Whisper, wav2vec2 CTC, ...) for the WER."""

    def __init__(self, path: str, device):
        from transformers import pipeline

        self.pipe = pipeline("automatic-speech-recognition", model=resolve(path, "--asr_model"),
                             device=device)
        self.rate = self.pipe.feature_extractor.sampling_rate

    def __call__(self, wav: torch.Tensor, text: str) -> tuple[float, str]:
        heard = self.pipe(resample(wav.float().numpy(), CODES_SAMPLE_RATE, self.rate))["text"] \
            if len(wav) >= MIN_SCORED_SECONDS * CODES_SAMPLE_RATE else ""
        return word_error_rate(text, heard), heard


class SpeakerScorer:
    """A transformers x-vector model (WavLMForXVector, ...) for speaker similarity (cosine)."""

    def __init__(self, path: str, device):
        from transformers import AutoFeatureExtractor, AutoModelForAudioXVector

        path = resolve(path, "--speaker_model")
        self.features = AutoFeatureExtractor.from_pretrained(path)
        self.model = AutoModelForAudioXVector.from_pretrained(path).eval().to(device)

    @torch.no_grad()
    def embed(self, wav: torch.Tensor) -> torch.Tensor:
        rate = self.features.sampling_rate
        x = resample(wav.float().numpy(), CODES_SAMPLE_RATE, rate)
        inputs = self.features(x, sampling_rate=rate, return_tensors="pt").to(self.model.device)
        return self.model(**inputs).embeddings[0]

    def __call__(self, reference: torch.Tensor, wav: torch.Tensor) -> float | None:
        if min(len(reference), len(wav)) < MIN_SCORED_SECONDS * CODES_SAMPLE_RATE:
            return None
        return float(torch.cosine_similarity(self.embed(reference), self.embed(wav), dim=0))


def health(codes: torch.Tensor, ended: bool, text: str, chars_per_second: float | None,
           reference: torch.Tensor | None = None, reference_codes: torch.Tensor | None = None,
           wav: torch.Tensor | None = None, asr=None, speaker=None) -> dict:
    """One generation's health figures and `failed` checks; without `wav`, silence by codes."""
    seconds = codes.shape[1] / CODES_FRAME_RATE
    expected = len(text) / chars_per_second if chars_per_second else None
    ratio = seconds / expected if expected else None
    if wav is not None:
        silent_frames = frame_rms(wav) < SILENT_RMS
    else:  # without audio: frames of the reference's silence code, if it has one
        code = silence_code(reference, reference_codes)
        silent_frames = codes[0] == code if code is not None else codes[0, :0]
    silent = float(silent_frames.float().mean()) if len(silent_frames) else None
    r = dict(ended=ended, seconds=seconds, expected_seconds=expected, duration_ratio=ratio,
             silent_fraction=silent, loop_seconds=loop_seconds(codes))
    if asr is not None and wav is not None:
        r["wer"], r["heard"] = asr(wav, text)
    if speaker is not None and wav is not None and reference is not None:
        r["speaker_similarity"] = speaker(reference, wav)
    similarity, low = r.get("speaker_similarity"), 1 / SPEAKING_RATE_FACTOR
    fails = dict(
        ended=not ended,
        duration=ratio is not None and not low <= ratio <= SPEAKING_RATE_FACTOR,
        silence=silent is not None and silent > MAX_SILENT_FRACTION,
        loop=r["loop_seconds"] >= MAX_LOOP_SECONDS,
        wer=r.get("wer") is not None and r["wer"] > MAX_WER,
        speaker=similarity is not None and similarity < MIN_SPEAKER_SIMILARITY)
    r["failed"] = [name for name, bad in fails.items() if bad]
    return r


def describe(r: dict) -> str:
    """One log line of health figures."""
    f = lambda key, fmt: "n/a" if r.get(key) is None else format(r[key], fmt)  # noqa: E731
    line = (f"{r['seconds']:.2f} s (expected {f('expected_seconds', '.2f')} s), "
            f"{'ended' if r['ended'] else 'NO EOS before the limit'}, silent "
            f"{f('silent_fraction', '.0%')}, loops {r['loop_seconds']:.2f} s")
    if "wer" in r:
        line += f", WER {r['wer']:.2f}"
    if "speaker_similarity" in r:
        line += f", speaker similarity {f('speaker_similarity', '.2f')}"
    return line + (f"  FAILED: {', '.join(r['failed'])}" if r["failed"] else "  ok")


class SampleWriter:
    """Writes NAME.codes.npy, NAME.wav (with an audio tokenizer), NAME.ref.wav and NAME.json."""

    def __init__(self, device, audio_tokenizer: str = "", asr_model: str = "",
                 speaker_model: str = ""):
        self.audio_tokenizer = load_audio_tokenizer(audio_tokenizer, device) \
            if audio_tokenizer else None
        self.asr = AsrScorer(asr_model, device) if asr_model else None
        self.speaker = SpeakerScorer(speaker_model, device) if speaker_model else None

    def write(self, prompts: list, results: list, out_dir: str, names: list[str]) -> list[dict]:
        """Decode, check and write generate.Generated results; the health figures of each."""
        os.makedirs(out_dir, exist_ok=True)
        rows = []
        for name, prompt, out in zip(names, prompts, results):
            stem = os.path.join(out_dir, name)
            np.save(codes_path(stem + ".wav"), out.codes.numpy())
            wav = decode_codes(self.audio_tokenizer, out.codes) if self.audio_tokenizer else None
            for path, audio in ((".wav", wav), (".ref.wav", prompt.reference)):
                if audio is not None:
                    sf.write(stem + path, audio.numpy(), CODES_SAMPLE_RATE)
            r = health(out.codes, out.ended, prompt.text, prompt.chars_per_second,
                       prompt.reference, prompt.reference_codes, wav, self.asr, self.speaker)
            with open(stem + ".json", "w", encoding="utf-8") as f:
                json.dump(dict(text=prompt.text, prompt=prompt.source, **r), f, indent=2,
                          ensure_ascii=False)
            rows.append(r)
        return rows
