"""The training objective: text cross-entropy + per-codebook audio cross-entropy (OFFICIAL.md
section 7), weighted, plus an optional voice-consistency term.

Each term is kept as a SUM with its COUNT (`Sums`), added over a step's micro-batches and ranks and
divided once by the global count, so the result does not depend on how the step is split.

Adding a term (say an audio z-loss) touches three places:
1. its computation: a `Term` in TERMS, with its count (known before the forward) and its sum;
2. its flag: a weight in LossConfig, named in the Term;
3. its weight in the total: a line in `Objective.loss`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from chatml import IGNORE
from cli import option
from collate import Batch
from errors import ConfigError

TEXT_CHUNK_ROWS = 4096  # text logits are materialised this many positions at a time


@dataclass
class LossConfig:
    """loss: text CE + per-codebook audio CE (+ optional voice consistency)"""
    text_loss_weight: float = option(1.0, "weight of the text cross-entropy", min=0, on_resume="applied")
    audio_loss_weight: float = option(1.0, "weight of the audio cross-entropy", min=0, on_resume="applied")
    codebook_weights: str = option("", "per-codebook weights of the audio term, e.g. 4,1,1,1,1,1,1,1 "
                                   "(scaled so equal weights give the plain mean); none: equal",
                                   on_resume="applied")
    voice_consistency_weight: float = option(0.0, "weight of 1 - cos(mean hidden state of the "
                                             "reference audio, of the target audio); 0: off",
                                             min=0, on_resume="applied")


class Sums(dict):
    """{term: summed loss, term + "_count": what it is divided by}; tensors, added by name."""

    def __add__(self, other: "Sums") -> "Sums":
        return Sums({k: v + other[k] for k, v in self.items()})

    def detach(self) -> "Sums":
        return Sums({k: v.detach() for k, v in self.items()})

    def to(self, device) -> "Sums":
        return Sums({k: v.to(device) for k, v in self.items()})

    def all_reduced(self) -> "Sums":
        """Summed over every rank, in one collective."""
        parts = [v.float().reshape(-1) for v in self.values()]
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        return Sums({k: t.view_as(v) for (k, v), t in
                     zip(self.items(), flat.split([p.numel() for p in parts]))})


def text_count(batch: Batch, cfg) -> torch.Tensor:
    """Supervised text tokens, on the batch's device: a host tensor's copy would wait on the GPU."""
    return batch.text_targets.new_full((), batch.text_targets.numel(), dtype=torch.float32)


def text_ce_sum(model, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Summed text-head CE where supervised, chunked: vocab-wide fp32 logits are large."""
    rows = hidden.reshape(-1, hidden.shape[-1])[batch.text_logit_index]
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], TEXT_CHUNK_ROWS):
        logits = model.text_logits(rows[start:start + TEXT_CHUNK_ROWS]).float()
        total = total + F.cross_entropy(logits, batch.text_targets[start:start + TEXT_CHUNK_ROWS],
                                        reduction="sum")
    return total


def audio_token_counts(batch: Batch, cfg=None) -> torch.Tensor:
    """(K,) supervised audio frames per codebook."""
    return (batch.audio_targets != IGNORE).sum(0).float()


def audio_ce_sums(model, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(K,) summed CE per codebook: stream position j predicts frame j+1."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    K = model.cfg.audio_num_codebooks
    if not batch.audio_logit_rows.numel():  # keeps the heads in the graph (DDP needs every grad)
        return flat.new_zeros(K, dtype=torch.float32) + 0.0 * flat.sum()
    logits = model.audio_logits(flat[batch.audio_out_index[batch.audio_logit_rows]]).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.audio_targets.reshape(-1),
                         ignore_index=IGNORE, reduction="none")
    return ce.view(-1, K).sum(0)


def voice_groups(batch: Batch, bos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions, group = 2 * row + is_target) of the reference audio (audio-in, context
    audio-out) and the target audio (trained audio-out segments, each starting with a BOS frame).
    Gathers and scatters of known sizes only, so the host never waits for the GPU."""
    L = batch.input_ids.shape[1]
    out_rows = torch.searchsorted(batch.audio_index, batch.audio_out_index)  # both ascending
    segment = (batch.audio_codes[out_rows] == bos).all(1).long().cumsum(0) - 1
    labelled = (batch.audio_out_labels != IGNORE).any(1).long()
    trained = torch.zeros_like(segment).index_add_(0, segment, labelled) > 0  # per segment
    is_target = torch.zeros_like(batch.audio_index).index_copy_(0, out_rows,
                                                                 trained[segment].long())
    return batch.audio_index, 2 * (batch.audio_index // L) + is_target


def voice_group_sizes(group: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2) reference and target positions per sample, and which samples have both."""
    sizes = torch.zeros(2 * B, dtype=torch.long, device=group.device) \
        .index_add_(0, group, torch.ones_like(group)).view(B, 2)  # not bincount: a host wait
    return sizes, (sizes > 0).all(dim=1)


def voice_count(batch: Batch, cfg) -> torch.Tensor:
    """Samples with both reference and target audio."""
    _, group = voice_groups(batch, cfg.audio_stream_bos_id)
    return voice_group_sizes(group, batch.input_ids.shape[0])[1].sum().float()


def voice_consistency_sum(model, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum over samples of 1 - cos(mean hidden state of the reference audio, of the target)."""
    B = hidden.shape[0]
    positions, group = voice_groups(batch, model.cfg.audio_stream_bos_id)
    flat = hidden.reshape(-1, hidden.shape[-1]).float()
    totals = flat.new_zeros(2 * B, flat.shape[1]).index_add(0, group, flat[positions])
    sizes, both = voice_group_sizes(group, B)
    means = totals.view(B, 2, -1) / sizes.clamp(min=1)[..., None].to(flat.dtype)
    return ((1 - F.cosine_similarity(means[:, 0], means[:, 1], dim=-1)) * both).sum()


@dataclass(frozen=True)
class Term:
    count: Callable  # (batch, model config) -> what the sum is divided by, known before the forward
    sum: Callable  # (model, final hidden states, batch) -> the summed loss
    weight: str  # its LossConfig flag; the term is computed when the weight is not 0 (or always)
    always: bool = False  # computed even at weight 0: a metric worth logging


TERMS = {
    "text": Term(text_count, text_ce_sum, "text_loss_weight", always=True),
    "audio": Term(audio_token_counts, audio_ce_sums, "audio_loss_weight", always=True),
    "voice": Term(voice_count, voice_consistency_sum, "voice_consistency_weight"),
}


def parse_codebook_weights(text: str, K: int) -> torch.Tensor:
    """--codebook_weights "4,1,1,1,1,1,1,1" scaled to sum to K, so all ones is the plain mean."""
    if not text:
        return torch.ones(K)
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != K or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--codebook_weights {text}: must be {K} comma-separated numbers >= 0 "
                          "with a positive sum, one per codebook of the model")
    w = torch.tensor(weights, dtype=torch.float32)
    return w * (K / w.sum())


class Objective:
    """What the optimiser minimises: each term's sum over the whole step's count, weighted."""

    def __init__(self, model_cfg, cfg: LossConfig = LossConfig()):
        self.model_cfg, self.cfg = model_cfg, cfg
        self.codebook_weights = parse_codebook_weights(cfg.codebook_weights,
                                                       model_cfg.audio_num_codebooks)
        self.terms = {n: t for n, t in TERMS.items() if t.always or getattr(cfg, t.weight)}

    def counts(self, batch: Batch) -> Sums:
        """Zero sums with the batch's counts: known on the host before any forward."""
        out = Sums()
        for name, term in self.terms.items():
            count = term.count(batch, self.model_cfg)
            out[name], out[name + "_count"] = torch.zeros_like(count), count
        return out

    def sums(self, model, hidden: torch.Tensor, batch: Batch) -> Sums:
        out = self.counts(batch)
        for name, term in self.terms.items():
            out[name] = term.sum(model, hidden, batch)
        return out

    def loss(self, sums: Sums, total: Sums) -> torch.Tensor:
        """The objective of `sums` (a micro-batch's or the step's) over the step's `total`."""
        c = self.cfg
        mean = {n: sums[n] / total[n + "_count"].clamp(min=1) for n in self.terms}
        w = self.codebook_weights.to(mean["audio"].device)
        loss = c.text_loss_weight * mean["text"] + c.audio_loss_weight * (w * mean["audio"]).mean()
        if "voice" in mean:
            loss = loss + c.voice_consistency_weight * mean["voice"]
        return loss

    def metrics(self, total: Sums) -> dict:
        """The step's objective, each term's mean (audio: over and per codebook) and the counts."""
        means = {n: (total[n] / total[n + "_count"].clamp(min=1)).tolist() for n in self.terms}
        out = dict(loss=float(self.loss(total, total)))
        for name, mean in means.items():
            out[f"{name}_loss"] = sum(mean) / len(mean) if isinstance(mean, list) else mean
        return dict(out, audio_loss_per_codebook=means["audio"],
                    num_text_tokens=int(total["text_count"]),
                    num_audio_tokens_per_codebook=[int(c) for c in total["audio_count"].tolist()])
