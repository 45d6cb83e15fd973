"""Checkpoints: our hand-written model against transformers' own implementations on the same
weights (Llama for the text path, HiggsAudioV2ForConditionalGeneration for the audio path and its
checkpoint layout), sharded and bf16 loading, and clear errors for checkpoints that do not fit."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoint import load_model, save_checkpoint
from chatml import AudioSegment, Sample
from errors import ConfigError
from collate import Collator
from model import HiggsAudioModel, HiggsConfig, build_model

VOCAB = 96


def tiny_cfg(**kw) -> HiggsConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, audio_num_codebooks=4, audio_codebook_size=14,
                audio_stream_bos_id=14, audio_stream_eos_id=15, audio_in_token_id=90,
                audio_out_token_id=91, audio_out_bos_token_id=89, audio_eos_token_id=88,
                pad_token_id=92)
    base.update(kw)
    return HiggsConfig(**base)


def randomize(model, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))


def test_text_path_equals_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = tiny_cfg()
    ours = build_model(cfg)
    randomize(ours)
    llama_cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=131072,
                            rope_parameters=dict(cfg.rope_scaling, rope_theta=cfg.rope_theta),
                            tie_word_embeddings=False, attn_implementation="eager")
    llama = LlamaForCausalLM(llama_cfg).eval()
    sd = {("lm_head.weight" if k == "audio_decoder_proj.text_lm_head.weight" else "model." + k): v
          for k, v in ours.state_dict().items()
          if "audio" not in k or k == "audio_decoder_proj.text_lm_head.weight"}
    missing, unexpected = llama.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)

    ids = torch.randint(0, 80, (2, 37), generator=torch.Generator().manual_seed(1))
    batch = Collator(cfg)([Sample(row, row.clone()) for row in ids])
    with torch.no_grad():
        hidden = ours.eval()(batch)
        got = ours.text_logits(hidden[:, :37])
        want = llama(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _transformers_higgs(tmp_path):
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    tcfg = HiggsAudioV2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=8, num_codebooks=4, codebook_size=16, audio_token_id=91,
                              audio_bos_token_id=89, audio_delay_token_id=87,
                              audio_stream_bos_id=14, audio_stream_eos_id=15, pad_token_id=92)
    torch.manual_seed(0)
    ref = HiggsAudioV2ForConditionalGeneration(tcfg, use_text_head=True).eval()
    randomize(ref)
    ref.save_pretrained(tmp_path)
    return ref


def test_loads_transformers_checkpoint_with_same_audio_logits(tmp_path):
    ref = _transformers_higgs(tmp_path / "hf")
    ours = load_model(str(tmp_path / "hf"), dtype=torch.float32).eval()
    cfg = ours.cfg
    assert cfg.audio_num_codebooks == 4 and cfg.codebook_rows == 16

    g = torch.Generator().manual_seed(2)
    text = lambda n: torch.randint(0, 80, (n,), generator=g)  # noqa: E731
    ids = torch.cat([text(5), torch.tensor([89, cfg.audio_out_token_id, 88]), text(4),
                     torch.tensor([89, cfg.audio_out_token_id, 88]), text(3)])
    codes = [torch.randint(0, 14, (4, n), generator=g) for n in (6, 9)]
    sample = Sample(ids, ids.clone(), [AudioSegment(c, None, True) for c in codes])
    batch = Collator(cfg)([sample])
    n = int(batch.attention_mask.sum())
    with torch.no_grad():
        hidden = ours(batch)
        got = ours.audio_logits(hidden.view(-1, 32)[batch.audio_out_index])
        tf_ids = batch.input_ids[:, :n].clone()
        tf_ids[batch.audio_mask[:, :n]] = cfg.audio_out_token_id
        out = ref(input_ids=tf_ids, audio_input_ids=batch.audio_codes[None],
                  audio_input_ids_mask=torch.ones(1, batch.audio_codes.shape[0], dtype=torch.bool))
        want = out.logits[batch.audio_mask[:, :n]].view(-1, 4, 16)
        want_text = ref.text_lm_head(ref.model(input_ids=tf_ids, audio_input_ids=batch.audio_codes[None],
                                               audio_input_ids_mask=torch.ones(1, batch.audio_codes.shape[0],
                                                                               dtype=torch.bool)).last_hidden_state)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.text_logits(hidden[:, :n]), want_text, rtol=1e-4, atol=1e-4)

    # the same weights written in the official naming load identically
    save_checkpoint(ours, str(tmp_path / "official"), fmt="official")
    again = load_model(str(tmp_path / "official"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(batch), hidden, rtol=0, atol=0)
    # and our transformers-layout export loads back in transformers with the same logits
    from transformers import HiggsAudioV2ForConditionalGeneration

    save_checkpoint(ours, str(tmp_path / "export"), fmt="transformers")
    reloaded = HiggsAudioV2ForConditionalGeneration.from_pretrained(str(tmp_path / "export")).eval()
    with torch.no_grad():
        out2 = reloaded(input_ids=tf_ids, audio_input_ids=batch.audio_codes[None],
                        audio_input_ids_mask=torch.ones(1, batch.audio_codes.shape[0], dtype=torch.bool))
    torch.testing.assert_close(out2.logits, out.logits, rtol=1e-5, atol=1e-5)


def test_load_reports_missing_and_unexpected_keys(tmp_path):
    model = build_model(tiny_cfg())
    state = model.state_dict()
    state.pop("norm.weight")
    state["bogus.weight"] = torch.zeros(1)
    save_checkpoint(model, str(tmp_path), state=state)
    with pytest.raises(ConfigError, match=r"missing \(1\) \['norm.weight'\], unexpected \(1\) \['bogus.weight'\]"):
        load_model(str(tmp_path), dtype=torch.float32)


def test_meta_build_has_no_real_storage():
    """The released shape builds on the meta device: every tensor is storage-less, and the
    parameter count is the released checkpoint's (5,771,283,456)."""
    def resident_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = resident_bytes()
    with torch.device("meta"):
        model = HiggsAudioModel(HiggsConfig.released())
    assert resident_bytes() - before < 200 * 2 ** 20  # 23 GB in fp32 if it were real
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert sum(p.numel() for p in model.parameters()) == 5_771_283_456


def test_sharded_checkpoint_and_bf16_load(tmp_path):
    model = build_model(tiny_cfg())
    randomize(model)
    save_checkpoint(model, str(tmp_path), max_shard_bytes=20_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    again = load_model(str(tmp_path), dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    half = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


# ----------------------------------------------------------------------------------------------
# Hub ids, offline, against a cache laid out as huggingface_hub writes it


def hub_cache(root, repo: str, folder: str) -> str:
    """HF_HUB_CACHE/models--org--name/{refs/main, snapshots/<commit>/...} holding `folder`."""
    entry = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, entry / "snapshots" / "0123abcd")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abcd")
    return str(root)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_models_and_adapters_load_by_hub_id_from_the_cache(tiny_ckpt, offline_hub, tmp_path):
    import checkpoint
    from lora import inject_lora, load_adapter, save_adapter

    hub_cache(offline_hub, "org/tiny-higgs", tiny_ckpt)
    model = build_model(HiggsConfig.tiny())
    inject_lora(model, r=2, alpha=4)
    save_adapter(model, str(tmp_path / "adapter"))
    hub_cache(offline_hub, "org/tiny-adapter", str(tmp_path / "adapter"))
    tokenizer, cfg = checkpoint.model_spec("org/tiny-higgs")
    loaded = checkpoint.load("org/tiny-higgs", dtype=torch.float32)
    assert cfg == loaded.cfg and tokenizer.convert_tokens_to_ids("<|AUDIO_OUT|>") == cfg.audio_out_token_id
    load_adapter(loaded, "org/tiny-adapter")
    assert any("lora_A" in n for n, _ in loaded.named_parameters())
    for name, words in (("org/unknown", "not in the Hugging Face cache while offline"),
                        ("no/such/path", "no such folder")):
        with pytest.raises(ConfigError, match=words) as e:
            checkpoint.model_spec(name)
        assert name in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_hub_ids_honour_the_hub_environment_in_a_fresh_process(tiny_ckpt, tmp_path):
    """HF_HUB_OFFLINE and HF_HUB_CACHE as a user sets them: train.py --model org/name trains."""
    cache = hub_cache(tmp_path / "hub", "org/tiny-higgs", tiny_ckpt)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=cache)
    root = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.run([sys.executable, "train.py", "--model", "org/tiny-higgs", "--max_steps", "1",
                        "--device", "cpu", "--output_dir", str(tmp_path / "run")], cwd=root,
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    p = subprocess.run([sys.executable, "train.py", "--model", "org/missing", "--device", "cpu",
                        "--output_dir", str(tmp_path / "run2")], cwd=root, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: --model org/missing: ") \
        and "Traceback" not in p.stderr, p.stderr


def test_transformers_checkpoint_takes_missing_token_ids_from_its_tokenizer(tmp_path):
    """A transformers-layout checkpoint whose tokenizer is not the released one: its config has
    no <|AUDIO|> or <|audio_eos|> id, and they are read from the tokenizer, not the defaults."""
    import checkpoint

    demo_tokenizer = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "tokenizer")
    save_checkpoint(build_model(HiggsConfig.tiny()), str(tmp_path), fmt="transformers")
    for name in os.listdir(demo_tokenizer):
        shutil.copy(os.path.join(demo_tokenizer, name), tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    assert "audio_in_token_id" not in config and config["audio_token_id"] == 528
    tokenizer, cfg = checkpoint.model_spec(str(tmp_path))
    assert (cfg.audio_in_token_id, cfg.audio_eos_token_id, cfg.audio_out_token_id) == (527, 524, 528)
    assert cfg == HiggsConfig.tiny()  # every id as the model was built with


# ----------------------------------------------------------------------------------------------
# --help is the reference for every flag


def test_every_flag_of_every_command_has_help_with_its_default():
    import argparse

    import bench
    import data
    import generate
    import lora
    import train
    from cli import add_options

    for cls in (train.TrainConfig, generate.GenerateConfig, bench.BenchConfig, data.CheckConfig,
                data.PrepareConfig, lora.MergeConfig):
        parser = argparse.ArgumentParser()
        add_options(parser, cls)
        for action in parser._actions[1:]:
            assert action.help and len(action.help) > 20 and "(default: " in action.help, \
                (cls.__name__, action.dest)
