"""Batching: the official collator's semantics (SPEC section 5), done as a pure function that
also performs the model's placeholder expansion (SPEC section 6) on the CPU.

Every `<|AUDIO_OUT|>` / `<|AUDIO|>` placeholder is replaced in place by its audio positions, so
the model receives a right-padded, already-expanded batch plus index tensors:
  - `audio_index`/`text_index` route positions to the audio or text path of DualFFN layers;
  - `text_logit_index` lists the positions whose next token is supervised (text head only there);
  - `audio_logit_rows` lists the audio-out stream positions whose next frame is supervised.
Samples are never mutated (the official collator writes -100 into the caller's labels).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from data import WHISPER_SAMPLE_RATE, Sample

WHISPER_CHUNK_SECONDS = 30
IGNORE = -100

# position kinds in the expanded sequence
TEXT, AUDIO_IN_CODES, AUDIO_OUT, WHISPER = 0, 1, 2, 3
# voice roles of audio-code positions (for the voice-consistency term)
NO_VOICE, REFERENCE_VOICE, TARGET_VOICE = 0, 1, 2


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) text ids at text positions, pad elsewhere
    labels: torch.Tensor  # (B, L) text labels of the expanded sequence (-100 at audio positions)
    kinds: torch.Tensor  # (B, L) TEXT / AUDIO_IN_CODES / AUDIO_OUT / WHISPER; padding is TEXT
    attention_mask: torch.Tensor  # (B, L) bool, real positions
    position_ids: torch.Tensor  # (B, L)
    audio_mask: torch.Tensor  # (B, L) bool, audio-code positions (audio-in codes + audio-out)
    audio_index: torch.Tensor  # (Na,) flat positions of audio codes, ascending
    text_index: torch.Tensor  # (B*L - Na,) every other flat position, ascending
    audio_codes: torch.Tensor  # (Na, K) the codes fed at audio_index
    audio_out_index: torch.Tensor  # (No,) flat positions of the audio-out stream, in order
    audio_out_labels: torch.Tensor  # (No, K) audio labels of that stream
    audio_logit_rows: torch.Tensor  # (Ma,) stream positions j whose frame j+1 has a label
    audio_targets: torch.Tensor  # (Ma, K) = audio_out_labels[audio_logit_rows + 1]
    text_logit_index: torch.Tensor  # (Mt,) flat positions t with a label at t+1
    text_targets: torch.Tensor  # (Mt,)
    whisper_features: torch.Tensor  # (C, mel_bins, 3000) log-mel chunks
    whisper_mel_lengths: torch.Tensor  # (C,) valid mel frames per chunk
    whisper_index: torch.Tensor  # (Nw,) flat positions of Whisper states, chunk by chunk
    sample_of_segment: torch.Tensor  # (num audio-out segments,) which row each segment is in
    voice_index: torch.Tensor  # (Nv,) flat positions of reference or target audio codes
    voice_group: torch.Tensor  # (Nv,) 2*row + (1 if target audio else 0)

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                        for f in fields(self)})

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so the host-to-GPU copy is asynchronous (DataLoader calls this)."""
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    @property
    def num_text_tokens(self) -> int:
        return int(self.text_targets.numel())

    def num_audio_tokens(self) -> torch.Tensor:
        return (self.audio_targets != IGNORE).sum(0)


def delayed_stream(codes: torch.Tensor, first: int, last: int, before: int, after: int,
                   delay: bool) -> torch.Tensor:
    """[first | codes | last] per codebook; with the delay pattern codebook k is shifted right
    by k, filled with `before` on its left and `after` on its right (length T + 2 + K - 1)."""
    K, T = codes.shape
    x = torch.cat([codes.new_full((K, 1), first), codes, codes.new_full((K, 1), last)], dim=1)
    if not delay:
        return x
    out = codes.new_full((K, T + 2 + K - 1), after)
    for k in range(K):
        out[k, :k] = before
        out[k, k:k + T + 2] = x[k]
    return out


def wrap_codes(codes: torch.Tensor, bos: int, eos: int, delay: bool) -> torch.Tensor:
    """Model input of an audio segment: stream BOS, codes, stream EOS (delay fill BOS / EOS)."""
    return delayed_stream(codes, bos, eos, bos, eos, delay)


def audio_out_labels(codes: torch.Tensor, eos: int, delay: bool) -> torch.Tensor:
    """Labels of an audio-out segment: -100, codes, EOS (delay fill -100)."""
    return delayed_stream(codes, IGNORE, eos, IGNORE, IGNORE, delay)


class Collator:
    """Turns Samples into a Batch for one model config. Holds the Whisper feature extractor
    (transformers' WhisperFeatureExtractor, 128 mel bins) when the model uses Whisper."""

    def __init__(self, cfg, round_to: int = 8):
        self.cfg = cfg
        self.round_to = round_to
        self.feature_extractor = None
        if cfg.uses_whisper:
            from transformers import WhisperFeatureExtractor

            self.feature_extractor = WhisperFeatureExtractor(feature_size=cfg.whisper_num_mel_bins)
        self.chunk_samples = WHISPER_CHUNK_SECONDS * WHISPER_SAMPLE_RATE

    # -- one sample -------------------------------------------------------------------------------
    def _expand(self, sample: Sample):
        """Lists of per-position (id, label, kind) pieces plus codes and Whisper chunks."""
        cfg = self.cfg
        bos, eos, delay = cfg.audio_stream_bos_id, cfg.audio_stream_eos_id, cfg.use_delay_pattern
        K = cfg.audio_num_codebooks
        ids = sample.input_ids.tolist()
        labels = sample.label_ids.tolist()
        out_ids, out_labels, out_kinds, out_voice = [], [], [], []
        in_codes, out_codes, out_audio_labels, wav_chunks = [], [], [], []
        n_segments = 0

        def emit(token, label, kind, n=1, voice=NO_VOICE):
            out_ids.extend([token] * n)
            out_labels.extend([label] * n)
            out_kinds.extend([kind] * n)
            out_voice.extend([voice] * n)

        audio_i = 0
        for i, tok in enumerate(ids):
            if tok == cfg.audio_out_token_id:
                seg = sample.audios[audio_i]
                audio_i += 1
                codes = seg.codes[:K]
                wrapped = wrap_codes(codes, bos, eos, delay)
                seg_labels = audio_out_labels(codes, eos, delay)
                trained = labels[i] != IGNORE
                if not trained:  # context turn (before start_index): no audio loss
                    seg_labels = torch.full_like(seg_labels, IGNORE)
                emit(cfg.pad_token_id, IGNORE, AUDIO_OUT, wrapped.shape[1],
                     TARGET_VOICE if trained else REFERENCE_VOICE)
                out_codes.append(wrapped)
                out_audio_labels.append(seg_labels)
                n_segments += 1
            elif tok == cfg.audio_in_token_id:
                seg = sample.audios[audio_i]
                audio_i += 1
                use_codes = cfg.encode_audio_in_tokens
                if cfg.uses_whisper:
                    wav = seg.waveform.numpy()
                    starts = range(0, len(wav), self.chunk_samples)
                    chunks = [wav[s:s + self.chunk_samples] for s in starts]
                    # a chunk's codes are the same 30 s window at 25 frames/s (the official
                    # collator pairs them with the wrong audio here, SPEC section 8)
                    frames = WHISPER_CHUNK_SECONDS * 25
                    code_chunks = [seg.codes[:K, c * frames:(c + 1) * frames] for c in
                                   range(len(chunks))] if use_codes else [None] * len(chunks)
                else:
                    chunks, code_chunks = [None], [seg.codes[:K] if use_codes else None]
                if not cfg.uses_whisper and not use_codes:
                    emit(tok, labels[i], TEXT)  # nothing to fill in: the placeholder stays text
                    continue
                for c, (chunk, chunk_codes) in enumerate(zip(chunks, code_chunks)):
                    if c > 0:  # each extra 30 s chunk repeats <|audio_eos|><|audio_bos|>
                        emit(ids[i + 1], labels[i + 1], TEXT)
                        emit(ids[i - 1], labels[i - 1], TEXT)
                    if chunk is not None:
                        wav_chunks.append(chunk)
                        emit(cfg.pad_token_id, IGNORE, WHISPER, self._whisper_states(len(chunk)))
                    if chunk_codes is not None and chunk_codes.shape[1] > 0:
                        wrapped = wrap_codes(chunk_codes, bos, eos, delay)
                        emit(cfg.pad_token_id, IGNORE, AUDIO_IN_CODES, wrapped.shape[1],
                             REFERENCE_VOICE)
                        in_codes.append(wrapped)
            else:
                emit(tok, labels[i], TEXT)
        if audio_i != len(sample.audios):
            raise ValueError(f"{sample.source}: {len(sample.audios)} audio parts but {audio_i} "
                             "audio placeholders in the tokens")
        return out_ids, out_labels, out_kinds, out_voice, in_codes, out_codes, out_audio_labels, \
            wav_chunks, n_segments

    @staticmethod
    def _whisper_states(num_samples: int) -> int:
        """Tower output length of a chunk: mel frames -> conv stride 2 -> avg-pool 2."""
        mel = -(-num_samples // 160)  # WhisperFeatureExtractor hop length
        conv = (mel - 1) // 2 + 1
        return (conv - 2) // 2 + 1

    # -- the batch --------------------------------------------------------------------------------
    def __call__(self, samples: list[Sample]) -> Batch:
        cfg = self.cfg
        K = cfg.audio_num_codebooks
        expanded = [self._expand(s) for s in samples]
        B = len(samples)
        longest = max(len(e[0]) for e in expanded)
        L = -(-longest // self.round_to) * self.round_to
        input_ids = torch.full((B, L), cfg.pad_token_id, dtype=torch.long)
        labels = torch.full((B, L), IGNORE, dtype=torch.long)
        kinds = torch.full((B, L), TEXT, dtype=torch.long)
        voice = torch.full((B, L), NO_VOICE, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.bool)
        codes_at = torch.zeros((B, L, K), dtype=torch.long)
        out_label_at = torch.full((B, L, K), IGNORE, dtype=torch.long)
        wav_chunks, sample_of_segment = [], []
        for b, (ids, labs, knd, vc, in_codes, out_codes, out_labs, wavs, n_seg) in enumerate(expanded):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
            labels[b, :n] = torch.tensor(labs, dtype=torch.long)
            kinds[b, :n] = torch.tensor(knd, dtype=torch.long)
            voice[b, :n] = torch.tensor(vc, dtype=torch.long)
            attention_mask[b, :n] = True
            if in_codes:
                codes_at[b][kinds[b] == AUDIO_IN_CODES] = torch.cat(in_codes, dim=1).T
            if out_codes:
                codes_at[b][kinds[b] == AUDIO_OUT] = torch.cat(out_codes, dim=1).T
                out_label_at[b][kinds[b] == AUDIO_OUT] = torch.cat(out_labs, dim=1).T
            wav_chunks.extend(wavs)
            sample_of_segment.extend([b] * n_seg)

        flat_kinds = kinds.view(-1)
        audio_mask = (kinds == AUDIO_IN_CODES) | (kinds == AUDIO_OUT)
        audio_index = audio_mask.view(-1).nonzero().squeeze(1)
        text_index = (~audio_mask).view(-1).nonzero().squeeze(1)
        audio_out_index = (flat_kinds == AUDIO_OUT).nonzero().squeeze(1)
        stream_labels = out_label_at.view(B * L, K)[audio_out_index]
        has_next = (stream_labels[1:] != IGNORE).any(dim=1)
        audio_logit_rows = has_next.nonzero().squeeze(1)
        # next-token text targets stay within a row: t in [0, L-2]
        next_labels = torch.full_like(labels, IGNORE)
        next_labels[:, :-1] = labels[:, 1:]
        text_logit_index = (next_labels.view(-1) != IGNORE).nonzero().squeeze(1)

        voice_index = (voice.view(-1) != NO_VOICE).nonzero().squeeze(1)
        rows = torch.arange(B).repeat_interleave(L)
        voice_group = 2 * rows[voice_index] + (voice.view(-1)[voice_index] == TARGET_VOICE).long()

        if wav_chunks:
            feats = self.feature_extractor(wav_chunks, sampling_rate=WHISPER_SAMPLE_RATE,
                                           return_attention_mask=True, padding="max_length",
                                           return_tensors="np")
            whisper_features = torch.from_numpy(np.asarray(feats["input_features"], dtype=np.float32))
            whisper_mel_lengths = torch.from_numpy(np.asarray(feats["attention_mask"])).sum(-1).long()
            # the positions emitted in _expand assumed ceil(samples / hop) mel frames per chunk
            assert whisper_mel_lengths.tolist() == [-(-len(w) // 160) for w in wav_chunks]
        else:
            whisper_features = torch.zeros((0, cfg.whisper_num_mel_bins, 3000))
            whisper_mel_lengths = torch.zeros(0, dtype=torch.long)

        return Batch(
            input_ids=input_ids, labels=labels, kinds=kinds, attention_mask=attention_mask,
            position_ids=(attention_mask.long().cumsum(-1) - 1).clamp(min=0),
            audio_mask=audio_mask, audio_index=audio_index, text_index=text_index,
            audio_codes=codes_at.view(B * L, K)[audio_index],
            audio_out_index=audio_out_index, audio_out_labels=stream_labels,
            audio_logit_rows=audio_logit_rows, audio_targets=stream_labels[audio_logit_rows + 1],
            text_logit_index=text_logit_index, text_targets=next_labels.view(-1)[text_logit_index],
            whisper_features=whisper_features, whisper_mel_lengths=whisper_mel_lengths,
            whisper_index=(flat_kinds == WHISPER).nonzero().squeeze(1),
            sample_of_segment=torch.tensor(sample_of_segment, dtype=torch.long),
            voice_index=voice_index, voice_group=voice_group,
        )
