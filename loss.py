"""The training objective: text cross-entropy + per-codebook audio cross-entropy (OFFICIAL.md
section 7), weighted, plus an optional voice-consistency term.

Losses are kept as SUMS with their token COUNTS (LossSums), so a caller adds them over
micro-batches and ranks and divides once by the global count: the result does not depend on how a
step's samples are split. Heads are applied only where a label exists.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F

from chatml import IGNORE, DataError
from collate import Batch

TEXT_CHUNK_ROWS = 4096  # text logits are materialised this many positions at a time


@dataclass
class LossSums:
    text_sum: torch.Tensor  # () summed CE over supervised text tokens
    text_count: torch.Tensor  # () supervised text tokens
    audio_sum: torch.Tensor  # (K,) summed CE per codebook
    audio_count: torch.Tensor  # (K,) supervised frames per codebook
    voice_sum: torch.Tensor  # () summed 1 - cos(reference, target) (voice-consistency term)
    voice_count: torch.Tensor  # () samples with both reference and target audio

    @staticmethod
    def zeros(K: int, device=None) -> "LossSums":
        z = lambda *shape: torch.zeros(shape, device=device)  # noqa: E731
        return LossSums(z(), z(), z(K), z(K), z(), z())

    def __add__(self, other: "LossSums") -> "LossSums":
        return LossSums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def detach(self) -> "LossSums":
        return LossSums(*(getattr(self, f.name).detach() for f in fields(self)))

    def to(self, device) -> "LossSums":
        return LossSums(*(getattr(self, f.name).to(device) for f in fields(self)))

    def all_reduced(self) -> "LossSums":
        """Summed over every rank, in one collective."""
        parts = [getattr(self, f.name).float().reshape(-1) for f in fields(self)]
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        sizes = [p.numel() for p in parts]
        return LossSums(*(t.view_as(getattr(self, f.name)) for f, t in
                          zip(fields(self), flat.split(sizes))))


def text_ce_sum(model, hidden_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed CE of the text head over (M, D) rows, computed in chunks so that at most
    TEXT_CHUNK_ROWS x vocab logits exist at once (fp32 for the softmax)."""
    total = hidden_rows.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden_rows.shape[0], TEXT_CHUNK_ROWS):
        logits = model.text_logits(hidden_rows[start:start + TEXT_CHUNK_ROWS]).float()
        total = total + F.cross_entropy(logits, targets[start:start + TEXT_CHUNK_ROWS],
                                        reduction="sum")
    return total


def audio_ce_sums(model, flat_hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(K,) summed CE per codebook: stream position j predicts frame j+1."""
    K = model.cfg.audio_num_codebooks
    if not batch.audio_logit_rows.numel():  # keeps the heads in the graph (DDP needs every grad)
        return flat_hidden.new_zeros(K, dtype=torch.float32) + 0.0 * flat_hidden.sum()
    rows = flat_hidden[batch.audio_out_index[batch.audio_logit_rows]]
    logits = model.audio_logits(rows).float()  # (M, K, C)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.audio_targets.reshape(-1),
                         ignore_index=IGNORE, reduction="none")
    return ce.view(-1, K).sum(0)


def audio_token_counts(batch: Batch) -> torch.Tensor:
    """(K,) supervised audio frames per codebook."""
    return (batch.audio_targets != IGNORE).sum(0).float()


def voice_groups(batch: Batch, bos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions, group = 2 * row + is_target) of every sample's reference audio (audio-in
    codes and context audio-out segments) and target audio (trained audio-out segments). An
    audio-out segment starts with an all-stream-BOS frame; it is trained if it has any label.
    Only gathers and scatters of known sizes: on the GPU the host never waits for the forward."""
    L = batch.input_ids.shape[1]
    out_rows = torch.searchsorted(batch.audio_index, batch.audio_out_index)  # both ascending
    starts = (batch.audio_codes[out_rows] == bos).all(1)
    segment = starts.long().cumsum(0) - 1
    labelled = (batch.audio_out_labels != IGNORE).any(1).long()
    trained = torch.zeros_like(segment).index_add_(0, segment, labelled) > 0  # per segment
    is_target = torch.zeros_like(batch.audio_index).index_copy_(0, out_rows,
                                                                 trained[segment].long())
    return batch.audio_index, 2 * (batch.audio_index // L) + is_target


def voice_group_sizes(group: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2) reference and target positions per sample, and which samples have both."""
    # not bincount: its output size is read from the GPU, which makes the host wait
    sizes = torch.zeros(2 * B, dtype=torch.long, device=group.device) \
        .index_add_(0, group, torch.ones_like(group)).view(B, 2)
    return sizes, (sizes > 0).all(dim=1)


def voice_consistency_sums(hidden: torch.Tensor, batch: Batch, bos: int):
    """Sum over samples of 1 - cos(mean final hidden state over the reference-audio positions,
    mean over the target-audio positions), and the number of samples that have both."""
    B = hidden.shape[0]
    positions, group = voice_groups(batch, bos)
    flat = hidden.reshape(-1, hidden.shape[-1]).float()
    totals = flat.new_zeros(2 * B, flat.shape[1]).index_add(0, group, flat[positions])
    sizes, both = voice_group_sizes(group, B)
    means = totals.view(B, 2, -1) / sizes.clamp(min=1)[..., None].to(flat.dtype)
    cos = F.cosine_similarity(means[:, 0], means[:, 1], dim=-1)
    return ((1 - cos) * both).sum(), both.sum().to(flat.dtype)


def parse_codebook_weights(text: str, K: int) -> torch.Tensor:
    """--codebook_weights "4,1,1,1,1,1,1,1" scaled to sum to K, so all ones is the plain mean."""
    if not text:
        return torch.ones(K)
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != K or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"--codebook_weights {text}: must be {K} comma-separated numbers >= 0 "
                        "with a positive sum, one per codebook of the model")
    w = torch.tensor(weights, dtype=torch.float32)
    return w * (K / w.sum())


@dataclass
class Objective:
    """What the optimiser minimises: text_weight * text CE + audio_weight * (codebook-weighted
    mean of the per-codebook audio CEs) + voice_weight * mean (1 - cos) of the voice term; each
    term divided by its token (or sample) count over the whole step."""
    cfg: object  # HiggsConfig
    text_weight: float = 1.0
    audio_weight: float = 1.0
    codebook_weights: torch.Tensor | None = None  # (K,) summing to K; None = equal
    voice_weight: float = 0.0

    def counts(self, batch: Batch) -> LossSums:
        """Zero sums with the batch's counts: known on the host before any forward."""
        zero = torch.zeros(())
        voice = zero
        if self.voice_weight:
            _, group = voice_groups(batch, self.cfg.audio_stream_bos_id)
            voice = voice_group_sizes(group, batch.input_ids.shape[0])[1].sum().float()
        audio_count = audio_token_counts(batch)
        return LossSums(zero, torch.tensor(float(batch.text_targets.numel())),
                        torch.zeros_like(audio_count), audio_count, zero, voice)

    def sums(self, model, hidden: torch.Tensor, batch: Batch) -> LossSums:
        flat = hidden.reshape(-1, hidden.shape[-1])
        zero = flat.new_zeros((), dtype=torch.float32)
        voice = voice_consistency_sums(hidden, batch, self.cfg.audio_stream_bos_id) \
            if self.voice_weight else (zero, zero)
        # counts filled on the device: a host-made tensor would make the host wait for the forward
        return LossSums(text_ce_sum(model, flat[batch.text_logit_index], batch.text_targets),
                        flat.new_full((), batch.text_targets.numel(), dtype=torch.float32),
                        audio_ce_sums(model, flat, batch), audio_token_counts(batch), *voice)

    def loss(self, sums: LossSums, total: LossSums) -> torch.Tensor:
        """The objective of `sums` (one micro-batch's, for backward, or the step's) divided by
        the step's global counts `total`."""
        per_cb = sums.audio_sum / total.audio_count.clamp(min=1)
        w = torch.ones_like(per_cb) if self.codebook_weights is None \
            else self.codebook_weights.to(per_cb.device)
        loss = self.text_weight * sums.text_sum / total.text_count.clamp(min=1) + \
            self.audio_weight * (w * per_cb).mean()
        if self.voice_weight:
            loss = loss + self.voice_weight * sums.voice_sum / total.voice_count.clamp(min=1)
        return loss

    def metrics(self, total: LossSums) -> dict:
        """The step's objective (`loss`) and its parts as token-weighted means."""
        per_cb = (total.audio_sum / total.audio_count.clamp(min=1)).tolist()
        out = dict(loss=float(self.loss(total, total)),
                   text_loss=float(total.text_sum / total.text_count.clamp(min=1)),
                   audio_loss=sum(per_cb) / len(per_cb), audio_loss_per_codebook=per_cb,
                   num_text_tokens=int(total.text_count),
                   num_audio_tokens_per_codebook=[int(c) for c in total.audio_count.tolist()])
        if self.voice_weight:
            out["voice_consistency"] = float(total.voice_sum / total.voice_count.clamp(min=1))
        return out
