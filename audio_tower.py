"""The Whisper audio tower some checkpoints carry (not the released one), under official names."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class WhisperAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x, key_bias):
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                             split(self.v_proj(x)), attn_mask=key_bias)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = WhisperAttention(d, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x, key_bias):
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_bias)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


def tower_lengths(mel_frames):
    """(frames after the stride-2 conv, states after 2x pooling) of `mel_frames`, int or tensor."""
    conv = (mel_frames - 1) // 2 + 1
    return conv, (conv - 2) // 2 + 1


class AudioTower(nn.Module):
    """Whisper encoder + 2x average pooling: 30 s of 128-bin log-mel (3000 frames) -> 750 states."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.whisper_d_model
        self.conv1 = nn.Conv1d(cfg.whisper_num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.whisper_max_source_positions, d)
        self.layers = nn.ModuleList(WhisperEncoderLayer(d, cfg.whisper_heads, cfg.whisper_ffn_dim)
                                    for _ in range(cfg.whisper_layers))
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, features, mel_lengths):
        x = F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1) + self.embed_positions.weight
        # As the official tower: the boolean key mask is ADDED to the scores, padding stays visible.
        valid = torch.arange(x.shape[1], device=x.device) < tower_lengths(mel_lengths)[0][:, None]
        key_bias = valid.to(x.dtype)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, key_bias)
        return self.layer_norm(F.avg_pool1d(x.permute(0, 2, 1), 2, 2).permute(0, 2, 1))


class AudioEncoderProj(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.linear = nn.Linear(cfg.whisper_d_model, cfg.hidden_size)

    def forward(self, x):
        return self.linear(x)
