"""Training-step benchmark: our model with LoRA on synthetic voice-cloning batches.

    python bench.py                                   # released shape, random weights, GPU
    python bench.py --device cpu --preset tiny        # smoke run without a GPU

Each sample: 40 text tokens, a reference clip as a context assistant turn (--ref_seconds of
codes), 40 more text tokens, a trained target clip (--target_seconds). Times forward + backward
+ optimizer after warm-up; the last line is JSON with positions_per_s, target_audio_s_per_s,
mfu (FLOPs counted as in train.step_flops), peak_gib, and the CPU data pipeline's samples/s.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from collate import Collator
from data import AudioSegment, Sample
from lora import count_parameters, inject_lora
from loss import loss_sums, total_loss
from model import HiggsAudioModel, HiggsConfig, init_weights
from train import step_flops


def synthetic_samples(cfg: HiggsConfig, n: int, text_tokens: int, ref_s: float, target_s: float,
                      seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    # ordinary text ids lie below <|begin_of_text|> (pad <|end_of_text|> is the next one)
    text = lambda: torch.randint(0, cfg.pad_token_id - 1, (text_tokens,), generator=g)  # noqa: E731
    triplet = torch.tensor([cfg.audio_out_bos_token_id, cfg.audio_out_token_id, cfg.audio_eos_token_id])
    samples = []
    for _ in range(n):
        ids = torch.cat([text(), triplet, text(), triplet, torch.tensor([cfg.pad_token_id])])
        labels = torch.full_like(ids, -100)
        labels[-4:] = ids[-4:]  # the target turn's triplet and its end token are trained
        codes = [torch.randint(0, cfg.audio_codebook_size, (cfg.audio_num_codebooks, int(s * 25)),
                               generator=g) for s in (ref_s, target_s)]
        samples.append(Sample(ids, labels, [AudioSegment(c, None, True) for c in codes]))
    return samples


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["released", "tiny"], default="released")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--text_tokens", type=int, default=40)
    p.add_argument("--ref_seconds", type=float, default=8.0)
    p.add_argument("--target_seconds", type=float, default=10.0)
    p.add_argument("--lora_r", type=int, default=64)
    p.add_argument("--lora_alpha", type=float, default=128.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--peak_tflops", type=float, default=989.0)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cfg = HiggsConfig.released() if args.preset == "released" else HiggsConfig.tiny()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = HiggsAudioModel(cfg)
    init_weights(model)
    model.to(dtype)
    inject_lora(model, args.lora_r, args.lora_alpha, 0.0)
    model.activation_checkpointing = args.activation_checkpointing
    model.train()
    trainable, total = count_parameters(model)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    samples = synthetic_samples(cfg, args.batch_size, args.text_tokens, args.ref_seconds,
                                args.target_seconds)
    collator = Collator(cfg)
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        batch = collator(samples)
    pipeline_samples_per_s = reps * len(samples) / (time.perf_counter() - t0)
    batch = batch.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            sums = loss_sums(model, model(batch), batch)
            loss = total_loss(sums, sums.detach())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    positions = float(batch.attention_mask.sum())
    result = dict(
        preset=args.preset, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        batch_size=args.batch_size, positions_per_sample=positions / args.batch_size,
        trainable_params=trainable, total_params=total, step_seconds=dt,
        positions_per_s=positions / dt,
        target_audio_s_per_s=args.batch_size * args.target_seconds / dt,
        mfu=step_flops(model, batch) / dt / (args.peak_tflops * 1e12) if device.type == "cuda" else None,
        peak_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
        loss=float(loss.detach()), pipeline_samples_per_s=pipeline_samples_per_s,
        activation_checkpointing=args.activation_checkpointing)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
