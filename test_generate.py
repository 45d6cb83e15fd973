"""Generation (generate.py) against the official code, the KV cache against recomputation, the
health checks and scorers, the CLI, and sampling during training (train.py --sample_every)."""
import dataclasses
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import generate as gen
import health
from audio import CODES_FRAME_RATE, codes_path
from bench import zero_eos_rows
from checkpoint import load_model, load_tokenizer
from chatml import record_from_json
from collate import Collator
from formats import load_records
from lora import inject_lora, save_adapter
from model import HiggsConfig, KVCache, build_model, fuse_projections

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_DATA = os.path.join(ROOT, "demo", "data")

GOLDEN = os.path.join(ROOT, "tests", "golden_generate")
EXPECTED = json.load(open(os.path.join(GOLDEN, "expected.json")))
EVAL = os.path.join(DEMO_DATA, "eval.jsonl")
GREEDY = gen.Sampling(temperature=0, ras_window=0)


def golden_case(name):
    case = EXPECTED[name]
    model = load_model(os.path.join(GOLDEN, case["ckpt"]), dtype=torch.float32).eval()
    if case["zero_eos_rows"]:
        zero_eos_rows(model)
    tok = load_tokenizer(os.path.join(GOLDEN, case["ckpt"]))
    data_dir = os.path.join(GOLDEN, case["data_dir"])
    prompts = [gen.prompt_of(record_from_json({"messages": p["messages"]}, name, data_dir), tok, model.cfg)
               for p in case["prompts"]]
    # the official max_new_tokens counts the step that feeds the prompt: one frame fewer
    sampling = dataclasses.replace(GREEDY, max_seconds=(case["max_new_tokens"] - 1) / CODES_FRAME_RATE)
    return model, prompts, sampling, case["prompts"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_greedy_generation_matches_official(name):
    model, prompts, sampling, want = golden_case(name)
    for prompt, w in zip(prompts, want):
        assert prompt.sample.input_ids.tolist() == w["input_ids"]
    alone = [gen.generate(model, [p], sampling)[0] for p in prompts]
    batched = gen.generate(model, prompts, sampling)  # right-padded rows of different lengths
    for out in (alone, batched):
        for got, w in zip(out, want):
            assert got.stream.tolist() == w["stream"]
            assert got.codes.tolist() == w["codes"] and got.ended == w["ended"]


@pytest.mark.parametrize("case", ["released", "tower_ff", "dual_ffn_nodelay"])
def test_cached_forward_equals_the_training_forward(case, golden_records):
    """In one chunk or two, over right-padded rows: the incremental path gives the hidden states of
    the golden-tested forward (fast-forward and plain layers, Whisper positions included)."""
    model, samples = golden_records(case)
    batch = Collator(model.cfg)(samples)
    with torch.no_grad():
        want = model(batch)[batch.attention_mask]
        inputs = gen.prompt_inputs(model, batch)
        one = model.forward_cached(*inputs, KVCache(len(model.layers)))
        cache, cut = KVCache(len(model.layers)), batch.input_ids.shape[1] // 2
        two = torch.cat([model.forward_cached(*(x[:, :cut] for x in inputs), cache),
                         model.forward_cached(*(x[:, cut:] for x in inputs), cache)], 1)
    for got in (one, two):
        torch.testing.assert_close(got[batch.attention_mask], want, rtol=1e-5, atol=1e-5)


def tiny_models():
    """The released layout, fast-forward layers, and plain dual_ffn without the delay pattern;
    their stream-EOS rows zeroed, so greedy streams run to the limit and sampled ones end at
    different steps (finished rows stay in the batch)."""
    cfgs = [HiggsConfig.tiny(), dataclasses.replace(HiggsConfig.tiny(), audio_dual_ffn_layers=[1]),
            dataclasses.replace(HiggsConfig.tiny(), audio_adapter_type="dual_ffn",
                                audio_dual_ffn_layers=[0, 2], use_delay_pattern=False)]
    return [zero_eos_rows(build_model(c, seed=i).eval()) for i, c in enumerate(cfgs)]


def test_kv_cache_equals_recomputing_the_prefix():
    tok = load_tokenizer(os.path.join(ROOT, "demo", "tokenizer"))
    lengths = {}
    for i, model in enumerate(tiny_models()):
        prompts = [gen.prompt_of(r, tok, model.cfg) for r in load_records(EVAL)[:3]]
        for sampling in (GREEDY, gen.Sampling(temperature=1.0, seed=3)):
            sampling = dataclasses.replace(sampling, max_seconds=1.2)
            cached = gen.generate(model, prompts, sampling)
            recomputed = gen.generate(model, prompts, sampling, use_cache=False)
            assert [g.stream.tolist() for g in cached] == [g.stream.tolist() for g in recomputed]
            lengths[i, sampling.temperature] = [(g.stream.shape[1], g.ended) for g in cached]
    assert all(lengths[i, 0] == [(31, False)] * 3 for i in range(3))  # 30 frames + the BOS one
    assert any(len({n for n, ended in lengths[i, 1.0] if ended}) > 1 for i in range(3)), lengths


def with_lora(model):
    """A tiny model carrying unmerged LoRA adapters (random B) on every target, as in training."""
    inject_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(n)))
    return model


def tiny_cases(device="cpu"):
    """The tiny models (three layer layouts, one with LoRA) with three prompts each."""
    tok = load_tokenizer(os.path.join(ROOT, "demo", "tokenizer"))
    models = tiny_models() + [with_lora(tiny_models()[0])]
    return [(m.to(device), [gen.prompt_of(r, tok, m.cfg) for r in load_records(EVAL)[:3]])
            for m in models]


SAMPLINGS = [GREEDY, gen.Sampling(temperature=1.0, seed=3), gen.Sampling(seed=5)]


def storage_bytes(model) -> int:
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for p in model.parameters()}.values())


def test_fused_projections_change_only_the_layout():
    """fuse_projections (generate.py's inference layout): the same state dict and no more
    memory, q/k/v and gate/up read from one tensor each, the same frames; adapters injected
    afterwards are not skipped."""
    model, prompts = tiny_cases()[0]
    sampling = dataclasses.replace(SAMPLINGS[1], max_seconds=1.2)
    before = gen.generate(model, prompts, sampling)
    state, size = {k: v.clone() for k, v in model.state_dict().items()}, storage_bytes(model)
    assert fuse_projections(model) == 3 * model.cfg.num_layers  # attention, text and audio FFN
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert storage_bytes(model) == size
    attn = model.layers[0].self_attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
    after = gen.generate(model, prompts, sampling)
    assert [g.stream.tolist() for g in after] == [g.stream.tolist() for g in before]
    plain = tiny_cases()[0][0]
    for m in (model, plain):  # with dropout, each LoRA linear runs its own path (no grouping)
        inject_lora(m, r=4, alpha=8, dropout=0.1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(p.numel()))
    plain.load_state_dict(model.state_dict())
    assert [g.stream.tolist() for g in gen.generate(model.eval(), prompts, sampling)] == \
        [g.stream.tolist() for g in gen.generate(plain.eval(), prompts, sampling)]


def test_fixed_shape_step_equals_the_growing_cache():
    """The static-cache step (DualFFN layers on the audio path, fast-forward layers skipped, plain
    layers, unmerged LoRA) picks the growing cache's frames, greedy and sampled (top-k, top-p,
    repetition-aware), rows ending at different steps; a second call reuses the step."""
    for model, prompts in tiny_cases():
        for sampling in SAMPLINGS:
            sampling = dataclasses.replace(sampling, max_seconds=1.2)
            fixed = gen.generate(model, prompts, sampling)
            step = model.decode_step_cache
            dynamic = gen.generate(model, prompts, sampling, decode="dynamic")
            again = gen.generate(model, prompts, sampling)
            assert [g.stream.tolist() for g in fixed] == [g.stream.tolist() for g in dynamic] \
                == [g.stream.tolist() for g in again]
            assert [g.ended for g in fixed] == [g.ended for g in dynamic]
            assert model.decode_step_cache is step


def test_frames_after_every_row_ended_change_nothing(monkeypatch):
    """The fixed-shape loop looks whether all rows have ended only every CHECK_EVERY frames;
    the frames it runs past the last end leave every row's stream as it was."""
    model, prompts = tiny_cases()[2]
    sampling = dataclasses.replace(SAMPLINGS[1], max_seconds=1.2)
    calls = []
    real_call = gen.DecodeStep.__call__
    monkeypatch.setattr(gen.DecodeStep, "__call__",
                        lambda self, *a: calls.append(1) or real_call(self, *a))
    fixed = gen.generate(model, prompts, sampling)
    dynamic = gen.generate(model, prompts, sampling, decode="dynamic")
    frames = max(g.stream.shape[1] for g in dynamic) - 1  # the last row's end
    assert all(g.ended for g in dynamic) and frames < len(calls) == gen.CHECK_EVERY
    assert [g.stream.tolist() for g in fixed] == [g.stream.tolist() for g in dynamic]
    assert len({g.stream.shape[1] for g in fixed}) > 1  # rows ended at different frames


# ----------------------------------------------------------------------------------------------
# The decode step on CUDA (compiled or captured): run on a GPU machine


def count_syncs(fn) -> int:
    """How many times fn makes the host wait for the GPU."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


CUDA_MODES = pytest.mark.parametrize("mode", ["compile"])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture
def exact_cuda(monkeypatch):
    """fp32 convolutions (the Whisper tower) without TF32; more compiled steps than Dynamo's
    default 8 per function (every DecodeStep compiles the same method)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)


@needs_cuda
@CUDA_MODES
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_greedy_generation_matches_official_on_cuda(name, mode, exact_cuda):
    model, prompts, sampling, want = golden_case(name)
    model.cuda()
    alone = [gen.generate(model, [p], sampling, decode=mode)[0] for p in prompts]
    batched = gen.generate(model, prompts, sampling, decode=mode)
    for out in (alone, batched):
        for got, w in zip(out, want):
            assert got.stream.tolist() == w["stream"] and got.ended == w["ended"]


@needs_cuda
@CUDA_MODES
def test_cuda_step_equals_the_growing_cache_and_never_waits(mode, exact_cuda):
    """On the GPU: the compiled / captured step picks the growing cache's frames (greedy and
    sampled; LoRA included), is built once for repeated calls, follows in-place parameter
    updates (the optimizer's), and the loop never waits for the GPU."""
    streams = lambda out: [g.stream.tolist() for g in out]  # noqa: E731
    cases = tiny_cases("cuda")
    for model, prompts in cases:
        for sampling in SAMPLINGS:
            sampling = dataclasses.replace(sampling, max_seconds=1.2)
            fixed = gen.generate(model, prompts, sampling, decode=mode)
            step = model.decode_step_cache
            dynamic = gen.generate(model, prompts, sampling, decode="dynamic")
            again = gen.generate(model, prompts, sampling, decode=mode)
            assert streams(fixed) == streams(dynamic) == streams(again)
            assert model.decode_step_cache is step
    model, prompts = cases[3]  # with LoRA
    sampling = dataclasses.replace(GREEDY, max_seconds=1.2)
    old = gen.generate(model, prompts, sampling, decode=mode)
    step = model.decode_step_cache
    with torch.no_grad():  # an optimizer step: LoRA B moves in place
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(-3)
    new = gen.generate(model, prompts, sampling, decode=mode)
    assert model.decode_step_cache is step and streams(new) != streams(old)
    assert streams(new) == streams(gen.generate(model, prompts, sampling, decode="dynamic"))

    def syncs(frames):
        s = dataclasses.replace(GREEDY, max_seconds=frames / CODES_FRAME_RATE)
        gen.generate(model, prompts, s, decode=mode)  # builds the step for these shapes
        return count_syncs(lambda: gen.generate(model, prompts, s, decode=mode))
    assert syncs(48) == syncs(16)  # the checks read the end flag without waiting
    logits = torch.randn(3, 8, 34, device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    assert count_syncs(lambda: [gen.pick(logits, s, generator) for s in SAMPLINGS] +
                       [gen.draw(logits, generator)]) == 0


# ----------------------------------------------------------------------------------------------
# Health checks


def check(codes, ended=True, wav=None, text="x" * 30, rate=15.0, reference=None, reference_codes=None):
    return health.health(codes, ended, text, rate, reference, reference_codes, wav)


def test_each_health_check_fires_on_its_crafted_case_only():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 32, (8, 50), generator=g)  # 2 s, as 30 characters at 15 per second
    speech = 0.1 * torch.randn(50 * 960, generator=g)
    assert check(codes, wav=speech)["failed"] == []
    assert check(codes)["failed"] == []  # no waveform, no reference: the silence check is skipped
    assert check(codes, ended=False, wav=speech)["failed"] == ["ended"]  # a stream that never ends
    r = check(codes, wav=torch.zeros(50 * 960))  # an all-silence decode
    assert r["failed"] == ["silence"] and r["silent_fraction"] == 1.0
    r = check(codes, wav=speech, text="x" * 300)
    assert r["failed"] == ["duration"] and r["expected_seconds"] == 20.0
    looped = torch.cat([codes[:, :4]] * 19, 1)[:, :75]  # a 4-frame pattern for 3 s
    r = check(looped, wav=0.1 * torch.randn(75 * 960, generator=g), text="x" * 45)
    assert r["failed"] == ["loop"] and r["loop_seconds"] == 3.0
    # without an audio tokenizer: the reference's silence code, from its near-silent frames
    reference = torch.cat([torch.zeros(10 * 960), 0.1 * torch.randn(40 * 960, generator=g)])
    ref_codes = torch.cat([torch.full((8, 10), 7), torch.randint(8, 32, (8, 40), generator=g)], 1)
    assert health.silence_code(reference, ref_codes) == 7
    silent = codes.clone()
    silent[0] = 7
    assert check(silent, reference=reference, reference_codes=ref_codes)["failed"] == ["silence"]
    assert check(ref_codes[:, 10:], reference=reference, reference_codes=ref_codes)["failed"] == []


def test_never_ending_stream_is_flagged():
    model = tiny_models()[0]
    tok = load_tokenizer(os.path.join(ROOT, "demo", "tokenizer"))
    prompt = gen.prompt_of(load_records(EVAL)[0], tok, model.cfg)
    out = gen.generate(model, [prompt], dataclasses.replace(GREEDY, max_seconds=1))[0]
    # 25 frames after the BOS one; the last 7 are incomplete (delay) and the last column is cut
    assert not out.ended and out.stream.shape[1] == 26 and out.codes.shape[1] == 25 - 7 - 1
    assert "ended" in health.health(out.codes, out.ended, prompt.text, prompt.chars_per_second)["failed"]


def test_word_error_rate():
    assert health.word_error_rate("The cat sat.", "the cat sat") == 0
    assert health.word_error_rate("the cat sat on the mat", "the cat sat on mat") == 1 / 6
    assert health.word_error_rate("a b", "c a b d") == 1.0
    assert health.word_error_rate("a b", "") == 1.0


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """Tiny random models of the real scorers' classes, saved with their processors like
    downloaded ones: Whisper and wav2vec2 CTC recognisers, a WavLM x-vector speaker model."""
    from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor,
                              Wav2Vec2ForCTC, Wav2Vec2Processor, WavLMConfig, WavLMForXVector,
                              WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizer)

    root = tmp_path_factory.mktemp("scorers")
    torch.manual_seed(0)
    letters = [*"abcdefghijklmnopqrstuvwxyz'"]
    (root / "ctc.json").write_text(json.dumps(
        {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|", *letters])}))
    tokenizer = Wav2Vec2CTCTokenizer(str(root / "ctc.json"), do_lower_case=True)
    features = Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True)
    Wav2Vec2Processor(features, tokenizer).save_pretrained(root / "ctc")
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                 conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=len(tokenizer), pad_token_id=0, **small)) \
        .save_pretrained(root / "ctc")
    WavLMForXVector(WavLMConfig(tdnn_dim=(16,) * 5, xvector_output_dim=8, **small)) \
        .save_pretrained(root / "speaker")
    features.save_pretrained(root / "speaker")
    # Whisper: a byte-level BPE of single letters plus the special tokens generate() needs
    (root / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(letters + ["Ġ"])}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    end = "<|endoftext|>"
    tokenizer = WhisperTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), unk_token=end,
                                 bos_token=end, eos_token=end, pad_token=end)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>", "<|notimestamps|>"]})
    WhisperProcessor(WhisperFeatureExtractor(feature_size=16), tokenizer).save_pretrained(root / "whisper")
    end_id, start_id = tokenizer.convert_tokens_to_ids([end, "<|startoftranscript|>"])
    whisper = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=16, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
        max_target_positions=64, pad_token_id=end_id, bos_token_id=end_id, eos_token_id=end_id,
        decoder_start_token_id=start_id))
    whisper.generation_config.max_length = 20
    whisper.save_pretrained(root / "whisper")
    return {name: str(root / name) for name in ("ctc", "whisper", "speaker")}


@pytest.mark.parametrize("asr_kind", ["ctc", "whisper"])
def test_optional_scorers_run_real_models(scorers, asr_kind):
    asr, speaker = health.AsrScorer(scorers[asr_kind], "cpu"), health.SpeakerScorer(scorers["speaker"], "cpu")
    g = torch.Generator().manual_seed(0)
    a, b = 0.1 * torch.randn(24000, generator=g), 0.1 * torch.randn(36000, generator=g)
    wer, heard = asr(a, "the cat sat")
    assert isinstance(heard, str) and wer == health.word_error_rate("the cat sat", heard)
    assert asr(a[:100], "the cat sat") == (1.0, "")  # too short to transcribe: nothing heard
    assert speaker(a, a) == pytest.approx(1.0, abs=1e-5) and -1 <= speaker(a, b) < 1
    assert speaker(a, b[:100]) is None
    codes = torch.zeros(8, 25, dtype=torch.long)
    r = health.health(codes, True, "the cat sat", None, a, None, b, asr, speaker)
    assert {"wer", "heard", "speaker_similarity"} <= r.keys()
    assert ("wer" in r["failed"]) == (r["wer"] > health.MAX_WER)


# ----------------------------------------------------------------------------------------------
# Command line

@pytest.mark.slow

def test_cli_clones_a_voice_with_adapter_tokenizer_and_scorers(tiny_ckpt, audio_tokenizer, scorers,
                                                                tmp_path, capsys):
    model = load_model(tiny_ckpt, dtype=torch.float32)
    inject_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    save_adapter(model, str(tmp_path / "adapter"))
    ref = str(tmp_path / "ref.wav")  # a reference without its codes sidecar: encoded on the fly
    shutil.copy(os.path.join(DEMO_DATA, "espeak_m1_00.wav"), ref)
    common = ["--model", tiny_ckpt, "--ref_audio", ref, "--ref_text", "The sun is bright today.",
              "--device", "cpu", "--temperature", "0", "--max_seconds", "1"]
    assert gen.main(common + ["--text", "Hi.", "--out", str(tmp_path / "x.wav")]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err

    argv = common + ["--adapter", str(tmp_path / "adapter"), "--tokenizer", audio_tokenizer,
                     "--asr_model", scorers["whisper"], "--speaker_model", scorers["speaker"],
                     "--text", "Please close the door.", "I like green apples.",
                     "--out", str(tmp_path / "out" / "clone.wav")]
    os.makedirs(tmp_path / "out")
    assert gen.main(argv) == 0
    out = capsys.readouterr().out
    assert f"encoded {ref}" in out and os.path.isfile(codes_path(ref))
    for i in (1, 2):
        stem = str(tmp_path / "out" / f"clone_{i}")
        codes = np.load(stem + ".codes.npy")
        wav, rate = sf.read(stem + ".wav")
        assert rate == 24000 and len(wav) == codes.shape[1] * 960 and codes.shape[0] == 8
        report = json.load(open(stem + ".json"))
        assert {"ended", "seconds", "wer", "speaker_similarity", "failed"} <= report.keys()
        assert f"{stem}: " in out
    first = np.load(str(tmp_path / "out" / "clone_1.codes.npy"))
    assert gen.main(argv) == 0  # greedy with a fixed seed: the same codes again
    assert np.array_equal(np.load(str(tmp_path / "out" / "clone_1.codes.npy")), first)

    assert gen.main(["--model", tiny_ckpt, "--data", EVAL, "--count", "2", "--out_dir",
                     str(tmp_path / "data"), "--device", "cpu", "--max_seconds", "1"]) == 0
    assert sorted(os.listdir(tmp_path / "data")) == [f"sample{i}.{ext}" for i in (0, 1)
                                                     for ext in ("codes.npy", "json", "ref.wav")]


# ----------------------------------------------------------------------------------------------
# Sampling during training


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.mark.slow
def test_training_writes_samples_and_health_and_resumes_exactly(audio_tokenizer, tmp_path, run_train,
                                                                 kill_after_checkpoint, capsys):
    sampling = ["--max_steps", "4", "--save_every", "2", "--eval_data", EVAL, "--sample_every", "2",
                "--sample_count", "2", "--sample_max_seconds", "1", "--audio_tokenizer", audio_tokenizer]
    full = tmp_path / "full"
    run_train(full, *sampling)
    assert "samples at step 2 in" in capsys.readouterr().out
    for step in (2, 4):
        folder = full / "samples" / f"step_{step:08d}"
        assert sorted(os.listdir(folder)) == [f"sample{i}.{ext}" for i in (0, 1)
                                              for ext in ("codes.npy", "json", "ref.wav", "wav")]
        assert json.load(open(folder / "sample0.json"))["text"] == "Open the window, please."
    rows = [r for r in metrics(full) if "sample" in r]
    assert [(r["step"], r["sample"]) for r in rows] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    assert all({"sample_ended", "sample_duration_ratio", "sample_silent_fraction", "sample_loop_seconds",
                "sample_failed"} <= r.keys() for r in rows)

    plain = tmp_path / "plain"  # sampling leaves training untouched
    run_train(plain, *sampling[:6])
    losses = lambda run: [(r["step"], r["loss"]) for r in metrics(run) if "loss" in r]  # noqa: E731
    assert losses(plain) == losses(full)

    part = tmp_path / "part"
    kill_after_checkpoint(lambda: run_train(part, *sampling), step=2)
    run_train(part, *sampling, "--resume")
    assert losses(part) == losses(full)
    a, b = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (part, full))
    assert all(torch.equal(a[k], b[k]) for k in b)
    for name in ("sample0.codes.npy", "sample1.codes.npy"):
        assert np.array_equal(*(np.load(run / "samples" / "step_00000004" / name) for run in (part, full)))
