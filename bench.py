"""Training-step benchmark: our model with LoRA on synthetic voice-cloning batches.

    python bench.py                                   # released shape, random weights, GPU
    python bench.py --device cpu --preset tiny        # smoke run without a GPU

    torchrun --nproc_per_node 8 bench.py              # + DDP scaling: per-GPU positions/s and
                                                      # efficiency against the same step alone

Each sample: 40 text tokens, a reference clip as a context assistant turn (--ref_seconds of
codes), 40 more text tokens, a trained target clip (--target_seconds). Times forward + backward
+ optimizer after warm-up; the last line is JSON with positions_per_s, target_audio_s_per_s,
mfu (FLOPs counted as in train.step_flops), peak_gib, the CPU data pipeline's samples/s, and the
versions and host CPU that produced them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from collate import Collator
from data import AudioSegment, Sample
from lora import count_parameters, inject_lora
from loss import total_loss
from model import HiggsAudioModel, HiggsConfig, init_weights
from train import data_parallel, init_distributed, step_flops


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


def baseline_model(cfg: HiggsConfig, r: int, alpha: float, device, dtype):
    """transformers' HiggsAudioV2ForConditionalGeneration (text head on) + PEFT LoRA on every
    linear of attention, text FFN and audio FFN: the stack people use today."""
    import peft
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    tcfg = HiggsAudioV2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, num_codebooks=cfg.audio_num_codebooks,
        codebook_size=cfg.codebook_rows, audio_token_id=cfg.audio_out_token_id,
        audio_bos_token_id=cfg.audio_out_bos_token_id, audio_stream_bos_id=cfg.audio_stream_bos_id,
        audio_stream_eos_id=cfg.audio_stream_eos_id, pad_token_id=cfg.pad_token_id,
        max_position_embeddings=131072,
        rope_parameters=dict(cfg.rope_scaling, rope_theta=cfg.rope_theta))
    tcfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = HiggsAudioV2ForConditionalGeneration(tcfg, use_text_head=True).to(dtype)
    lcfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return peft.get_peft_model(model, lcfg)


def baseline_inputs(batch, cfg: HiggsConfig) -> dict:
    """The identical expanded batch in transformers' input format."""
    B, L = batch.input_ids.shape
    ids = batch.input_ids.clone()
    ids[batch.audio_mask] = cfg.audio_out_token_id
    per_row = batch.audio_mask.sum(1)
    n = int(per_row.max())
    audio = batch.audio_codes.new_zeros(B, n, cfg.audio_num_codebooks)
    mask = torch.arange(n, device=ids.device)[None, :] < per_row[:, None]
    audio[mask] = batch.audio_codes
    labels = torch.full_like(audio, -100)
    is_out = torch.isin(batch.audio_index, batch.audio_out_index)
    stream = torch.full_like(batch.audio_codes, -100)
    stream[is_out] = batch.audio_out_labels
    labels[mask] = stream
    return dict(input_ids=ids, attention_mask=batch.attention_mask.long(), audio_input_ids=audio,
                audio_input_ids_mask=mask, labels=batch.labels, audio_labels=labels)


def environment() -> dict:
    """Versions and host CPU: both move the numbers (the baseline's memory follows the
    transformers version; at batch 8 the host CPU's speed sets how long the GPU waits)."""
    import platform

    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft_version,
                host_cpu=cpu, host_cores=os.cpu_count())


def time_steps(step, warmup: int, steps: int, device) -> tuple[float, float, float | None]:
    """(median seconds per step, max/min step-time ratio, peak GiB) after warm-up. Each step is
    timed on its own (synchronized) and the median taken, so one stall of a shared host does
    not move the result; the ratio shows how steady the steps were."""
    for _ in range(warmup):
        step()
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
    return statistics.median(times), max(times) / min(times), peak


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
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--peak_tflops", type=float, default=989.0)
    p.add_argument("--memory_budget", type=float, default=1.0,
                   help="torch.compile activation memory budget (<1 recomputes cheap ops in backward)")
    p.add_argument("--cpp_wrapper", action="store_true",
                   help="with --compile: launch the compiled kernels from C++ (less host overhead)")
    p.add_argument("--static", action="store_true",
                   help="compile for the first batch's shapes (recompiles when they change)")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step")
    p.add_argument("--trace", default="", help="with --profile: write a Chrome trace (CPU + CUDA) here")
    p.add_argument("--baseline", action="store_true",
                   help="also time transformers + PEFT on the identical batch (needs peft)")
    args = p.parse_args(argv)

    d = init_distributed(args.device)  # under torchrun: one process per GPU, DDP as train.py
    device = torch.device(args.device, d.local_rank) if args.device == "cuda" else torch.device(args.device)
    cfg = HiggsConfig.released() if args.preset == "released" else HiggsConfig.tiny()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = HiggsAudioModel(cfg)
    init_weights(model)
    model.to(dtype)
    inject_lora(model, args.lora_r, args.lora_alpha, 0.0)
    model.activation_checkpointing = args.activation_checkpointing
    if args.compile:
        model.compile_layers(args.memory_budget, dynamic=None if args.static else True,
                             cpp_wrapper=args.cpp_wrapper)
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

    def training_step(module):
        """One optimizer step through `module` (model + loss, as train.data_parallel builds it)."""
        def step():
            if args.compile:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast:
                sums, _ = module(batch, False)
                loss = total_loss(sums, sums.detach())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    step = training_step(data_parallel(model, device, 1))
    dt, spread, peak = time_steps(step, args.warmup, args.steps, device)
    if args.profile:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.trace else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        print(events.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
        # kernel time / wall time: well below 1 means the GPU waits on the host (launch-bound)
        # device-side events only: with --trace the CPU ops also carry their kernels' time
        on_gpu = [e for e in events if e.device_type == DeviceType.CUDA]
        kernel_s = sum(e.self_device_time_total for e in on_gpu) / 1e6
        kernels = sum(e.count for e in on_gpu)
        print(f"profiled step: {wall * 1e3:.1f} ms wall, {kernel_s * 1e3:.1f} ms in {kernels} "
              f"kernels, GPU busy {kernel_s / wall:.0%}")
        if args.trace:
            prof.export_chrome_trace(args.trace)
    positions = float(batch.attention_mask.sum())
    result = dict(
        preset=args.preset, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        batch_size=args.batch_size, positions_per_sample=positions / args.batch_size,
        trainable_params=trainable, total_params=total, step_seconds=dt, step_time_spread=spread,
        positions_per_s=positions / dt,
        target_audio_s_per_s=args.batch_size * args.target_seconds / dt,
        mfu=step_flops(model, batch) / dt / (args.peak_tflops * 1e12) if device.type == "cuda" else None,
        peak_gib=peak, pipeline_samples_per_s=pipeline_samples_per_s,
        activation_checkpointing=args.activation_checkpointing, compile=args.compile,
        memory_budget=args.memory_budget, cpp_wrapper=args.cpp_wrapper, **environment())

    if d.world > 1:  # the same step through DDP: gradient all-reduce over every rank
        import torch.distributed as dist

        ddp_step = training_step(data_parallel(model, device, d.world))
        ddp_dt, _, _ = time_steps(ddp_step, args.warmup, args.steps, device)
        result.update(world_size=d.world, per_gpu_positions_per_s=positions / ddp_dt,
                      total_positions_per_s=d.world * positions / ddp_dt,
                      scaling_efficiency=dt / ddp_dt)
        dist.destroy_process_group()
        if not d.main:
            return result

    if args.baseline:
        if result["peft"] is None:  # environment() found no peft
            print("--baseline skipped: pip install peft (a benchmark-only dependency)")
        else:
            del model, opt, params
            if device.type == "cuda":
                torch.cuda.empty_cache()
            base = baseline_model(cfg, args.lora_r, args.lora_alpha, device, dtype)
            base.train()
            if args.activation_checkpointing:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base_opt = torch.optim.AdamW([q for q in base.parameters() if q.requires_grad], lr=1e-5,
                                         fused=device.type == "cuda")
            inputs = baseline_inputs(batch, cfg)

            def base_step():
                # no autocast: its fp32 audio-embedding sum breaks transformers' masked_scatter
                # (the same bug as the official code); weights bf16, PEFT adapters fp32
                loss = base(**inputs).loss
                loss.backward()
                base_opt.step()
                base_opt.zero_grad(set_to_none=True)

            base_dt, _, base_peak = time_steps(base_step, args.warmup, args.steps, device)
            result.update(baseline_positions_per_s=positions / base_dt, baseline_peak_gib=base_peak,
                          speedup=base_dt / dt,
                          memory_ratio=peak / base_peak if peak and base_peak else None)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
