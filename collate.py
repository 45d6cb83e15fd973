"""Batching: the official collator's semantics (OFFICIAL.md section 5) as a pure function that also
does the model's placeholder expansion (section 6, planned by data.audio_plan) on the CPU.

Every audio placeholder is replaced in place by its audio positions, in a right-padded batch whose
index tensors route positions to DualFFN's text or audio path (`text_index`, `audio_index`) and
list those whose next token or frame is supervised (`text_logit_index`, `audio_logit_rows`): the
heads run only there. Samples are never mutated (the official collator writes -100 into labels).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from audio import WHISPER_SAMPLE_RATE
from chatml import IGNORE, Sample
from data import AUDIO_IN_CODES, AUDIO_OUT, TEXT, WHISPER, WHISPER_HOP, audio_plan, piece_length


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) text ids at text positions, pad elsewhere
    labels: torch.Tensor  # (B, L) text labels of the expanded sequence (IGNORE at audio positions)
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

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                        for f in fields(self)})

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so the host-to-GPU copy is asynchronous (DataLoader calls this)."""
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


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
    """Labels of an audio-out segment: IGNORE, codes, EOS (delay fill IGNORE)."""
    return delayed_stream(codes, IGNORE, eos, IGNORE, IGNORE, delay)


class Collator:
    """Samples -> Batch for one model config, with a Whisper feature extractor if it uses one."""

    def __init__(self, cfg, round_to: int = 8):
        self.cfg, self.round_to = cfg, round_to
        self.feature_extractor = None
        if cfg.uses_whisper:
            from transformers import WhisperFeatureExtractor

            self.feature_extractor = WhisperFeatureExtractor(feature_size=cfg.whisper_num_mel_bins)

    def _expand(self, sample: Sample):
        """(id, label, kind) of each position of the expanded sequence, the wrapped codes of its
        audio-in and audio-out positions, the audio-out labels, and the Whisper chunks."""
        cfg = self.cfg
        bos, eos, delay = cfg.audio_stream_bos_id, cfg.audio_stream_eos_id, cfg.use_delay_pattern
        ids, labels = sample.input_ids.tolist(), sample.label_ids.tolist()
        out = dict(positions=[], in_codes=[], out_codes=[], out_labels=[], wavs=[])
        positions, done = out["positions"], 0
        for i, pieces in [*audio_plan(sample, cfg), (len(ids), [])]:  # the last: trailing text
            positions += [(ids[t], labels[t], TEXT) for t in range(done, i)]
            done = i + 1
            for kind, payload in pieces:
                if kind == TEXT:
                    positions.append((ids[payload], labels[payload], TEXT))
                    continue
                positions += [(cfg.pad_token_id, IGNORE, kind)] * piece_length(kind, payload, cfg)
                if kind == WHISPER:
                    out["wavs"].append(payload)
                elif kind == AUDIO_IN_CODES:
                    out["in_codes"].append(wrap_codes(payload, bos, eos, delay))
                else:  # audio-out: trained unless its placeholder is a context turn's
                    seg_labels = audio_out_labels(payload, eos, delay)
                    if labels[i] == IGNORE:
                        seg_labels = torch.full_like(seg_labels, IGNORE)
                    out["out_codes"].append(wrap_codes(payload, bos, eos, delay))
                    out["out_labels"].append(seg_labels)
        return out

    def __call__(self, samples: list[Sample]) -> Batch:
        cfg, K, B = self.cfg, self.cfg.audio_num_codebooks, len(samples)
        expanded = [self._expand(s) for s in samples]
        lengths = torch.tensor([len(e["positions"]) for e in expanded])
        L = -(-int(lengths.max()) // self.round_to) * self.round_to
        input_ids, labels, kinds = (torch.full((B, L), fill, dtype=torch.long)
                                    for fill in (cfg.pad_token_id, IGNORE, TEXT))
        attention_mask = torch.arange(L) < lengths[:, None]
        codes_at = torch.zeros((B, L, K), dtype=torch.long)
        out_label_at = torch.full((B, L, K), IGNORE, dtype=torch.long)
        for b, e in enumerate(expanded):
            n = len(e["positions"])
            input_ids[b, :n], labels[b, :n], kinds[b, :n] = torch.tensor(e["positions"]).T
            if e["in_codes"]:
                codes_at[b][kinds[b] == AUDIO_IN_CODES] = torch.cat(e["in_codes"], dim=1).T.long()
            if e["out_codes"]:
                codes_at[b][kinds[b] == AUDIO_OUT] = torch.cat(e["out_codes"], dim=1).T.long()
                out_label_at[b][kinds[b] == AUDIO_OUT] = torch.cat(e["out_labels"], dim=1).T.long()

        audio_mask = (kinds == AUDIO_IN_CODES) | (kinds == AUDIO_OUT)
        audio_index = audio_mask.view(-1).nonzero().squeeze(1)
        audio_out_index = (kinds.view(-1) == AUDIO_OUT).nonzero().squeeze(1)
        stream_labels = out_label_at.view(B * L, K)[audio_out_index]
        audio_logit_rows = (stream_labels[1:] != IGNORE).any(dim=1).nonzero().squeeze(1)
        next_labels = torch.full_like(labels, IGNORE)  # next-token targets stay within a row
        next_labels[:, :-1] = labels[:, 1:]
        text_logit_index = (next_labels.view(-1) != IGNORE).nonzero().squeeze(1)
        features, mel_lengths = self._whisper_features([w for e in expanded for w in e["wavs"]])
        return Batch(
            input_ids=input_ids, labels=labels, kinds=kinds, attention_mask=attention_mask,
            position_ids=(attention_mask.long().cumsum(-1) - 1).clamp(min=0),
            audio_mask=audio_mask, audio_index=audio_index,
            text_index=(~audio_mask).view(-1).nonzero().squeeze(1),
            audio_codes=codes_at.view(B * L, K)[audio_index],
            audio_out_index=audio_out_index, audio_out_labels=stream_labels,
            audio_logit_rows=audio_logit_rows, audio_targets=stream_labels[audio_logit_rows + 1],
            text_logit_index=text_logit_index, text_targets=next_labels.view(-1)[text_logit_index],
            whisper_features=features, whisper_mel_lengths=mel_lengths,
            whisper_index=(kinds.view(-1) == WHISPER).nonzero().squeeze(1))

    def _whisper_features(self, chunks: list) -> tuple[torch.Tensor, torch.Tensor]:
        """128-bin log-mel features of each chunk, padded to 30 s, and their valid frame counts."""
        if not chunks:
            return torch.zeros((0, self.cfg.whisper_num_mel_bins, 3000)), torch.zeros(0, dtype=torch.long)
        feats = self.feature_extractor([c.numpy() for c in chunks], sampling_rate=WHISPER_SAMPLE_RATE,
                                       return_attention_mask=True, padding="max_length",
                                       return_tensors="np")
        lengths = torch.from_numpy(np.asarray(feats["attention_mask"])).sum(-1).long()
        # audio_plan's positions assumed ceil(samples / hop) mel frames per chunk
        assert lengths.tolist() == [-(-len(c) // WHISPER_HOP) for c in chunks]
        return torch.from_numpy(np.asarray(feats["input_features"], dtype=np.float32)), lengths
