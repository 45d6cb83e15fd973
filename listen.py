"""Listening to checkpoints (--sample_every): the one place where training reaches generation."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from cli import option
from generate import Sampling, generate, load_prompts
from health import SampleWriter, describe


@dataclass
class ListenConfig:
    """listening to checkpoints: generated samples and their health checks (README)"""
    sample_every: int = option(0, "sample every N steps and at the end; 0: never", min=0,
                               on_resume="applied")
    sample_data: str = option("", "prompts: a data file in any format; none: --eval_data")
    sample_count: int = option(4, "prompts: the first N records", min=1)
    sample_max_seconds: float = option(20.0, "frame limit of a sample, seconds", above=0, max=600)
    sample_temperature: float = option(0.3, "decoding temperature; 0 is greedy", min=0)
    sample_top_k: int = option(50, "top-k of the decoding; 0: off", min=0)
    sample_top_p: float = option(0.95, "top-p of the decoding; 1: off", above=0, max=1)
    audio_tokenizer: str = option("", "HiggsAudioV2TokenizerModel folder or Hub id: WAV samples")
    asr_model: str = option("", "speech recognition model (folder or Hub id): word error rate")
    speaker_model: str = option("", "x-vector speaker model (folder or Hub id): speaker similarity")


class Listener:
    """Every rank reads the prompts (bad ones stop all); `main` writes. Seeded: samples compare."""

    def __init__(self, cfg: ListenConfig, prompts_path: str, tokenizer, model_cfg, seed: int,
                 device, main: bool = True):
        self.every = cfg.sample_every
        self.sampling = Sampling(cfg.sample_temperature, cfg.sample_top_k, cfg.sample_top_p,
                                 seed=seed, max_seconds=cfg.sample_max_seconds)
        self.prompts = load_prompts(prompts_path, cfg.sample_count, tokenizer, model_cfg)
        self.writer = SampleWriter(device, cfg.audio_tokenizer, cfg.asr_model, cfg.speaker_model) \
            if main else None

    def __call__(self, model, step: int, run_dir: str) -> list[dict]:
        """Samples of step N and their metrics rows; random states are kept for exact resumes."""
        out_dir = os.path.join(run_dir, "samples", f"step_{step:08d}")
        names = [f"sample{i}" for i in range(len(self.prompts))]
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
            results = self.writer.write(self.prompts, generate(model, self.prompts, self.sampling),
                                        out_dir, names)
        lines = [f"  {name}: {describe(r)}" for name, r in zip(names, results)]
        print("\n".join([f"samples at step {step} in {out_dir}:"] + lines), flush=True)
        failed = [f"{name} ({p.source}): {', '.join(r['failed'])}"
                  for name, p, r in zip(names, self.prompts, results) if r["failed"]]
        if failed:
            print(f"WARNING: {len(failed)} of {len(names)} samples at step {step} FAILED health "
                  f"checks: {'; '.join(failed)}; see README 'Listening to checkpoints'", flush=True)
        return [dict(step=step, sample=i, **{f"sample_{k}": v for k, v in r.items()})
                for i, r in enumerate(results)]
