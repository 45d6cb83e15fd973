"""Shared test fixtures: a tiny random checkpoint with the bundled demo tokenizer."""
import os
import shutil

import pytest
import torch

from model import HiggsConfig, build_model, save_checkpoint

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_DATA = os.path.join(ROOT, "demo", "data")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """A saved tiny model (official layout) whose tokenizer is demo/tokenizer."""
    path = str(tmp_path_factory.mktemp("tiny_ckpt"))
    model = build_model(HiggsConfig.tiny(), seed=0)
    with torch.no_grad():  # larger weights than the default init, so differences show
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_checkpoint(model, path)
    tok_dir = os.path.join(ROOT, "demo", "tokenizer")
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), path)
    return path


@pytest.fixture(scope="session")
def audio_tokenizer(tmp_path_factory) -> str:
    """A tiny random HiggsAudioV2TokenizerModel (demo/make_demo.py's config) saved like a real one,
    its codebooks random (transformers initialises them to zeros: every code would be 0)."""
    from demo.make_demo import build_audio_tokenizer

    model = build_audio_tokenizer()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for q in model.quantizer.quantizers:
            q.codebook.embed.copy_(torch.randn(q.codebook.embed.shape, generator=g))
    path = str(tmp_path_factory.mktemp("audio_tokenizer"))
    model.save_pretrained(path)
    return path


def train_until_killed(monkeypatch, run, step: int) -> None:
    """Call `run()` (a training run) and kill it right after its step-`step` checkpoint is
    written, as a preemption would."""
    import train

    real_save = train.save_training_checkpoint

    def save_then_die(cfg, d, model, opt, sched, state):
        real_save(cfg, d, model, opt, sched, state)
        if state["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_training_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(train, "save_training_checkpoint", real_save)
