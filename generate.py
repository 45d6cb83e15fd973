"""Zero-shot voice cloning with our model, to hear what a checkpoint says:

    python generate.py --model CKPT [--adapter DIR] --ref_audio REF.wav --ref_text "..." \\
        --text "..." ["..." ...] --out OUT.wav [--tokenizer AUDIO_TOKENIZER]
    python generate.py --model CKPT [--adapter DIR] --data PROMPTS.jsonl --out_dir DIR [...]

Mirrors the official serve engine + `HiggsAudioModel.generate` (OFFICIAL.md section 10), but
stops when the audio ends (the official loop would go on with text tokens). health.py checks it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import checkpoint
from audio import (CODES_FRAME_RATE, CODES_SAMPLE_RATE, codes_path, encode_files, load_audio,
                   stale_reason)
from chatml import IGNORE, AudioPart, Record, Sample, TextPart, cloning_record, record_from_json
from errors import ConfigError, DataError, UserError
from cli import option, parse
from collate import Collator
from data import make_sample
from device import resolve_device
from formats import load_records
from health import SampleWriter, describe
from lora import load_adapter, load_base
from model import KVCache, StaticKVCache, fuse_projections

GENERATION_PREFIX = "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>"
CHECK_EVERY = 8  # frames between the fixed-shape loop's looks at whether every row has ended


@dataclass
class Sampling:
    """decoding (defaults: the official README example and serve engine)"""
    temperature: float = option(0.3, "softmax temperature; 0 is greedy", min=0)
    top_k: int = option(50, "sample among the k most likely codes; 0: all", min=0)
    top_p: float = option(0.95, "sample within this probability mass; 1: all", above=0, max=1)
    ras_window: int = option(7, "repetition-aware sampling: frames looked back at; 0: off", min=0)
    ras_max_repeat: int = option(2, "a code this often in the window is drawn again", min=1)
    seed: int = option(0, "seed of the draws: the same seed gives the same audio")
    max_seconds: float = option(30.0, "frame limit, in seconds of audio", above=0, max=600)


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


def prompt_of(record: Record, tokenizer, cfg) -> Prompt:
    """A record's turns up to its last user turn, then GENERATION_PREFIX, as training tokenizes."""
    users = [i for i, m in enumerate(record.messages) if m.role == "user"]
    if not users:
        raise DataError(f"{record.source}: no user turn holding the text to speak")
    turns = record.messages[:users[-1] + 1]
    sample = make_sample(dataclasses.replace(record, messages=turns, start_index=None),
                         tokenizer, cfg)
    suffix = torch.tensor(tokenizer.encode(GENERATION_PREFIX, add_special_tokens=False))
    sample = Sample(torch.cat([sample.input_ids, suffix]),
                    torch.cat([sample.label_ids, torch.full_like(suffix, IGNORE)]),
                    sample.audios, sample.source)
    parts = [p for m in turns for p in m.content if isinstance(p, AudioPart)]
    reference = None
    if parts:
        with contextlib.suppress(DataError):  # the waveform is only for the checks
            reference = load_audio(parts[-1], record.base_dir, CODES_SAMPLE_RATE, record.source)
    return Prompt(sample, _text(turns[-1]), reference, sample.audios[-1].codes if parts else None,
                  _speaking_rate(turns, sample), record.source)


def _text(message) -> str:
    return " ".join(p.text.strip() for p in message.content if isinstance(p, TextPart))


def _speaking_rate(turns, sample: Sample) -> float | None:
    """Characters per second of the references transcribed by the user turn before them."""
    chars, seconds, audio_i = 0, 0.0, 0
    for before, m in zip([None] + turns[:-1], turns):
        audios = [p for p in m.content if isinstance(p, AudioPart)]
        if m.role == "assistant" and len(m.content) == len(audios) == 1 and before and \
                before.role == "user" and all(isinstance(p, TextPart) for p in before.content):
            chars += len(_text(before))
            seconds += sample.audios[audio_i].codes.shape[1] / CODES_FRAME_RATE
        audio_i += len(audios)
    return chars / seconds if seconds else None


def load_prompts(path: str, count: int, tokenizer, cfg) -> list[Prompt]:
    """A data file's first `count` prompts, at their median speaking rate (one is too noisy)."""
    prompts = [prompt_of(r, tokenizer, cfg) for r in load_records(path)[:count]]
    rates = [p.chars_per_second for p in prompts if p.chars_per_second]
    median = float(np.median(rates)) if rates else None
    return [dataclasses.replace(p, chars_per_second=median) for p in prompts]


def cloning_prompt(ref_audio: str, ref_text: str, text: str, tokenizer, cfg) -> Prompt:
    """The official zero-shot cloning prompt (OFFICIAL.md section 3) for a reference clip."""
    messages = cloning_record(ref_text, os.path.abspath(ref_audio), text, "")["messages"][:4]
    return prompt_of(record_from_json({"messages": messages}, "command line", os.getcwd()),
                     tokenizer, cfg)


def pick(scores: torch.Tensor, s: Sampling, generator) -> torch.Tensor:
    """Per-codebook choice from (..., V) logits: greedy, or transformers' warpers in its order."""
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
def generate(model, prompts: list[Prompt], s: Sampling, use_cache: bool = True,
             decode: str = "auto") -> list[Generated]:
    """Voice cloning for right-padded prompts, in eval mode. `decode`: DecodeStep "eager" or
    "compile" ("auto": compile on CUDA), or "dynamic" (growing_step; use_cache=False: no cache)."""
    was_training = model.training
    try:  # the loop never waits for the device (LaggedFlag); frames past a row's end change nothing
        model.eval()
        cfg, device, B = model.cfg, model.norm.weight.device, len(prompts)
        K, bos, eos = cfg.audio_num_codebooks, cfg.audio_stream_bos_id, cfg.audio_stream_eos_id
        batch = Collator(cfg)([p.sample for p in prompts]).to(device)
        prompt, n_frames = prompt_inputs(model, batch), round(s.max_seconds * CODES_FRAME_RATE)
        if use_cache and decode != "dynamic":
            step, check_every = fixed_step(model, prompt, n_frames, decode), CHECK_EVERY
        else:
            step, check_every = growing_step(model, prompt, use_cache), 1
        # repetition-aware sampling looks back over each row's audio-out frames, reference included
        out_codes = batch.audio_codes[torch.isin(batch.audio_index, batch.audio_out_index)]
        rows, window = batch.audio_out_index // batch.input_ids.shape[1], max(s.ras_window, 1)
        pad = torch.full((window, K), -1, dtype=torch.long, device=device)
        recent = torch.stack([torch.cat([pad, out_codes[rows == b]])[-window:] for b in range(B)])
        generator = torch.Generator(device).manual_seed(s.seed)
        frame = torch.full((B, K), bos, dtype=torch.long, device=device)
        stream, start = [frame], batch.attention_mask.sum(1)
        zeros = torch.zeros(B, dtype=torch.long, device=device)
        # remaining: the EOS countdown (-1: none); lengths: the columns of each row's stream
        n_delay, remaining, lengths, active = zeros, zeros - 1, zeros + 1, zeros == 0
        compiled = getattr(step, "mode", "") == "compile"  # the bookkeeping too: fused kernels
        delay = compiled_delay_pattern() if compiled else delay_pattern
        all_ended = LaggedFlag(device)
        for t in range(n_frames):
            logits = step(frame, start + t, active)  # (B, K, rows)
            new = pick(logits, s, generator)
            recent = torch.cat([recent[:, 1:], frame[:, None]], 1)
            if s.ras_window > 0:
                repeats = (recent == new[:, None]).sum(1)
                new = torch.where(repeats >= s.ras_max_repeat, draw(logits, generator), new)
            if cfg.use_delay_pattern:
                new, n_delay, remaining, ending = delay(new, n_delay, remaining, bos, eos)
            else:  # the official loop never ends a stream without the delay pattern; this does
                ending = (new == eos).any(1)
                new = torch.where(ending[:, None], eos, new)
            frame = torch.where(active[:, None], new, frame)
            stream.append(frame)
            lengths = torch.where(active, len(stream), lengths)
            active = active & ~ending
            if (t + 1) % check_every == 0 and all_ended(~active.any()):
                break
        stream = torch.stack(stream, 2).cpu()
        rows = [stream[b, :, :n] for b, n in enumerate(lengths.tolist())]
        return [Generated(r, revert(r, cfg), e) for r, e in zip(rows, (~active).tolist())]
    finally:
        model.train(was_training)


def prompt_inputs(model, batch) -> tuple:
    """forward_cached's inputs (the prefill) for a collated batch of prompts."""
    return model.embed(batch), batch.position_ids, batch.audio_mask, batch.attention_mask


def delay_pattern(new, n_delay, remaining, bos: int, eos: int):
    """The official _sample_audio_tokens on choices `new` (B, K): BOS delay, then the EOS countdown
    (remaining, -1: none). Returns the frame, new n_delay and remaining, and the rows ending."""
    K = new.shape[1]
    k = torch.arange(K, device=new.device)
    new = torch.where(k > n_delay[:, None], bos, new)
    counting = remaining >= 0
    new = torch.where(counting[:, None] & (k < K - remaining[:, None]), eos, new)
    is_eos = new == eos
    first = is_eos.long().argmax(1)
    begins = ~counting & is_eos.any(1)
    new = torch.where(begins[:, None] & (k < first[:, None]), eos, new)
    remaining = torch.where(counting, remaining - 1, torch.where(begins, K - 1 - first, remaining))
    return new, (n_delay + 1).clamp(max=K - 1), remaining, remaining == 0


@functools.cache
def compiled_delay_pattern():
    """delay_pattern compiled on first use (importing the compiler takes seconds)."""
    return torch.compile(delay_pattern, dynamic=False)


class LaggedFlag:
    """A device bool read on the host without making the device idle: a look returns the last copy
    that has arrived (False before any) and starts a new one."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=self.cuda)
        self.copied = torch.cuda.Event() if self.cuda else None

    def __call__(self, value: torch.Tensor) -> bool:
        if not self.cuda:
            return bool(value)
        if not self.copied.query():  # the last copy is still on its way
            return False
        last = bool(self.host)
        self.host.copy_(value, non_blocking=True)
        self.copied.record()
        return last


def growing_step(model, prompt: tuple, use_cache: bool):
    """The reference step: forward_cached on a growing KVCache, or on the whole prefix again."""
    chunks, cache = [prompt], KVCache(len(model.layers))
    if use_cache:
        model.forward_cached(*prompt, cache)

    def step(frame, positions, active):
        new = (model.embed_audio_codes(frame).to(prompt[0].dtype)[:, None], positions[:, None],
               torch.ones_like(active)[:, None], active[:, None])
        if use_cache:
            hidden = model.forward_cached(*new, cache)
        else:
            chunks.append(new)
            hidden = model.forward_cached(*(torch.cat(c, 1) for c in zip(*chunks)),
                                          KVCache(len(model.layers)))
        return model.audio_logits(hidden[:, -1]).float()
    return step


def fixed_step(model, prompt: tuple, n_frames: int, decode: str) -> "DecodeStep":
    """The model's DecodeStep from the prompt's prefill; 64-column lengths share compiled steps."""
    B, L = prompt[0].shape[:2]
    prefill = KVCache(len(model.layers))
    model.forward_cached(*prompt, prefill)
    if decode == "auto":
        decode = "compile" if prompt[0].is_cuda else "eager"
    step = DecodeStep.of(model, B, -(-(L + n_frames) // 64) * 64, decode)
    step.cache.load(prefill)
    return step


class DecodeStep:
    """model.decode_step over static buffers, kept on the model while shapes and parameter storage
    stay: train.py's samplings compile once, as the optimizer updates parameters in place."""

    def __init__(self, model, batch_size: int, max_len: int, mode: str):
        if mode not in ("eager", "compile"):
            raise ValueError(f"decode {mode!r}: expected auto, dynamic, eager or compile")
        cfg, device, dtype = model.cfg, model.norm.weight.device, model.embed_tokens.weight.dtype
        self.model, self.mode = model, mode
        self.cache = StaticKVCache(cfg, batch_size, max_len, dtype, device)
        self.codes = torch.full((batch_size, cfg.audio_num_codebooks), cfg.audio_stream_bos_id,
                                dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.active = torch.ones(batch_size, dtype=torch.bool, device=device)
        t0 = time.perf_counter()
        self.run = self.compile() if mode == "compile" else self.forward
        self.build_seconds = time.perf_counter() - t0
        if mode != "eager":
            print(f"decode step ({mode}, batch {batch_size}, {max_len} positions) compiled in "
                  f"{self.build_seconds:.1f} s", flush=True)

    @classmethod
    def of(cls, model, batch_size: int, max_len: int, mode: str) -> "DecodeStep":
        """The model's step for these shapes and parameter addresses (a CUDA graph holds them)."""
        key = (batch_size, max_len, mode,
               tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers())))
        step = getattr(model, "decode_step_cache", None)
        if step is None or step.key != key:
            model.decode_step_cache = None
            gc.collect()  # the old step refers to itself: free its buffers before new ones come
            model.decode_step_cache = step = cls(model, batch_size, max_len, mode)
            step.key = key
        return step

    def forward(self) -> torch.Tensor:
        return self.model.decode_step(self.codes, self.positions, self.active, self.cache)

    def __call__(self, frame, positions, active) -> torch.Tensor:
        """The next frame's logits (B, K, rows), valid until the next call. Device work only."""
        self.codes.copy_(frame)
        self.positions.copy_(positions[:, None])
        self.active.copy_(active)
        logits = self.run()
        self.cache.at += 1
        return logits

    def compile(self):
        """Compiled (on CUDA a CUDA graph using the static buffers in place) and recorded here."""
        cuda = self.codes.is_cuda
        for t in (self.codes, self.positions, self.active, *self.cache.tensors()):
            torch._dynamo.mark_static_address(t)
        compiled = torch.compile(self.forward, mode="reduce-overhead" if cuda else None,
                                 fullgraph=True, dynamic=False)

        def run():
            if cuda:  # a new step: the previous replay's logits may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            return compiled()
        for _ in range(3):
            run()
        return run


def revert(stream: torch.Tensor, cfg) -> torch.Tensor:
    """A stream's audio codes as the official serve engine makes them: delay undone, BOS/EOS cut."""
    K, L = stream.shape
    if cfg.use_delay_pattern:
        T = max(L - K + 1, 0)
        stream = torch.stack([stream[k, k:k + T] for k in range(K)])
    return stream[:, 1:-1].clamp(0, cfg.audio_codebook_size - 1)


@dataclass
class GenerateConfig:
    """Zero-shot voice cloning with a checkpoint (and an adapter)"""
    model: str = option("", "checkpoint: a folder (official, transformers, merged), Hub id or tiny")
    adapter: str = option("", "LoRA adapter folder or Hub id (adapter_model.safetensors)")
    ref_audio: str = option("", "reference voice clip (codes: REF.codes.npy, or --tokenizer)")
    ref_text: str = option("", "transcript of the reference clip")
    text: list[str] = option(None, "text(s) to speak in the reference voice", factory=list)
    out: str = option("", "OUT.wav (several texts: OUT_1.wav, ...), .codes.npy, .json, .ref.wav")
    data: str = option("", "instead of --ref_audio/--ref_text/--text: prompts from a data file")
    count: int = option(4, "with --data: its first N records", min=1)
    out_dir: str = option("", "with --data: output folder (sampleI.* files)")
    tokenizer: str = option("", "HiggsAudioV2TokenizerModel folder or Hub id: writes WAVs")
    asr_model: str = option("", "speech recognition model (folder or Hub id): word error rate")
    speaker_model: str = option("", "x-vector speaker model (folder or Hub id): speaker similarity")
    device: str = option("auto", "auto: cuda if a GPU is present", choices=("auto", "cpu", "cuda"))
    dtype: str = option("auto", "auto: bfloat16 on GPU", choices=("auto", "bfloat16", "float32"))
    sampling: Sampling = field(default_factory=Sampling)

    def check(self) -> None:
        missing = [f"--{k}" for k in "ref_audio ref_text out text".split() if not getattr(self, k)]
        if not self.model:
            raise ConfigError("--model is required (a checkpoint folder, a Hub id, or tiny)")
        if self.data and not self.out_dir:
            raise ConfigError("--data needs --out_dir, the folder the samples go to")
        if not self.data and missing:
            raise ConfigError(f"missing {', '.join(missing)}: give --ref_audio, --ref_text, "
                              "--text and --out, or --data and --out_dir")
        if any(not t.strip() for t in self.text):
            raise ConfigError("--text: an empty text; give the words to speak")


def generation_prompts(cfg: GenerateConfig, tokenizer, model_cfg, audio_tokenizer):
    """(prompts, output folder, file stems); a reference is encoded as `data.py prepare` does."""
    if cfg.data:
        prompts = load_prompts(cfg.data, cfg.count, tokenizer, model_cfg)
        return prompts, cfg.out_dir, [f"sample{i}" for i in range(len(prompts))]
    codes, failed = codes_path(cfg.ref_audio), []
    stale = os.path.isfile(cfg.ref_audio) and os.path.isfile(codes) and stale_reason(cfg.ref_audio)
    if stale or not os.path.isfile(codes):
        if audio_tokenizer is None:
            problem = f"are stale ({stale})" if stale else "are missing"
            raise DataError(f"{cfg.ref_audio}: its codes {codes} {problem}; pass --tokenizer "
                            "AUDIO_TOKENIZER to encode it")
        if not encode_files(audio_tokenizer, [cfg.ref_audio], 1, failed):
            raise DataError(failed[0])
        print(f"encoded {cfg.ref_audio} -> {codes}")
    prompts = [cloning_prompt(cfg.ref_audio, cfg.ref_text, t, tokenizer, model_cfg)
               for t in cfg.text]
    stem = os.path.basename(os.path.splitext(cfg.out)[0])
    names = [stem + (f"_{i + 1}" if len(prompts) > 1 else "") for i in range(len(prompts))]
    return prompts, os.path.dirname(os.path.abspath(cfg.out)), names


def main(argv=None) -> int:
    cfg = parse(GenerateConfig, argv, __doc__)
    try:
        cfg.check()
        device, dtype = resolve_device(cfg.device, cfg.dtype)
        tokenizer, _ = checkpoint.model_spec(cfg.model)
        model = load_base(cfg.model, cfg.adapter, device, dtype)
        if cfg.adapter:
            load_adapter(model, cfg.adapter)
        fuse_projections(model)
        writer = SampleWriter(device, cfg.tokenizer, cfg.asr_model, cfg.speaker_model)
        prompts, out_dir, names = generation_prompts(cfg, tokenizer, model.cfg,
                                                     writer.audio_tokenizer)
        results = generate(model, prompts, cfg.sampling)
        for name, r in zip(names, writer.write(prompts, results, out_dir, names)):
            print(f"{os.path.join(out_dir, name)}: {describe(r)}")
    except (UserError, OSError) as e:  # bad paths or data: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
