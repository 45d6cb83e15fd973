"""Benchmarks at a preset's shape, random weights: the LoRA training step, generation, train.py.

    python bench.py                                   # training step, released shape, GPU
    python bench.py --device cpu --preset tiny        # smoke run without a GPU
    torchrun --nproc_per_node 8 bench.py              # + DDP scaling against the same step alone
    python bench.py --generate --batch_size 16 [--frames 250] [--baseline]
    python bench.py --data DIR --compile --batch_size 16 [--epochs 2]

A training sample: text, a --ref_seconds reference clip, text, a trained --target_seconds clip.
--generate times whole greedy voice-cloning calls; --data times train.py itself on a data file or
folder (`python rehearse.py corpus` writes one) from a fresh start, against the fixed-shape step
(under torchrun, N times one GPU's step: the shares then include the scaling);
--baseline also times transformers (+ PEFT) on the same inputs. The last line is JSON.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import train
from audio import CODES_FRAME_RATE
from chatml import AudioSegment, Sample
from checkpoint import model_spec, official_config, transformers_config, transformers_name
from generate import Prompt, Sampling, generate, prompt_inputs
from cli import option, parse
from collate import Collator
from data import Spec, open_dataset
from device import autocast, init_distributed, local_rank, resolve_device
from errors import ConfigError, UserError
from fp8 import SCALINGS, check_fp8, use_fp8
from lora import count_parameters, inject_lora
from loss import Objective
from model import HiggsAudioModel, HiggsConfig, KVCache, fuse_projections, random_model
from rehearse import released_tokenizer
from train import H100_BF16_TFLOPS, data_parallel, step_flops


@dataclass
class BenchConfig:
    """Training-step benchmark at the released shape (random weights)"""
    preset: str = option("released", "model shape", choices=("released", "tiny"))
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", "cuda or cpu",
                         choices=("cuda", "cpu"))
    batch_size: int = option(8, "samples per step", min=1)
    text_tokens: int = option(40, "text tokens before each clip of a sample", min=1)
    ref_seconds: float = option(8.0, "reference clip (context audio), seconds", above=0)
    target_seconds: float = option(10.0, "target clip (trained audio), seconds", above=0)
    lora_r: int = option(64, "LoRA rank", min=1)
    lora_alpha: float = option(128.0, "LoRA alpha", above=0)
    steps: int = option(0, "timed steps (median reported); 0: 10, or 3 with --generate", min=0)
    warmup: int = option(-1, "untimed steps first (compiling); -1: 3, or 1 with --generate", min=-1)
    activation_checkpointing: bool = option(False, "recompute each layer in backward")
    compile: bool = option(False, "torch.compile each decoder layer")
    peak_tflops: float = option(H100_BF16_TFLOPS, "per-GPU peak bf16 TFLOP/s for MFU", above=0)
    memory_budget: float = option(1.0, "with --compile: activation memory budget; below 1 "
                                  "recomputes cheap ops in backward", above=0, max=1)
    cpp_wrapper: bool = option(False, "with --compile: launch the compiled kernels from C++")
    pad_multiple: int = option(8, "with --data: train.py's --pad_multiple", min=1)
    fp8: bool = option(False, "the frozen base linears' GEMMs in FP8, as train.py --fp8")
    fp8_scaling: str = option("rowwise", "with --fp8: a scale per row, or one per tensor",
                              choices=SCALINGS)
    baseline: bool = option(False, "also time transformers + PEFT on the identical batch (needs "
                            "peft); with --generate: transformers' generate on the same prompts")
    generate: bool = option(False, "time generation instead of training (see above)")
    frames: int = option(250, "with --generate: frames per stream (25 per second of audio)", min=1)
    decode: str = option("auto", "with --generate: how each frame runs (generate.generate)",
                         choices=("auto", "compile", "eager", "dynamic"))
    sample_lora: bool = option(False, "with --generate: unmerged LoRA as --sample_every runs")
    data: str = option("", "time train.py on this data file or folder (see above)")
    epochs: int = option(2, "with --data: epochs to train", min=1)


def random_parts(cfg: HiggsConfig, n: int, text_tokens: int, seconds: tuple, seed: int):
    """n times: two random texts, the audio-out triplet, random codes of each clip length."""
    g = torch.Generator().manual_seed(seed)
    triplet = torch.tensor([cfg.audio_out_bos_token_id, cfg.audio_out_token_id,
                            cfg.audio_eos_token_id])
    for _ in range(n):
        # ordinary text ids lie below <|begin_of_text|> (pad <|end_of_text|> is the next one)
        texts = [torch.randint(0, cfg.pad_token_id - 1, (text_tokens,), generator=g)
                 for _ in range(2)]
        shapes = [(cfg.audio_num_codebooks, int(s * CODES_FRAME_RATE)) for s in seconds]
        yield texts, triplet, [torch.randint(0, cfg.audio_codebook_size, shape, generator=g)
                               for shape in shapes]


def synthetic_samples(cfg: HiggsConfig, n: int, text_tokens: int, ref_s: float, target_s: float,
                      seed: int = 0) -> list[Sample]:
    """Training samples: text, a reference clip as an assistant turn, text, the target clip."""
    samples = []
    for (a, b), triplet, codes in random_parts(cfg, n, text_tokens, (ref_s, target_s), seed):
        ids = torch.cat([a, triplet, b, triplet, torch.tensor([cfg.pad_token_id])])
        labels = torch.full_like(ids, -100)
        labels[-4:] = ids[-4:]  # the target turn's triplet and its end token are trained
        samples.append(Sample(ids, labels, [AudioSegment(c, None, True) for c in codes]))
    return samples


def synthetic_prompts(cfg: HiggsConfig, n: int, text_tokens: int, ref_s: float,
                      seed: int = 0) -> list[Prompt]:
    """Voice-cloning prompts of one length: text, a reference clip, text, <|audio_out_bos|>."""
    prompts = []
    for (a, b), triplet, [codes] in random_parts(cfg, n, text_tokens, (ref_s,), seed):
        ids = torch.cat([a, triplet, b, torch.tensor([cfg.audio_out_bos_token_id])])
        sample = Sample(ids, torch.full_like(ids, -100), [AudioSegment(codes, None, True)])
        prompts.append(Prompt(sample, "", None, codes, None))
    return prompts


def transformers_model(cfg: HiggsConfig, device, dtype, attn_implementation=None, **kwargs):
    """transformers' HiggsAudioV2ForConditionalGeneration at our shape, random weights."""
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    settings = {k: v for k, v in transformers_config(cfg).items()
                if k not in ("model_type", "architectures")}
    tcfg = HiggsAudioV2Config(**settings, attn_implementation=attn_implementation)
    with torch.device(device):
        return HiggsAudioV2ForConditionalGeneration(tcfg, **kwargs).to(dtype)


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
    transformers version; at small batches the host CPU sets how long the GPU waits)."""
    import transformers

    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   cpu)
    try:
        import peft
    except ImportError:
        peft = None
    return dict(torch=torch.__version__, transformers=transformers.__version__,
                peft=peft and peft.__version__, host_cpu=cpu, host_cores=os.cpu_count())


def time_steps(step, warmup: int, steps: int, device) -> tuple[float, float, float | None]:
    """(median seconds per step, max/min step-time ratio, peak GiB) after warm-up; the median of
    steps timed one by one, so one stall of a shared host does not move it."""
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


def zero_eos_rows(model: HiggsAudioModel) -> HiggsAudioModel:
    """The audio head can no longer prefer stream EOS: greedy streams run to the frame limit."""
    with torch.no_grad():
        model.audio_decoder_proj.audio_lm_head.weight[
            model.cfg.audio_stream_eos_id::model.cfg.codebook_rows] = 0
    return model


def baseline_generator(model: HiggsAudioModel, batch, frames: int):
    """transformers with our weights, and a call of its greedy generate on the same prompts for
    frames + 1 new frames (its first is the all-BOS frame our loop feeds without a step)."""
    weight = model.norm.weight
    base = transformers_model(model.cfg, weight.device, weight.dtype)
    base.load_state_dict({transformers_name(k): v for k, v in model.state_dict().items()
                          if "text_lm_head" not in k and "lora_" not in k})
    base.eval()
    inputs = {k: v for k, v in baseline_inputs(batch, model.cfg).items() if "labels" not in k}
    n = int(batch.attention_mask.sum(1).max())  # the collator's round-up padding: cut
    inputs.update(input_ids=inputs["input_ids"][:, :n],
                  attention_mask=inputs["attention_mask"][:, :n])

    @torch.no_grad()
    def run():
        out = base.generate(**inputs, max_new_tokens=frames + 1, do_sample=False)
        return out[:, -(frames + 1):].transpose(1, 2)
    return run


def bench_generate(args: BenchConfig) -> dict:
    """Whole generate calls at a preset's shape, timed after warm-up (which builds the decode
    step); the stream-EOS rows of the audio head are zeroed so every stream runs --frames."""
    device, dtype = resolve_device(args.device, "auto", local_rank())
    cfg = HiggsConfig.released() if args.preset == "released" else HiggsConfig.tiny()
    model = zero_eos_rows(random_model(cfg, device, dtype).eval())
    if args.sample_lora:
        inject_lora(model, args.lora_r, args.lora_alpha)
    fuse_projections(model)  # as generate.py does (not the adapter's linears)
    prompts = synthetic_prompts(cfg, args.batch_size, args.text_tokens, args.ref_seconds)
    sampling = Sampling(temperature=0, ras_window=0, max_seconds=args.frames / CODES_FRAME_RATE)
    outputs = []
    dt, spread, peak = time_steps(
        lambda: outputs.append(generate(model, prompts, sampling, decode=args.decode)),
        args.warmup, args.steps, device)
    streams = torch.stack([g.stream for g in outputs[-1]])
    assert streams.shape[2] == args.frames + 1, "a stream ended early"
    batch = Collator(cfg)([p.sample for p in prompts]).to(device)  # prompts of one length
    with torch.no_grad():  # generate's prefill alone: its share of each call
        prefill_dt, _, _ = time_steps(lambda: model.forward_cached(
            *prompt_inputs(model, batch), KVCache(len(model.layers))), args.warmup, args.steps,
            device)
    step = getattr(model, "decode_step_cache", None)  # None: --decode dynamic
    audio_seconds = args.batch_size * args.frames / CODES_FRAME_RATE  # per generate call
    cuda = device.type == "cuda"
    result = dict(
        preset=args.preset, device=torch.cuda.get_device_name(device) if cuda else "cpu",
        decode=step.mode if step else args.decode, batch_size=args.batch_size, frames=args.frames,
        prompt_positions=int(batch.attention_mask[0].sum()), sample_lora=args.sample_lora,
        seconds=dt, ms_per_frame=dt / args.frames * 1e3, prefill_seconds=prefill_dt,
        decode_ms_per_frame=(dt - prefill_dt) / args.frames * 1e3,
        audio_seconds_per_s=audio_seconds / dt, compile_seconds=step.build_seconds if step else 0.0,
        time_spread=spread, peak_gib=peak, **environment())
    if args.baseline:
        run = baseline_generator(model, batch, args.frames)
        del model, step
        gc.collect()  # the model and its decode step refer to each other
        if cuda:
            torch.cuda.empty_cache()
        got = []
        base_dt, _, base_peak = time_steps(lambda: got.append(run()), args.warmup, args.steps,
                                           device)
        result.update(baseline_ms_per_frame=base_dt / args.frames * 1e3,
                      baseline_audio_seconds_per_s=audio_seconds / base_dt,
                      baseline_peak_gib=base_peak, generate_speedup=base_dt / dt,
                      # exact in fp32; bf16 rounding may part the two after a while
                      baseline_same_codes=torch.equal(got[-1].cpu(), streams))
    return result


def time_baseline(args: BenchConfig, cfg: HiggsConfig, batch, device, dtype) -> tuple:
    """(median step seconds, peak GiB) on the identical batch of the stack people use today:
    transformers (text head on) + PEFT LoRA on every linear of attention, text and audio FFN."""
    import peft

    lora = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj"])
    model = transformers_model(cfg, device, dtype, "sdpa", use_text_head=True)
    base = peft.get_peft_model(model, lora)
    base.train()
    if args.activation_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([q for q in base.parameters() if q.requires_grad], lr=1e-5,
                                  fused=device.type == "cuda")
    inputs = baseline_inputs(batch, cfg)

    def step():
        # no autocast: its fp32 audio-embedding sum breaks transformers' masked_scatter (the
        # same bug as the official code); weights bf16, PEFT adapters fp32
        base(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, _, peak = time_steps(step, args.warmup, args.steps, device)
    return seconds, peak


def bench_train(args: BenchConfig) -> dict:
    """Median time of a LoRA training step (forward, backward, AdamW) on a synthetic batch."""
    device, dtype = resolve_device(args.device, "auto", local_rank())
    d = init_distributed(device)  # under torchrun: one process per GPU, DDP as train.py
    cfg = HiggsConfig.released() if args.preset == "released" else HiggsConfig.tiny()
    model = random_model(cfg, device, dtype)
    inject_lora(model, args.lora_r, args.lora_alpha, 0.0)
    if args.fp8:
        use_fp8(model, args.fp8_scaling)
    model.activation_checkpointing = args.activation_checkpointing
    if args.compile:
        model.compile_layers(args.memory_budget, cpp_wrapper=args.cpp_wrapper)
    model.train()
    trainable, total = count_parameters(model)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5,
                                  fused=device.type == "cuda")
    samples = synthetic_samples(cfg, args.batch_size, args.text_tokens, args.ref_seconds,
                                args.target_seconds)
    collator, t0, reps = Collator(cfg), time.perf_counter(), 20
    for _ in range(reps):
        batch = collator(samples)
    pipeline_samples_per_s = reps * len(samples) / (time.perf_counter() - t0)
    batch, objective = batch.to(device), Objective(cfg)

    def training_step(module):
        """One optimizer step through `module` (model + loss, as train.data_parallel builds it)."""
        def step():
            if args.compile:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(device, dtype):
                sums = module(batch)
                loss = objective.loss(sums, sums.detach())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    step = training_step(data_parallel(model, objective, device, 1))
    dt, spread, peak = time_steps(step, args.warmup, args.steps, device)
    positions, cuda = float(batch.attention_mask.sum()), device.type == "cuda"
    result = dict(
        preset=args.preset, device=torch.cuda.get_device_name(device) if cuda else "cpu",
        batch_size=args.batch_size, positions_per_sample=positions / args.batch_size,
        trainable_params=trainable, total_params=total, step_seconds=dt, step_time_spread=spread,
        positions_per_s=positions / dt,
        target_audio_s_per_s=args.batch_size * args.target_seconds / dt,
        mfu=step_flops(model, batch) / dt / (args.peak_tflops * 1e12) if cuda else None,
        peak_gib=peak, pipeline_samples_per_s=pipeline_samples_per_s,
        activation_checkpointing=args.activation_checkpointing, compile=args.compile,
        memory_budget=args.memory_budget, cpp_wrapper=args.cpp_wrapper,
        fp8=args.fp8 and args.fp8_scaling, **environment())
    if d.world > 1:  # the same step through DDP: gradient all-reduce over every rank
        ddp_dt, _, _ = time_steps(training_step(data_parallel(model, objective, device, d.world)),
                                  args.warmup, args.steps, device)
        result.update(world_size=d.world, per_gpu_positions_per_s=positions / ddp_dt,
                      total_positions_per_s=d.world * positions / ddp_dt,
                      scaling_efficiency=dt / ddp_dt)
        torch.distributed.destroy_process_group()
        if not d.main:
            return result
    if args.baseline and result["peft"] is None:  # environment() found no peft
        print("--baseline skipped: pip install peft (a benchmark-only dependency)")
    elif args.baseline:
        del model, optimizer, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        base_dt, base_peak = time_baseline(args, cfg, batch, device, dtype)
        result.update(baseline_positions_per_s=positions / base_dt, baseline_peak_gib=base_peak,
                      speedup=base_dt / dt,
                      memory_ratio=peak / base_peak if peak and base_peak else None)
    return result


def bench_data(args: BenchConfig) -> dict:
    """train.py's own pipeline on --data (random weights at the preset's shape), then
    bench_train's fixed-shape step at the same batch size for comparison."""
    import torch._dynamo.utils as dynamo_utils  # here: importing the compiler takes seconds

    device, dtype = resolve_device(args.device, "auto", local_rank())
    cfg = HiggsConfig.released() if args.preset == "released" else HiggsConfig.tiny()
    cuda, after_step = device.type == "cuda", []

    def probe(*_):  # after each optimizer step: allocator segments and compiled graphs so far
        stats = torch.cuda.memory_stats(device) if cuda else {}
        after_step.append((stats.get("segment.all.allocated", 0),
                           dynamo_utils.counters["stats"]["unique_graphs"]))
    with tempfile.TemporaryDirectory() as tmp:
        spec = "tiny"
        if args.preset == "released":  # what model_spec reads: config.json and the tokenizer
            spec = tmp
            released_tokenizer(spec)
            with open(os.path.join(spec, "config.json"), "w") as f:
                json.dump(official_config(cfg), f)
        tokenizer, _ = model_spec(spec)
        world, main = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")) == 0
        # every rank trains into one folder (one per torchrun), rank 0 writes the metrics
        run = os.path.join(tmp, "run") if world == 1 else os.path.join(
            tempfile.gettempdir(), f"bench_data_{os.environ.get('MASTER_PORT', '0')}")
        samples = len(open_dataset(args.data, Spec(cfg, tokenizer, 4096)))
        per_epoch = samples // (args.batch_size * world)
        argv = ["--model", spec, "--train_data", args.data, "--eval_data", "", "--device",
                device.type, "--output_dir", run, "--overwrite", "--batch_size",
                str(args.batch_size), "--lora_r", str(args.lora_r), "--lora_alpha",
                str(args.lora_alpha), "--max_steps", str(args.epochs * per_epoch),
                "--save_every", str(10 ** 9), "--log_every", str(per_epoch),
                "--compile_memory_budget", str(args.memory_budget)]
        argv += ["--peak_tflops", str(args.peak_tflops)] * cuda + ["--compile"] * args.compile
        argv += ["--fp8", "--fp8_scaling", args.fp8_scaling] * args.fp8 + \
            ["--pad_multiple", str(args.pad_multiple)]
        argv += ["--compile_cpp_wrapper"] * args.cpp_wrapper + \
            ["--activation_checkpointing"] * args.activation_checkpointing
        hook = register_optimizer_step_post_hook(probe)
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train.train(parse(train.TrainConfig, argv), random_model(cfg, device, dtype))
        hook.remove()
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        if not main:
            return bench_train(args)  # its DDP step needs every rank
        with open(os.path.join(run, "metrics.jsonl")) as f:
            steps = [r for r in map(json.loads, f) if "loss" in r]
        if world > 1:
            shutil.rmtree(run)

    def rate(epoch):  # positions/s over an epoch's steps; step 1 compiles and is left out
        rows = [r for r in steps[1:] if r["epoch"] == epoch]
        return sum(r["positions_per_s"] * r["step_seconds"] for r in rows) / \
            sum(r["step_seconds"] for r in rows)
    seen, new, old = set(), [], []
    print("step epoch lengths new seconds +segments +graphs")
    for r, (segments, graphs), before in zip(steps, after_step, [(0, 0)] + after_step):
        fresh = tuple(r["batch_lengths"]) not in seen
        seen.add(tuple(r["batch_lengths"]))
        print(r["step"], r["epoch"], r["batch_lengths"], int(fresh), round(r["step_seconds"], 4),
              segments - before[0], graphs - before[1])
        if r["step"] > 1:
            (new if fresh else old).append(r["step_seconds"])
    result = dict(
        data=args.data, steps=len(steps), steps_per_epoch=per_epoch,
        first_step_seconds=steps[0]["step_seconds"], first_epoch_positions_per_s=rate(0),
        steady_positions_per_s=rate(args.epochs - 1),
        padding_fraction=sum(r["padding"] for r in steps) / len(steps),
        distinct_shapes=len({tuple(r["batch_lengths"]) for r in steps}),
        new_shape_step_s=statistics.median(new) if new else None,
        seen_shape_step_s=statistics.median(old) if old else None,
        host_syncs_per_step=sum("synchronizing" in str(w.message) for w in caught) / len(steps)
        if cuda else None,
        compiled_graphs=dynamo_utils.counters["stats"]["unique_graphs"])
    fixed = bench_train(args)
    speed = result["fixed_positions_per_s"] = fixed["positions_per_s"]
    if world > 1:  # train.py's rates count every rank; the fixed step's is one GPU's
        speed *= world
        result.update(world_size=world, fixed_scaling_efficiency=fixed.get("scaling_efficiency"))
    result.update(first_epoch_share=result["first_epoch_positions_per_s"] / speed,
                  steady_share=result["steady_positions_per_s"] / speed,
                  **{k: fixed[k] for k in ("preset", "device", "batch_size", "compile")},
                  **environment())
    return result


def main(argv=None) -> dict:
    args = parse(BenchConfig, argv, __doc__)
    if args.fp8:  # before a model is built or a corpus read
        if args.generate:
            raise ConfigError("--fp8 times training steps; --generate has no FP8 path: leave "
                              "--fp8 off")
        check_fp8(*resolve_device(args.device, "auto", local_rank()))
    if args.generate:
        args.steps, args.warmup = args.steps or 3, 1 if args.warmup < 0 else args.warmup
        result = bench_generate(args)
    else:
        args.steps, args.warmup = args.steps or 10, 3 if args.warmup < 0 else args.warmup
        result = bench_data(args) if args.data else bench_train(args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a bad flag or device: one line, as in every command
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
