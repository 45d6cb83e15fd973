"""Zero-shot voice cloning with our model, and health checks that catch the usual fine-tuning
failures (silence, a stream that never ends, loops) in what a checkpoint actually says.

    python generate.py --model CKPT [--adapter DIR] --ref_audio REF.wav --ref_text "..." \\
        --text "..." ["..." ...] --out OUT.wav [--tokenizer AUDIO_TOKENIZER_DIR]
    python generate.py --model CKPT [--adapter DIR] --data PROMPTS.jsonl --out_dir DIR [...]

Mirrors the official serve engine + `HiggsAudioModel.generate` (SPEC section 11): the ChatML
prompt, then `<|start_header_id|>assistant<|end_header_id|>\\n\\n<|audio_out_bos|>`; the first
audio position is fed an all-stream-BOS frame, each step feeds the last frame and picks the next
one per codebook; with the delay pattern codebook k is held at BOS for its first k frames, and
once a codebook emits stream EOS the codebooks before it are forced to EOS and one more codebook
is forced per step (the official countdown, including its one-step lag) until all have ended.
Output: `OUT.codes.npy` (delay reverted, stream BOS/EOS dropped), and with `--tokenizer` (a
transformers `HiggsAudioV2TokenizerModel` folder) the 24 kHz `OUT.wav`; `OUT.ref.wav` is the
reference and `OUT.json` the text and the health figures. Generation stops when the audio ends: the official loop would go on
with text tokens (`<|audio_eos|>`, `<|eot_id|>`) that carry nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch

from collate import IGNORE, Collator
from data import (CODES_FRAME_RATE, CODES_HOP, CODES_SAMPLE_RATE, SPEAKING_RATE_FACTOR, AudioPart,
                  DataError, Record, Sample, TextPart, save_codes, cloning_record, codes_path,
                  load_audio, load_records, make_sample, record_from_json)
from model import KVCache

GENERATION_PREFIX = "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>"

# Health thresholds (README "Listening to checkpoints")
SILENT_RMS = 0.01  # -40 dBFS over a 40 ms frame: below any speech at a normal recording level
MAX_SILENT_FRACTION = 0.5  # pauses take 10-30% of natural speech; a majority of silence is broken
MAX_LOOP_SECONDS = 2.0  # whole frames repeating with a period <= 1 s for 2 s never happen in speech
MAX_LOOP_PERIOD = CODES_FRAME_RATE  # frames
MAX_WER = 0.5  # more than half the words wrong: another text, or unintelligible
MIN_SPEAKER_SIMILARITY = 0.75  # x-vector cosine; wavlm-base-plus-sv puts one speaker above ~0.86
MIN_SCORED_SECONDS = 0.5  # shorter audio is too little for the scorers' models


@dataclass
class Sampling:
    """Decoding settings. The defaults are the official README example's (temperature 0.3, top-k
    50, top-p 0.95) and the serve engine's repetition-aware sampling (a codebook whose code
    already occurs ras_max_repeat times in the last ras_window frames is re-drawn from the raw
    distribution); temperature 0 is greedy, ras_window 0 turns RAS off."""
    temperature: float = 0.3
    top_k: int = 50
    top_p: float = 0.95
    ras_window: int = 7
    ras_max_repeat: int = 2
    seed: int = 0
    max_seconds: float = 30.0


@dataclass
class Prompt:
    """A generation request and what the health checks need to judge its output."""
    sample: Sample  # prompt tokens ending in <|audio_out_bos|>, with the context's audio codes
    text: str  # the text to speak
    reference: torch.Tensor | None  # the voice reference, mono 24 kHz (None: no file to read)
    reference_codes: torch.Tensor | None  # its codes (K, T)
    chars_per_second: float | None  # speaking rate the expected duration is measured with
    source: str = ""


@dataclass
class Generated:
    stream: torch.Tensor  # (K, L) every frame fed, from the all-BOS one (delay pattern applied)
    codes: torch.Tensor  # (K, T) audio codes for the audio tokenizer
    ended: bool  # every codebook reached stream EOS before the frame limit


# ----------------------------------------------------------------------------------------------
# Prompts


def prompt_of(record: Record, tokenizer, cfg) -> Prompt:
    """A record's generation prompt: its turns up to the last user turn (a cloning record's target
    is left out), then the assistant header and <|audio_out_bos|>, tokenized and collated exactly
    as in training. The reference is the last audio of those turns."""
    users = [i for i, m in enumerate(record.messages) if m.role == "user"]
    if not users:
        raise DataError(f"{record.source}: no user turn holding the text to speak")
    turns = record.messages[:users[-1] + 1]
    sample = make_sample(dataclasses.replace(record, messages=turns, start_index=None), tokenizer,
                         cfg)
    suffix = torch.tensor(tokenizer.encode(GENERATION_PREFIX, add_special_tokens=False))
    sample = Sample(torch.cat([sample.input_ids, suffix]),
                    torch.cat([sample.label_ids, torch.full_like(suffix, IGNORE)]),
                    sample.audios, sample.source)
    parts = [p for m in turns for p in m.content if isinstance(p, AudioPart)]
    reference, codes = None, None
    if parts:
        codes = sample.audios[-1].codes
        try:  # the waveform is only for the checks; the prompt needs the codes alone
            reference = load_audio(parts[-1], record.base_dir, CODES_SAMPLE_RATE, record.source)
        except DataError:
            pass
    return Prompt(sample, _text(turns[-1]), reference, codes, _speaking_rate(turns, sample),
                  record.source)


def _text(message) -> str:
    return " ".join(p.text.strip() for p in message.content if isinstance(p, TextPart))


def _speaking_rate(turns, sample: Sample) -> float | None:
    """Characters per second over the text-only user turns answered by one assistant audio
    (the transcribed references)."""
    chars, seconds, audio_i = 0, 0.0, 0
    for i, m in enumerate(turns):
        audios = [p for p in m.content if isinstance(p, AudioPart)]
        before = turns[i - 1] if i else None
        if m.role == "assistant" and len(m.content) == len(audios) == 1 and before and \
                before.role == "user" and all(isinstance(p, TextPart) for p in before.content):
            chars += len(_text(before))
            seconds += sample.audios[audio_i].codes.shape[1] / CODES_FRAME_RATE
        audio_i += len(audios)
    return chars / seconds if seconds else None


def load_prompts(path: str, count: int, tokenizer, cfg) -> list[Prompt]:
    """Prompts of the first `count` records of a data file (any format data.py reads). Their
    expected durations use the data set's speaking rate: the median over all prompts."""
    prompts = [prompt_of(r, tokenizer, cfg) for r in load_records(path)[:count]]
    rates = [p.chars_per_second for p in prompts if p.chars_per_second]
    median = float(np.median(rates)) if rates else None
    return [dataclasses.replace(p, chars_per_second=median) for p in prompts]


def cloning_prompt(ref_audio: str, ref_text: str, text: str, tokenizer, cfg) -> Prompt:
    """The official zero-shot cloning prompt (SPEC section 3) for a reference clip."""
    messages = cloning_record(ref_text, os.path.abspath(ref_audio), text, "")["messages"][:4]
    return prompt_of(record_from_json({"messages": messages}, "command line", os.getcwd()),
                     tokenizer, cfg)


# ----------------------------------------------------------------------------------------------
# Decoding


def pick(scores: torch.Tensor, s: Sampling, generator) -> torch.Tensor:
    """Per-codebook choice from (..., V) logits: greedy, or temperature / top-k / top-p sampling
    (transformers' warpers, in that order)."""
    if s.temperature <= 0:
        return scores.argmax(-1)
    x = scores / s.temperature
    if s.top_k > 0:
        kth = x.topk(min(s.top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    if s.top_p < 1:
        ordered, order = x.sort(-1)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - s.top_p
        drop[..., -1] = False
        x = x.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return draw(x, generator)


def draw(scores: torch.Tensor, generator) -> torch.Tensor:
    probs = scores.softmax(-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1,
                             generator=generator).view(probs.shape[:-1])


@torch.no_grad()
def generate(model, prompts: list[Prompt], s: Sampling, use_cache: bool = True) -> list[Generated]:
    """Voice-cloning generation for a batch of prompts (right-padded; each row keeps its own
    positions). use_cache=False recomputes the whole prefix every step (the cache's reference)."""
    cfg = model.cfg
    K, bos, eos = cfg.audio_num_codebooks, cfg.audio_stream_bos_id, cfg.audio_stream_eos_id
    device = model.norm.weight.device
    batch = Collator(cfg)([p.sample for p in prompts]).to(device)
    B = len(prompts)
    h = model.embed(batch)
    chunks = [(h, batch.position_ids, batch.audio_mask, batch.attention_mask)]
    cache = KVCache(len(model.layers))
    if use_cache:
        model.forward_cached(*chunks[0], cache)
    # repetition-aware sampling looks back over each row's audio-out frames, reference included
    out_codes = batch.audio_codes[torch.isin(batch.audio_index, batch.audio_out_index)]
    rows = batch.audio_out_index // batch.input_ids.shape[1]
    window = max(s.ras_window, 1)
    recent = torch.full((B, window, K), -1, dtype=torch.long, device=device)
    for b in range(B):
        mine = out_codes[rows == b][-window:]
        recent[b, window - len(mine):] = mine
    generator = torch.Generator(device).manual_seed(s.seed)
    frame = torch.full((B, K), bos, dtype=torch.long, device=device)
    stream = [frame]
    n_delay = torch.zeros(B, dtype=torch.long, device=device)
    remaining = torch.full((B,), -1, dtype=torch.long, device=device)  # EOS countdown; -1 = none
    active = torch.ones(B, dtype=torch.bool, device=device)
    lengths = torch.ones(B, dtype=torch.long, device=device)  # columns of each row's stream
    k = torch.arange(K, device=device)
    start = batch.attention_mask.sum(1)
    for t in range(round(s.max_seconds * CODES_FRAME_RATE)):
        step = (model.embed_audio_codes(frame).to(h.dtype)[:, None], (start + t)[:, None],
                torch.ones_like(active)[:, None], active[:, None])
        if use_cache:
            hidden = model.forward_cached(*step, cache)
        else:
            chunks.append(step)
            hidden = model.forward_cached(*(torch.cat(c, 1) for c in zip(*chunks)),
                                          KVCache(len(model.layers)))
        logits = model.audio_logits(hidden[:, -1]).float()  # (B, K, rows)
        new = pick(logits, s, generator)
        recent = torch.cat([recent[:, 1:], frame[:, None]], 1)
        if s.ras_window > 0:
            repeats = (recent == new[:, None]).sum(1)
            new = torch.where(repeats >= s.ras_max_repeat, draw(logits, generator), new)
        if cfg.use_delay_pattern:  # _sample_audio_tokens of the official model
            new = torch.where(k > n_delay[:, None], bos, new)
            counting = remaining >= 0
            new = torch.where(counting[:, None] & (k < K - remaining[:, None]), eos, new)
            is_eos = new == eos
            first = is_eos.long().argmax(1)
            begins = ~counting & is_eos.any(1)
            new = torch.where(begins[:, None] & (k < first[:, None]), eos, new)
            remaining = torch.where(counting, remaining - 1, torch.where(begins, K - 1 - first,
                                                                         remaining))
            n_delay = (n_delay + 1).clamp(max=K - 1)
            ending = remaining == 0
        else:  # the official loop never ends a stream without the delay pattern; this does
            ending = (new == eos).any(1)
            new = torch.where(ending[:, None], eos, new)
        frame = torch.where(active[:, None], new, frame)
        stream.append(frame)
        lengths = torch.where(active, len(stream), lengths)
        active = active & ~ending
        if not active.any():
            break
    stream, lengths, ended = torch.stack(stream, 2).cpu(), lengths.tolist(), (~active).tolist()
    return [Generated(stream[b, :, :lengths[b]], revert(stream[b, :, :lengths[b]], cfg), ended[b])
            for b in range(B)]


def revert(stream: torch.Tensor, cfg) -> torch.Tensor:
    """Audio codes of a stream, as the official serve engine makes them: codebook k shifted back
    by k, the first (BOS) and last (EOS, or the cut of a stream that hit the limit) columns
    dropped, clipped to real codes."""
    K, L = stream.shape
    if cfg.use_delay_pattern:
        T = max(L - K + 1, 0)
        stream = torch.stack([stream[k, k:k + T] for k in range(K)])
    return stream[:, 1:-1].clamp(0, cfg.audio_codebook_size - 1)


# ----------------------------------------------------------------------------------------------
# Health checks


def frame_rms(wav: torch.Tensor) -> torch.Tensor:
    """RMS of each 40 ms codes frame (960 samples at 24 kHz)."""
    n = len(wav) // CODES_HOP
    return wav[:n * CODES_HOP].view(n, CODES_HOP).float().pow(2).mean(1).sqrt()


def silence_code(reference: torch.Tensor | None, codes: torch.Tensor | None) -> int | None:
    """The first-codebook code the audio tokenizer gives silence, measured on the reference: the
    most common one over its near-silent frames (None: the reference has none, or no waveform)."""
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
    """A transformers speech recognition model (Whisper, wav2vec2 CTC, ...) for the word error
    rate of the generated speech against the prompt text."""

    def __init__(self, path: str, device):
        from transformers import pipeline

        self.pipe = pipeline("automatic-speech-recognition", model=path, device=device)
        self.rate = self.pipe.feature_extractor.sampling_rate

    def __call__(self, wav: torch.Tensor, text: str) -> tuple[float, str]:
        import torchaudio.functional as AF

        heard = self.pipe(AF.resample(wav.float(), CODES_SAMPLE_RATE, self.rate).numpy())["text"] \
            if len(wav) >= MIN_SCORED_SECONDS * CODES_SAMPLE_RATE else ""
        return word_error_rate(text, heard), heard


class SpeakerScorer:
    """A transformers x-vector speaker-verification model (WavLMForXVector, ...): cosine
    similarity of the reference's and the generated speech's speaker embeddings."""

    def __init__(self, path: str, device):
        from transformers import AutoFeatureExtractor, AutoModelForAudioXVector

        self.features = AutoFeatureExtractor.from_pretrained(path)
        self.model = AutoModelForAudioXVector.from_pretrained(path).eval().to(device)

    @torch.no_grad()
    def embed(self, wav: torch.Tensor) -> torch.Tensor:
        import torchaudio.functional as AF

        rate = self.features.sampling_rate
        x = AF.resample(wav.float(), CODES_SAMPLE_RATE, rate).numpy()
        inputs = self.features(x, sampling_rate=rate, return_tensors="pt").to(self.model.device)
        return self.model(**inputs).embeddings[0]

    def __call__(self, reference: torch.Tensor, wav: torch.Tensor) -> float | None:
        if min(len(reference), len(wav)) < MIN_SCORED_SECONDS * CODES_SAMPLE_RATE:
            return None
        return float(torch.cosine_similarity(self.embed(reference), self.embed(wav), dim=0))


def health(prompt: Prompt, out: Generated, wav: torch.Tensor | None = None, asr=None,
           speaker=None) -> dict:
    """The health figures of one generation and `failed`, the names of the checks it fails."""
    seconds = out.codes.shape[1] / CODES_FRAME_RATE
    expected = len(prompt.text) / prompt.chars_per_second if prompt.chars_per_second else None
    ratio = seconds / expected if expected else None
    if wav is not None:
        rms = frame_rms(wav)
        silent = float((rms < SILENT_RMS).float().mean()) if len(rms) else None
    else:
        code = silence_code(prompt.reference, prompt.reference_codes)
        silent = float((out.codes[0] == code).float().mean()) \
            if code is not None and out.codes.shape[1] else None
    r = dict(ended=out.ended, seconds=seconds, expected_seconds=expected, duration_ratio=ratio,
             silent_fraction=silent, loop_seconds=loop_seconds(out.codes))
    if asr is not None and wav is not None:
        r["wer"], r["heard"] = asr(wav, prompt.text)
    if speaker is not None and wav is not None and prompt.reference is not None:
        r["speaker_similarity"] = speaker(prompt.reference, wav)
    fails = {
        "ended": not out.ended,
        "duration": ratio is not None and
        not 1 / SPEAKING_RATE_FACTOR <= ratio <= SPEAKING_RATE_FACTOR,
        "silence": silent is not None and silent > MAX_SILENT_FRACTION,
        "loop": r["loop_seconds"] >= MAX_LOOP_SECONDS,
        "wer": r.get("wer") is not None and r["wer"] > MAX_WER,
        "speaker": r.get("speaker_similarity") is not None and
        r["speaker_similarity"] < MIN_SPEAKER_SIMILARITY,
    }
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


# ----------------------------------------------------------------------------------------------
# Generate, decode, check and write


class Sampler:
    """Generates a set of prompts with a model and writes, per prompt, `NAME.codes.npy`, the
    decoded `NAME.wav` (with an audio tokenizer), the reference as `NAME.ref.wav` and `NAME.json`
    (text and health figures). Used by `train.py --sample_every` and this script."""

    def __init__(self, sampling: Sampling, device, audio_tokenizer: str = "", asr_model: str = "",
                 speaker_model: str = ""):
        from data import load_audio_tokenizer

        self.sampling = sampling
        self.audio_tokenizer = load_audio_tokenizer(audio_tokenizer, device) \
            if audio_tokenizer else None
        self.asr = AsrScorer(asr_model, device) if asr_model else None
        self.speaker = SpeakerScorer(speaker_model, device) if speaker_model else None

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if not codes.shape[1]:
            return torch.zeros(0)
        wav = self.audio_tokenizer.decode(codes[None].to(self.audio_tokenizer.device),
                                          return_dict=False)
        return wav[0, 0].float().cpu()

    def __call__(self, model, prompts: list[Prompt], out_dir: str, names: list[str]) -> list[dict]:
        """Health figures of each prompt's generation (in eval mode; the mode is restored)."""
        was_training = model.training
        model.eval()
        try:
            results = generate(model, prompts, self.sampling)
        finally:
            model.train(was_training)
        os.makedirs(out_dir, exist_ok=True)
        rows = []
        for name, prompt, out in zip(names, prompts, results):
            stem = os.path.join(out_dir, name)
            np.save(codes_path(stem + ".wav"), out.codes.numpy())
            wav = self.decode(out.codes) if self.audio_tokenizer is not None else None
            if wav is not None:
                sf.write(stem + ".wav", wav.numpy(), CODES_SAMPLE_RATE)
            if prompt.reference is not None:
                sf.write(stem + ".ref.wav", prompt.reference.numpy(), CODES_SAMPLE_RATE)
            r = health(prompt, out, wav, self.asr, self.speaker)
            with open(stem + ".json", "w", encoding="utf-8") as f:
                json.dump(dict(text=prompt.text, prompt=prompt.source, **r), f, indent=2,
                          ensure_ascii=False)
            rows.append(r)
        return rows


@torch.no_grad()
def encode_reference(path: str, audio_tokenizer) -> None:
    """Write a reference clip's missing codes sidecar with the audio tokenizer, as
    `python data.py prepare` would."""
    wav = load_audio(AudioPart(path), "", CODES_SAMPLE_RATE, path)
    codes = audio_tokenizer.encode(wav[None, None].to(audio_tokenizer.device), return_dict=False)
    save_codes(codes_path(path), codes[0].cpu().numpy())
    print(f"encoded {path} -> {codes_path(path)}")


def main(argv=None) -> int:
    from data import model_spec
    from lora import load_adapter
    from train import Dist, TrainConfig, build, resolve_device  # here: train imports this module

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (official, transformers or "
                   "merged layout, with its text tokenizer), or tiny")
    p.add_argument("--adapter", help="LoRA adapter folder (adapter_model.safetensors)")
    p.add_argument("--ref_audio", help="reference voice clip; its codes from REF.codes.npy, or "
                   "encoded with --tokenizer")
    p.add_argument("--ref_text", help="transcript of the reference clip")
    p.add_argument("--text", nargs="+", help="text(s) to speak, generated as one batch")
    p.add_argument("--out", help="OUT.wav: writes OUT.codes.npy, OUT.json and, with --tokenizer, "
                   "OUT.wav (several texts: OUT_1.wav, ...)")
    p.add_argument("--data", help="instead: prompts from a data file (any format train.py reads)")
    p.add_argument("--count", type=int, default=4, help="--data: its first N records")
    p.add_argument("--out_dir", help="--data: output folder (sampleI.* files)")
    p.add_argument("--tokenizer", default="", help="HiggsAudioV2TokenizerModel folder")
    for f in dataclasses.fields(Sampling):
        p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    p.add_argument("--asr_model", default="", help="speech recognition model folder: WER")
    p.add_argument("--speaker_model", default="", help="x-vector model folder: speaker similarity")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU) | bfloat16 | float32")
    args = p.parse_args(argv)
    cloning = [args.ref_audio, args.ref_text, args.text, args.out]
    if args.data and not args.out_dir or not args.data and not all(cloning):
        p.error("give --ref_audio, --ref_text, --text and --out, or --data and --out_dir")
    try:
        cfg = TrainConfig(model=args.model, device=args.device, dtype=args.dtype)
        device, dtype = resolve_device(cfg, Dist())
        tokenizer, model_cfg = model_spec(args.model)
        model = build(cfg, model_cfg, device, dtype)
        if args.adapter:
            load_adapter(model, args.adapter)
        sampling = Sampling(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sampling)})
        sampler = Sampler(sampling, device, args.tokenizer, args.asr_model, args.speaker_model)
        if args.data:
            prompts = load_prompts(args.data, args.count, tokenizer, model.cfg)
            out_dir, names = args.out_dir, [f"sample{i}" for i in range(len(prompts))]
        else:
            if not os.path.isfile(codes_path(args.ref_audio)):
                if sampler.audio_tokenizer is None:
                    raise DataError(f"{args.ref_audio} has no codes sidecar "
                                    f"{codes_path(args.ref_audio)}: pass --tokenizer "
                                    "AUDIO_TOKENIZER_DIR to encode it")
                encode_reference(args.ref_audio, sampler.audio_tokenizer)
            prompts = [cloning_prompt(args.ref_audio, args.ref_text, t, tokenizer, model.cfg)
                       for t in args.text]
            stem = os.path.splitext(args.out)[0]
            out_dir = os.path.dirname(os.path.abspath(args.out))
            names = [os.path.basename(stem) + (f"_{i + 1}" if len(prompts) > 1 else "")
                     for i in range(len(prompts))]
        for name, r in zip(names, sampler(model, prompts, out_dir, names)):
            print(f"{os.path.join(out_dir, name)}: {describe(r)}")
    except (DataError, OSError) as e:  # bad paths or data: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
