"""Text + multi-codebook audio loss (SPEC section 7).

Losses are returned as SUMS with their token COUNTS, so a caller can add them over micro-batches
and ranks and divide once by the global count: the result does not depend on how a step's
samples are split into batches. Heads are applied only where a label exists.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from collate import IGNORE, Batch

TEXT_CHUNK_ROWS = 4096  # text logits are materialised this many positions at a time


@dataclass
class LossSums:
    text_sum: torch.Tensor  # () fp32, summed CE over supervised text tokens
    text_count: torch.Tensor  # () number of supervised text tokens
    audio_sum: torch.Tensor  # (K,) fp32, summed CE per codebook
    audio_count: torch.Tensor  # (K,) supervised frames per codebook

    @staticmethod
    def counts(batch: Batch, K: int, device) -> "LossSums":
        """Zero sums with the batch's token counts (known before any forward)."""
        return LossSums(torch.zeros((), device=device),
                        torch.tensor(float(batch.num_text_tokens), device=device),
                        torch.zeros(K, device=device),
                        batch.num_audio_tokens().to(device=device, dtype=torch.float32))

    def __add__(self, other: "LossSums") -> "LossSums":
        return LossSums(self.text_sum + other.text_sum, self.text_count + other.text_count,
                        self.audio_sum + other.audio_sum, self.audio_count + other.audio_count)

    def detach(self) -> "LossSums":
        return LossSums(*(t.detach() for t in (self.text_sum, self.text_count, self.audio_sum,
                                               self.audio_count)))

    def as_vector(self) -> torch.Tensor:
        """[text_sum, text_count, audio_sum..., audio_count...] for one all_reduce."""
        return torch.cat([self.text_sum.view(1).float(), self.text_count.view(1).float(),
                          self.audio_sum.float(), self.audio_count.float()])

    @staticmethod
    def from_vector(v: torch.Tensor) -> "LossSums":
        K = (v.numel() - 2) // 2
        return LossSums(v[0], v[1], v[2:2 + K], v[2 + K:])

    def metrics(self) -> dict:
        """Token-weighted means: text_loss, audio_loss (mean over codebooks), per codebook."""
        per_cb = (self.audio_sum / self.audio_count.clamp(min=1)).tolist()
        return dict(
            text_loss=float(self.text_sum / self.text_count.clamp(min=1)),
            audio_loss=float(sum(per_cb) / len(per_cb)) if per_cb else 0.0,
            audio_loss_per_codebook=per_cb,
            num_text_tokens=int(self.text_count),
            num_audio_tokens_per_codebook=[int(c) for c in self.audio_count.tolist()],
        )


def text_ce_sum(model, hidden_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed CE of the text head over (M, D) rows, computed in chunks so that at most
    TEXT_CHUNK_ROWS x vocab logits exist at once (fp32 for the softmax)."""
    total = hidden_rows.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden_rows.shape[0], TEXT_CHUNK_ROWS):
        logits = model.text_logits(hidden_rows[start:start + TEXT_CHUNK_ROWS]).float()
        total = total + F.cross_entropy(logits, targets[start:start + TEXT_CHUNK_ROWS],
                                        reduction="sum")
    return total


def loss_sums(model, hidden: torch.Tensor, batch: Batch) -> LossSums:
    """Text CE (logits at t vs label t+1) and per-codebook audio CE (stream position j vs frame
    j+1) as sums and counts."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    text_sum = text_ce_sum(model, flat[batch.text_logit_index], batch.text_targets)
    K = model.cfg.audio_num_codebooks
    if batch.audio_logit_rows.numel():
        rows = flat[batch.audio_out_index[batch.audio_logit_rows]]
        logits = model.audio_logits(rows).float()  # (M, K, C)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.audio_targets.reshape(-1),
                             ignore_index=IGNORE, reduction="none").view(-1, K)
        audio_sum = ce.sum(0)
    else:
        audio_sum = flat.new_zeros(K, dtype=torch.float32) + 0.0 * flat.sum()
    # filled on the device: a host-made tensor here would make the host wait for the forward
    text_count = flat.new_full((), batch.num_text_tokens, dtype=torch.float32)
    audio_count = batch.num_audio_tokens().to(device=flat.device, dtype=torch.float32)
    return LossSums(text_sum, text_count, audio_sum, audio_count)


def voice_position_counts(batch: Batch) -> torch.Tensor:
    """(B, 2): reference-audio and target-audio positions per sample."""
    B = batch.input_ids.shape[0]
    return torch.bincount(batch.voice_group, minlength=2 * B).view(B, 2)


def voice_consistency_sums(hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over samples of 1 - cos(mean final hidden state over the reference-audio positions,
    mean over the target-audio positions), and the number of samples that have both."""
    flat = hidden.reshape(-1, hidden.shape[-1]).float()
    B = hidden.shape[0]
    groups = flat.new_zeros(2 * B, flat.shape[1]).index_add(0, batch.voice_group,
                                                           flat[batch.voice_index])
    counts = voice_position_counts(batch)
    means = (groups.view(B, 2, -1) / counts.clamp(min=1)[..., None].to(flat.dtype))
    both = (counts > 0).all(dim=1)
    cos = F.cosine_similarity(means[:, 0], means[:, 1], dim=-1)
    return ((1 - cos) * both).sum(), both.sum().to(flat.dtype)


def normalised_codebook_weights(weights: list[float] | None, K: int) -> torch.Tensor:
    """Per-codebook weights scaled to sum to K, so the default (all ones) is the plain mean."""
    if weights is None:
        return torch.ones(K)
    if len(weights) != K or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--codebook_weights needs {K} non-negative numbers with a positive sum, "
                         f"got {weights}")
    w = torch.tensor(weights, dtype=torch.float32)
    return w * (K / w.sum())


def total_loss(sums: LossSums, global_sums: LossSums, text_weight: float = 1.0,
               audio_weight: float = 1.0, codebook_weights: torch.Tensor | None = None):
    """The objective for backward: local sums divided by the step's GLOBAL token counts
    (summed over micro-batches and ranks). audio term = weighted mean over codebooks."""
    text = sums.text_sum / global_sums.text_count.clamp(min=1)
    per_cb = sums.audio_sum / global_sums.audio_count.clamp(min=1)
    w = codebook_weights.to(per_cb.device) if codebook_weights is not None else torch.ones_like(per_cb)
    audio = (w * per_cb).mean()
    return text_weight * text + audio_weight * audio
