"""Hand-written Higgs-Audio v2: a Llama-3 backbone with DualFFN layers, audio codebook embeddings,
an optional Whisper-style audio tower, and text + multi-codebook audio heads.

Module names mirror the official `boson_multimodal` checkpoint, so `state_dict()` keys are the
official parameter names. The forward takes a batch already expanded by `collate.py` (audio
placeholders replaced by their positions) and returns the final normed hidden states; `loss.py`
applies the heads only where a label exists.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from audio_tower import AudioEncoderProj, AudioTower, tower_lengths


@dataclass
class HiggsConfig:
    # Llama backbone
    vocab_size: int = 128256
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_layers: int = 28
    num_heads: int = 24
    num_kv_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # llama3 rope scaling; None = plain RoPE
    rope_scaling: dict | None = field(default_factory=lambda: dict(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192))
    # audio adapter
    audio_adapter_type: str = "dual_ffn_fast_forward"  # or "dual_ffn"
    audio_dual_ffn_layers: list[int] | None = None  # None = every layer
    audio_num_codebooks: int = 8
    audio_codebook_size: int = 1024  # real codes; +2 rows for stream BOS/EOS
    audio_stream_bos_id: int = 1024
    audio_stream_eos_id: int = 1025
    audio_embed_avg: bool = False
    use_delay_pattern: bool = True
    encode_audio_in_tokens: bool = True
    encode_whisper_embed: bool = False
    skip_audio_tower: bool = True
    # special token ids (read from the checkpoint; tiny test vocabularies move them)
    audio_in_token_id: int = 128015  # <|AUDIO|>
    audio_out_token_id: int = 128016  # <|AUDIO_OUT|>
    audio_out_bos_token_id: int = 128013  # <|audio_out_bos|>
    audio_eos_token_id: int = 128012  # <|audio_eos|>
    pad_token_id: int = 128001  # <|end_of_text|>
    # Whisper-style audio tower (only built when skip_audio_tower is False)
    whisper_d_model: int = 1280
    whisper_layers: int = 32
    whisper_heads: int = 20
    whisper_ffn_dim: int = 5120
    whisper_num_mel_bins: int = 128
    whisper_max_source_positions: int = 1500

    @property
    def codebook_rows(self) -> int:
        return self.audio_codebook_size + 2

    @property
    def has_audio_tower(self) -> bool:
        return not self.skip_audio_tower

    @property
    def uses_whisper(self) -> bool:
        return self.has_audio_tower and self.encode_whisper_embed

    def layer_kind(self, i: int) -> str:
        """'dual' (text + audio FFN), 'fast_forward' (audio positions skip the layer) or 'plain'."""
        if self.audio_dual_ffn_layers is None or i in self.audio_dual_ffn_layers:
            return "dual"
        if self.audio_adapter_type == "dual_ffn_fast_forward":
            return "fast_forward"
        if self.audio_adapter_type == "dual_ffn":
            return "plain"
        raise ValueError(f"unsupported audio_adapter_type {self.audio_adapter_type!r} "
                         "(supported: dual_ffn, dual_ffn_fast_forward)")

    @classmethod
    def released(cls) -> "HiggsConfig":
        """The shape of bosonai/higgs-audio-v2-generation-3B-base."""
        return cls()

    @classmethod
    def tiny(cls, vocab_size: int = 768, special_base: int = 512) -> "HiggsConfig":
        """A tiny model for tests and the demo; special ids mirror 128000+ at special_base."""
        s = lambda official: special_base + official - 128000  # noqa: E731
        return cls(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=3,
                   num_heads=4, num_kv_heads=2, head_dim=16, audio_num_codebooks=8,
                   audio_codebook_size=32, audio_stream_bos_id=32, audio_stream_eos_id=33,
                   audio_in_token_id=s(128015), audio_out_token_id=s(128016),
                   audio_out_bos_token_id=s(128013), audio_eos_token_id=s(128012),
                   pad_token_id=s(128001))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward, named like LlamaMLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    projections = ("gate_proj", "up_proj")  # linears that read the same input

    def project(self, x) -> tuple[torch.Tensor, ...]:
        """gate and up of x, a linear each; FusedMLP and lora.GroupedLoRAMLP batch them."""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x):
        gate, up = self.project(x)
        return self.down_proj(F.silu(gate) * up)


def rope_inv_freq(cfg: HiggsConfig, device=None) -> torch.Tensor:
    """Inverse RoPE frequencies, with Llama-3.1 frequency-dependent scaling when configured."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device)
                                    .float() / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype):
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Llama GQA attention through F.scaled_dot_product_attention (flash on GPU)."""

    def __init__(self, cfg: HiggsConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    projections = ("q_proj", "k_proj", "v_proj")  # linears that read the same input

    def project(self, x) -> tuple[torch.Tensor, ...]:
        """q, k, v of x, a linear each; FusedAttention and lora.GroupedLoRAAttention batch them."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, mask, kv: LayerKV | None = None):
        B, L, _ = x.shape
        q, k, v = [t.view(B, L, -1, self.head_dim).transpose(1, 2) for t in self.project(x)]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = [t * cos + _rotate_half(t) * sin for t in (q, k)]
        if kv is not None:  # generation: attend over every position run so far (mask is explicit)
            k, v = kv.append(k, v)
            if L == 1:  # a key/value head's query heads become its query rows: the cache is read
                # once, where enable_gqa with a mask would copy it once per query head
                qg = q.reshape(B, self.num_kv_heads, -1, self.head_dim)
                scores = torch.matmul(qg, k.transpose(-1, -2)) * self.head_dim ** -0.5
                scores = scores.masked_fill(~mask, float("-inf")).float().softmax(-1)
                out = torch.matmul(scores.to(v.dtype), v)
                return self.o_proj(out.reshape(B, 1, -1))
        # Right-padded rows need no mask: causal attention never reaches the trailing padding.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


def merge_rows(text_part, audio_part, text_index, audio_index) -> torch.Tensor:
    """Scatter the text-path rows and the audio-path rows back into one (N, D) tensor."""
    out = text_part.new_empty(text_index.numel() + audio_index.numel(), text_part.shape[-1])
    out.index_copy_(0, text_index, text_part)
    return out.index_copy_(0, audio_index, audio_part)


class DecoderLayer(nn.Module):
    """One backbone layer. kind 'dual': audio-code positions use audio_mlp and the audio norms;
    'fast_forward': audio-code positions pass through unchanged and text may not attend to them;
    'plain': a Llama layer for every position."""

    def __init__(self, cfg: HiggsConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if kind == "dual":
            self.audio_mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
            self.audio_input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.audio_post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, text_index, audio_index, ff_mask, mask=None, kv=None):
        """text_index/audio_index: flat positions of each path; the audio FFN runs even on no
        rows, so its adapters always get a gradient and DDP needs no unused-parameter search.
        ff_mask is None without audio; generation passes an explicit `mask` and a `kv` cache."""
        B, L, D = h.shape
        flat, dual = h.reshape(-1, D), self.kind == "dual"
        if dual:  # route each position to its own norm/FFN by index, no boolean copies
            normed = merge_rows(self.input_layernorm(flat[text_index]),
                                self.audio_input_layernorm(flat[audio_index]),
                                text_index, audio_index).view(B, L, D)
        else:
            normed = self.input_layernorm(h)
        skip_audio = self.kind == "fast_forward" and ff_mask is not None
        h2 = h + self.self_attn(normed, cos, sin, ff_mask if skip_audio else mask, kv)
        flat2 = h2.reshape(-1, D)
        if dual:
            text = self.mlp(self.post_attention_layernorm(flat2[text_index]))
            audio = self.audio_mlp(self.audio_post_attention_layernorm(flat2[audio_index]))
            return (flat2 + merge_rows(text, audio, text_index, audio_index)).view(B, L, D)
        if skip_audio:  # text positions get the FFN; audio positions keep the layer's input
            text = flat2[text_index]
            text = text + self.mlp(self.post_attention_layernorm(text))
            return merge_rows(text, flat[audio_index], text_index, audio_index).view(B, L, D)
        return h2 + self.mlp(self.post_attention_layernorm(h2))

    def decode_audio(self, h, cos, sin, mask, kv: StaticLayerKV):
        """forward for the decode step, where every position is audio-out, so nothing is routed.
        Fast-forward layers pass audio through and cache nothing: text queries never see those
        keys, and their own query's output is discarded."""
        if self.kind == "fast_forward":
            return h
        dual = self.kind == "dual"
        attn_norm = self.audio_input_layernorm if dual else self.input_layernorm
        ffn_norm = self.audio_post_attention_layernorm if dual else self.post_attention_layernorm
        h = h + self.self_attn(attn_norm(h), cos, sin, mask, kv)
        return h + (self.audio_mlp if dual else self.mlp)(ffn_norm(h))


class DecoderProj(nn.Module):
    """Holds both heads under the official names `audio_decoder_proj.{text,audio}_lm_head`."""

    def __init__(self, cfg: HiggsConfig):
        super().__init__()
        self.text_lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.audio_lm_head = nn.Linear(cfg.hidden_size, cfg.audio_num_codebooks * cfg.codebook_rows,
                                       bias=False)


class HiggsAudioModel(nn.Module):
    def __init__(self, cfg: HiggsConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.layer_kind(i)) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.audio_codebook_embeddings = nn.Embedding(cfg.audio_num_codebooks * cfg.codebook_rows,
                                                      cfg.hidden_size)
        self.audio_decoder_proj = DecoderProj(cfg)
        if cfg.has_audio_tower:
            self.audio_tower = AudioTower(cfg)
            self.audio_encoder_proj = AudioEncoderProj(cfg)
        self.register_buffer("rope_inv_freq", None, persistent=False)
        self.register_buffer("codebook_offsets", None, persistent=False)
        self.init_buffers(None)
        self.activation_checkpointing = False

    def init_buffers(self, device) -> None:
        """(Re)compute the non-persistent buffers, which a meta-device build leaves empty."""
        self.rope_inv_freq = rope_inv_freq(self.cfg, device=device)
        self.codebook_offsets = torch.arange(self.cfg.audio_num_codebooks,
                                             device=device) * self.cfg.codebook_rows

    def compile_layers(self, memory_budget: float = 1.0, dynamic: bool | None = True,
                       cpp_wrapper: bool = False) -> None:
        """torch.compile each layer, dynamic since lengths and the text/audio split vary per batch.
        memory_budget < 1 recomputes more of the forward in backward to hold fewer activations;
        cpp_wrapper launches the kernels from C++, so a slow host keeps the GPU waiting less."""
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = memory_budget
        for layer in self.layers:
            layer.compile(dynamic=dynamic, options={"cpp_wrapper": True} if cpp_wrapper else None)

    def embed_audio_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, K) -> (N, D): sum (or mean) over codebooks of row code_k + k * rows."""
        emb = self.audio_codebook_embeddings(codes + self.codebook_offsets)
        return emb.mean(1) if self.cfg.audio_embed_avg else emb.sum(1)

    def embed(self, batch) -> torch.Tensor:
        h = self.embed_tokens(batch.input_ids)
        B, L, D = h.shape
        flat = h.reshape(B * L, D)
        if batch.audio_codes.numel():  # .to: autocast gives an fp32 sum (the official splice fails)
            audio = self.embed_audio_codes(batch.audio_codes).to(flat.dtype)
            flat = flat.index_copy(0, batch.audio_index, audio)
        if batch.whisper_index.numel():
            states = self.audio_tower(batch.whisper_features, batch.whisper_mel_lengths)
            _, n_out = tower_lengths(batch.whisper_mel_lengths)
            valid = torch.arange(states.shape[1], device=h.device)[None, :] < n_out[:, None]
            flat = flat.index_copy(0, batch.whisper_index,
                                   self.audio_encoder_proj(states[valid]).to(flat.dtype))
        return flat.view(B, L, D)

    def forward(self, batch) -> torch.Tensor:
        """Final normed hidden states (B, L, D) for an expanded batch from `collate.collate`."""
        h = self.embed(batch)
        cos, sin = rope_cos_sin(self.rope_inv_freq, batch.position_ids, h.dtype)
        needs_ff = batch.audio_index.numel() and any(l.kind == "fast_forward" for l in self.layers)
        ff_mask = fast_forward_mask(batch.audio_mask) if needs_ff else None
        recompute = self.activation_checkpointing and self.training
        for layer in self.layers:
            args = (h, cos, sin, batch.text_index, batch.audio_index, ff_mask)
            h = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
        return self.norm(h)

    def forward_cached(self, h, position_ids, audio_mask, valid, cache: KVCache) -> torch.Tensor:
        """Generation: run new positions (B, Lq) of embeddings `h` after those in `cache`. Each
        attends to every earlier `valid` position and itself, so padding and finished rows never
        disturb the others. Uncompiled: compile_layers' traces would recompile every step."""
        cache.extend(valid, audio_mask)
        Lq, Lk = h.shape[1], cache.valid.shape[1]
        keys = torch.arange(Lk, device=h.device)
        queries = keys[Lk - Lq:, None]
        own = keys == queries
        mask = (((keys < queries) & cache.valid[:, None, :]) | own)[:, None]  # (B, 1, Lq, Lk)
        ff_mask = mask & (~cache.audio[:, None, None, :] | own)  # text never sees audio
        cos, sin = rope_cos_sin(self.rope_inv_freq, position_ids, h.dtype)
        flat = audio_mask.reshape(-1)
        audio_index, text_index = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
        for layer, kv in zip(self.layers, cache.layers):
            h = layer.forward(h, cos, sin, text_index, audio_index, ff_mask, mask, kv)
        return self.norm(h)

    def decode_step(self, codes, position_ids, active, cache: StaticKVCache) -> torch.Tensor:
        """Generation's fixed-shape step: one audio-out frame `codes` (B, K) per row, cached in
        column `cache.at`; the next frame's fp32 logits (B, K, rows). Fixed shapes and buffers let
        it compile once and replay as a CUDA graph; it equals forward_cached (test_generate)."""
        h = self.embed_audio_codes(codes).to(self.embed_tokens.weight.dtype)[:, None]
        cache.valid[:, cache.at] = active[:, None]
        own = torch.arange(cache.valid.shape[1], device=h.device) == cache.at
        mask = (cache.valid | own)[:, None, None]  # later columns are not valid yet
        cos, sin = rope_cos_sin(self.rope_inv_freq, position_ids, h.dtype)
        for layer, kv in zip(self.layers, cache.layers):
            h = layer.decode_audio(h, cos, sin, mask, kv)
        return self.audio_logits(self.norm(h)[:, 0]).float()

    # heads, applied by loss.py / evaluation only where needed
    def text_logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        return self.audio_decoder_proj.text_lm_head(hidden_rows)

    def audio_logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, K, codebook_rows)"""
        out = self.audio_decoder_proj.audio_lm_head(hidden_rows)
        return out.view(-1, self.cfg.audio_num_codebooks, self.cfg.codebook_rows)


def fast_forward_mask(audio_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool: causal, and no position attends to an audio-code key except an audio
    position to itself (its output is discarded; the diagonal keeps the row free of NaN)."""
    B, L = audio_mask.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=audio_mask.device).tril()
    eye = torch.eye(L, dtype=torch.bool, device=audio_mask.device)
    return (causal & (~audio_mask[:, None, :] | eye))[:, None]


class LayerKV:
    """One layer's keys and values (B, kv_heads, T, head_dim) of the positions run so far."""

    def __init__(self):
        self.k = self.v = None

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache:
    """Generation state: each layer's keys and values, which cached positions are real (padding
    is never attended) and which are audio codes (hidden from text in fast-forward layers)."""

    def __init__(self, num_layers: int):
        self.layers = [LayerKV() for _ in range(num_layers)]
        self.valid = self.audio = None  # (B, T) bool

    def extend(self, valid, audio) -> None:
        cat = lambda old, new: new if old is None else torch.cat([old, new], dim=1)  # noqa: E731
        self.valid, self.audio = cat(self.valid, valid), cat(self.audio, audio)


class StaticLayerKV:
    """One layer's keys and values in preallocated (B, kv_heads, max_len, head_dim) buffers,
    written in place at column `at` (one for all layers): fixed addresses for a CUDA graph."""

    def __init__(self, k, v, at):
        self.k, self.v, self.at = k, v, at

    def append(self, k, v):
        self.k[:, :, self.at] = k
        self.v[:, :, self.at] = v
        return self.k, self.v


class StaticKVCache:
    """The decode step's cache: a prefill KVCache, then one column per frame; `valid` marks the
    columns later positions may attend. Decode queries are all audio, so no audio record."""

    def __init__(self, cfg: HiggsConfig, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        # zeros, not empty: a masked column still enters attention as 0 * value
        self.at = torch.zeros(1, dtype=torch.long, device=device)
        self.layers = [StaticLayerKV(torch.zeros(shape, dtype=dtype, device=device),
                                     torch.zeros(shape, dtype=dtype, device=device), self.at)
                       for _ in range(cfg.num_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.at, self.valid] + [t for kv in self.layers for t in (kv.k, kv.v)]

    def load(self, prefill: KVCache) -> None:
        """Start from a prefill's cache; the first frame goes in the column after it."""
        n = prefill.valid.shape[1]
        for kv, done in zip(self.layers, prefill.layers):
            kv.k[:, :, :n] = done.k
            kv.v[:, :, :n] = done.v
        self.valid.zero_()
        self.valid[:, :n] = prefill.valid
        self.at.fill_(n)


def init_weights(model: HiggsAudioModel) -> None:
    """Random init for tests, demo and benchmarks: unit-scale activations, O(1) logits."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            fan_in = module.weight[0].numel()
            nn.init.normal_(module.weight, std=fan_in ** -0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)


def build_model(cfg: HiggsConfig, device="cpu", dtype=torch.float32, seed: int = 0) -> HiggsAudioModel:
    """A randomly initialised model (the `--model tiny` path)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HiggsAudioModel(cfg)
        init_weights(model)
    return model.to(device=device, dtype=dtype)


def random_model(cfg: HiggsConfig, device, dtype) -> HiggsAudioModel:
    """A random model built on the device (bench.py, rehearse.py): unlike build_model, no fp32
    copy of the released shape passes through host memory."""
    torch.manual_seed(0)
    with torch.device(device):
        model = HiggsAudioModel(cfg)
    init_weights(model)
    return model.to(dtype)


def plain_type(module: nn.Module) -> type | None:
    """Attention or MLP for a module of either kind (plain, fused, grouped LoRA), else None."""
    return next((c for c in type(module).__mro__ if c in (Attention, MLP)), None)


def retyped(module: nn.Module, cls: type) -> nn.Module:
    """A module of class `cls` sharing `module`'s submodules, parameters and attributes."""
    new = cls.__new__(cls)
    new.__dict__.update({k: v.copy() if k in ("_modules", "_parameters", "_buffers") else v
                         for k, v in module.__dict__.items()})
    return new


def replace_modules(model: nn.Module, make) -> int:
    """Put `make(name, module)` in place of every module for which it returns one; the count."""
    count = 0
    for name, module in list(model.named_modules()):
        new = make(name, module)
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            count += 1
    return count


class FusedProjections:
    """For generation: sibling linears (q/k/v, gate/up) as one GEMM, since a GEMM of a few rows is
    bound by reading its weights. The linears' weights become views of the fused tensor (no memory
    added), so an optimizer made before, or a model.to() after, would not see the new storage."""

    def fuse(self) -> "FusedProjections":
        linears = [getattr(self, n) for n in self.projections]
        self.fused_weight = torch.cat([m.weight for m in linears])
        self.fused_sizes = [m.out_features for m in linears]
        for m, rows in zip(linears, self.fused_weight.split(self.fused_sizes)):
            m.weight = nn.Parameter(rows, requires_grad=m.weight.requires_grad)
        return self

    def project(self, x) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.fused_weight).split(self.fused_sizes, dim=-1)


class FusedAttention(FusedProjections, Attention):
    """Attention with q/k/v as one GEMM (generation)."""


class FusedMLP(FusedProjections, MLP):
    """SwiGLU with gate/up as one GEMM (generation)."""


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """For generation: each Attention / MLP whose siblings are bias-free nn.Linear (no adapter)
    becomes a FusedAttention / FusedMLP. Returns the number fused."""
    fused = {Attention: FusedAttention, MLP: FusedMLP}

    def make(_, m):
        if type(m) in fused and all(type(getattr(m, n)) is nn.Linear and getattr(m, n).bias is None
                                    for n in m.projections):
            return retyped(m, fused[type(m)]).fuse()
    return replace_modules(model, make)
