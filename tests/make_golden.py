"""Golden values from the OFFICIAL Higgs-Audio v2 code (boson-multimodal 0.1.1), for our re-implementation.

Run from the repository root with the reference venv (never with the project's own environment):

    /tmp/refvenv/bin/python tests/make_golden.py

How the reference venv is made (CPU is enough; everything here runs in fp32 on CPU):

    python -m venv V
    V/bin/pip install torch==2.11.0 torchaudio==2.11.0 transformers==4.46.3 safetensors numpy dacite \
        loguru pandas librosa soundfile tokenizers soxr
    V/bin/pip install --no-deps boson-multimodal==0.1.1

(soxr comes with librosa anyway: librosa.resample's default `soxr_hq` is what the official collator,
audio tokenizer and serve engine resample with.)

This script imports nothing from the repository: only the official package and its dependencies.
It deletes and rewrites everything under tests/golden/ (see tests/golden/README.md, written below,
for the layout, the cases, the records and the official bugs routed around). Deterministic: fixed
seeds, one CPU thread; a re-run on the same machine gives byte-identical files. Another CPU can
change the float values in the last bits (torch/MKL pick SIMD kernels by CPU: seen ~1e-6 in logits,
up to 7e-5 in Whisper features of near-silent mel bins); integer arrays and the data do not change.
"""

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import copy
import hashlib
import json
import math
import shutil
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, WhisperFeatureExtractor
from transformers.utils import logging as hf_logging

from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample
from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel

warnings.filterwarnings("ignore")
hf_logging.set_verbosity_error()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"

# --------------------------------------------------------------------------------------------
# Tokenizer: tiny byte-level BPE (512) + the 256 Llama-3 special slots mirrored at 512 + (id - 128000)
# --------------------------------------------------------------------------------------------
BPE_SIZE = 512
SPECIAL_BASE = 128000
NAMED_SPECIALS = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
    128011: "<|audio_bos|>",
    128012: "<|audio_eos|>",
    128013: "<|audio_out_bos|>",
    128015: "<|AUDIO|>",
    128016: "<|AUDIO_OUT|>",
    128017: "<|recipient|>",
}


def mirrored(official_id):
    return BPE_SIZE + (official_id - SPECIAL_BASE)


CORPUS = """\
<|begin_of_text|> is not part of this corpus; it is plain English text for a tiny byte-level tokenizer.
system
user
assistant
Generate audio following instruction.
You are a helpful assistant that speaks clearly and slowly.
The quick brown fox jumps over the lazy dog near the river bank.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
A journey of a thousand miles begins with a single step.
Please read the following sentence aloud in a calm and friendly voice.
The weather today is sunny with a light breeze from the west.
In the morning we walked to the market and bought fresh bread, apples and cheese.
Music has a way of bringing people together across languages and cultures.
The old lighthouse stood at the edge of the cliff, watching over the ships at night.
Scientists discovered a new species of frog in the rain forest last spring.
He opened the window, took a deep breath, and began to sing a quiet song.
Reading books every evening helps children learn new words and ideas.
The train to the city leaves at seven o'clock and arrives two hours later.
Could you please repeat that, a little more slowly this time?
Thank you very much for listening; have a wonderful day!
The voice in the recording belongs to a teacher from a small town in the north.
Speak the next line with a warm tone and a gentle smile.
Numbers such as 1, 2, 3, 10, 42 and 2025 appear in text as well.
Hello there! How are you doing today? I am doing well, thanks for asking.
This is a short reference transcript for voice cloning.
Now say the target text in the same voice as the reference.
Listen to the audio and describe what you hear.
The cat sat on the mat, and the dog lay by the door.
Bob, please answer the question in your own words.
What a beautiful garden, full of roses, tulips and sunflowers!
The meeting was moved from Monday to Thursday afternoon.
Every river finds its way to the sea, sooner or later.
Water boils at one hundred degrees at sea level.
We are going to build a small model and test it carefully.
"""
# Extra blank-line structure so that "\n\n" (the header separator) becomes one merged token.
CORPUS_LINES = [line + "\n\n" for line in CORPUS.splitlines()] * 3 + ["system\n\nuser\n\nassistant\n\n"] * 20


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS_LINES, trainer=trainer)
    assert tok.get_vocab_size() == BPE_SIZE, tok.get_vocab_size()
    names = []
    for off in range(256):
        oid = SPECIAL_BASE + off
        names.append(NAMED_SPECIALS.get(oid, f"<|reserved_special_token_{oid - 128002}|>"))
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    for off, n in enumerate(names):
        assert tok.token_to_id(n) == BPE_SIZE + off, (n, tok.token_to_id(n))
    bos = NAMED_SPECIALS[128000]
    # Like Llama-3: encode(..., add_special_tokens=True) prepends <|begin_of_text|>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A:0 {bos}:1 $B:1", special_tokens=[(bos, mirrored(128000))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=NAMED_SPECIALS[128001],
        pad_token=NAMED_SPECIALS[128001],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    assert len(fast) == 768
    return fast


def check_tokenizer(tok):
    ids = tok.encode("<|audio_bos|><|AUDIO|><|audio_eos|>", add_special_tokens=False)
    assert ids == [mirrored(128011), mirrored(128015), mirrored(128012)], ids
    ids = tok.encode("<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>", add_special_tokens=False)
    assert ids == [mirrored(128013), mirrored(128016), mirrored(128012)], ids
    hdr = "<|start_header_id|>user<|end_header_id|>\n\n"
    ids = tok.encode(hdr, add_special_tokens=False)
    want = [mirrored(128006), tok.convert_tokens_to_ids("user"), mirrored(128007), tok.convert_tokens_to_ids("ĊĊ")]
    assert ids == want, ids  # "user" and "\n\n" are single BPE tokens, as with Llama-3
    assert tok.decode(ids) == hdr
    assert tok.encode("hi", add_special_tokens=True)[0] == mirrored(128000)
    return ids


# --------------------------------------------------------------------------------------------
# Configs and weights
# --------------------------------------------------------------------------------------------
CODEBOOK_SIZE = 32  # stream BOS = 32, EOS = 33, 34 rows per codebook


def text_config():
    return dict(
        model_type="llama",
        vocab_size=768,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=4096,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,  # as in the released config; the official code never ties
        bos_token_id=mirrored(128000),
        eos_token_id=mirrored(128001),
        pad_token_id=mirrored(128001),
        torch_dtype="float32",
    )


def encoder_config():
    return dict(
        model_type="higgs_audio_encoder",
        num_mel_bins=128,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        d_model=16,
        max_source_positions=1500,
        pad_token_id=mirrored(128001),
    )


CASES = {
    "released": dict(
        audio_adapter_type="dual_ffn_fast_forward",
        audio_dual_ffn_layers=[0, 1, 2],
        use_delay_pattern=True,
        audio_num_codebooks=8,
        skip_audio_tower=True,
        encode_whisper_embed=False,
        encode_audio_in_tokens=True,
        audio_embed_avg=False,
    ),
    "tower_ff": dict(
        audio_adapter_type="dual_ffn_fast_forward",
        audio_dual_ffn_layers=[1],
        use_delay_pattern=True,
        audio_num_codebooks=4,
        skip_audio_tower=False,
        encode_whisper_embed=True,
        encode_audio_in_tokens=True,
        audio_embed_avg=False,
    ),
    "whisper_long": dict(
        audio_adapter_type="dual_ffn_fast_forward",
        audio_dual_ffn_layers=[0, 1, 2],
        use_delay_pattern=True,
        audio_num_codebooks=4,
        skip_audio_tower=False,
        encode_whisper_embed=True,
        encode_audio_in_tokens=False,
        audio_embed_avg=False,
    ),
    "dual_ffn_nodelay": dict(
        audio_adapter_type="dual_ffn",
        audio_dual_ffn_layers=[0, 2],
        use_delay_pattern=False,
        audio_num_codebooks=4,
        skip_audio_tower=True,
        encode_whisper_embed=False,
        encode_audio_in_tokens=True,
        audio_embed_avg=True,
    ),
}


def make_config(sw):
    return HiggsAudioConfig(
        text_config=text_config(),
        audio_encoder_config=encoder_config(),
        audio_adapter_type=sw["audio_adapter_type"],
        audio_embed_avg=sw["audio_embed_avg"],
        audio_ffn_hidden_size=64,
        audio_ffn_intermediate_size=128,
        audio_dual_ffn_layers=list(sw["audio_dual_ffn_layers"]),
        audio_decoder_proj_num_layers=0,
        encode_whisper_embed=sw["encode_whisper_embed"],
        encode_audio_in_tokens=sw["encode_audio_in_tokens"],
        use_delay_pattern=sw["use_delay_pattern"],
        skip_audio_tower=sw["skip_audio_tower"],
        audio_num_codebooks=sw["audio_num_codebooks"],
        audio_codebook_size=CODEBOOK_SIZE,
        audio_stream_bos_id=CODEBOOK_SIZE,
        audio_stream_eos_id=CODEBOOK_SIZE + 1,
        audio_in_token_idx=mirrored(128015),
        audio_out_token_idx=mirrored(128016),
        pad_token_id=mirrored(128001),
        audio_out_bos_token_id=mirrored(128013),
        audio_eos_token_id=mirrored(128012),
        torch_dtype="float32",
    )


@torch.no_grad()
def reinit_(model, seed):
    """Large-variance init so that any mistake shows in the losses (the official init is N(0, 0.02))."""
    g = torch.Generator().manual_seed(seed)
    touched = set()

    def normal(t, std, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * std + mean)
        touched.add(id(t))

    hidden = model.config.text_config.hidden_size
    for name, mod in model.named_modules():
        if name.endswith("text_lm_head") or name.endswith("audio_lm_head"):
            normal(mod.weight, 2.0 / math.sqrt(hidden))  # logits std ~2
        elif isinstance(mod, torch.nn.Linear):
            normal(mod.weight, 1.0 / math.sqrt(mod.in_features))
            if mod.bias is not None:
                normal(mod.bias, 0.1)
        elif isinstance(mod, torch.nn.Conv1d):
            normal(mod.weight, 1.0 / math.sqrt(mod.in_channels * mod.kernel_size[0]))
            if mod.bias is not None:
                normal(mod.bias, 0.1)
        elif isinstance(mod, torch.nn.Embedding):
            normal(mod.weight, 0.1 if name.endswith("embed_positions") else 1.0)
        elif isinstance(mod, torch.nn.LayerNorm):
            normal(mod.weight, 0.1, 1.0)
            normal(mod.bias, 0.1)
        elif type(mod).__name__ == "LlamaRMSNorm":
            normal(mod.weight, 0.1, 1.0)
    missed = [n for n, p in model.named_parameters() if id(p) not in touched]
    assert not missed, f"parameters not re-initialised: {missed}"
    assert len(list(model.parameters())) == len(model.state_dict()), "unexpected buffers in state_dict"


# --------------------------------------------------------------------------------------------
# Synthetic audio, codes and records
# --------------------------------------------------------------------------------------------
def synth(rng, n, sr, channels):
    t = np.arange(n) / sr
    chans = []
    for _ in range(channels):
        f0 = rng.uniform(110.0, 330.0)
        sig = np.zeros(n)
        for h in range(1, 5):
            if f0 * h < sr / 2:
                sig += rng.uniform(0.2, 1.0) / h * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi))
        sig *= 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(1.0, 4.0) * t)
        sig += 0.03 * rng.standard_normal(n)
        fade = min(n // 4, int(0.01 * sr))
        ramp = np.linspace(0.0, 1.0, fade)
        sig[:fade] *= ramp
        sig[n - fade :] *= ramp[::-1]
        chans.append(sig)
    data = np.stack(chans, axis=1)
    return 0.6 * data / np.max(np.abs(data))


def synth_long(rng, sr, seconds):
    """Mostly digital silence (keeps the golden files small), with harmonic bursts at the start,
    straddling the 30 s chunk boundary, and at the end."""
    n = int(seconds * sr)
    data = np.zeros((n, 1))
    for a, b in [(0.0, 0.4), (29.8, 30.2), (seconds - 0.4, seconds)]:
        i, j = int(a * sr), int(b * sr)
        data[i:j] = synth(rng, j - i, sr, 1)
    return data


def write_audio(data_dir, rel, rng, sr, channels, seconds, K, long=False):
    path = data_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if long:
        data = synth_long(rng, sr, seconds)
    else:
        n = int(round(seconds * sr))
        data = synth(rng, n, sr, channels)
    sf.write(str(path), data, sr, subtype="PCM_16", format="WAV")
    n_frames = data.shape[0]
    T = -(-n_frames * 25 // sr)  # ceil(duration_s * 25), exact integer arithmetic
    codes = rng.integers(0, CODEBOOK_SIZE, size=(K, T), dtype=np.int64)
    np.save(str(path.with_name(path.stem + ".codes.npy")), codes)
    with open(path.with_name(path.stem + ".codes.json"), "w") as f:  # provenance (audio.py)
        json.dump(dict(audio_bytes=path.stat().st_size, audio_mtime_ns=path.stat().st_mtime_ns,
                       audio_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                       tokenizer="random codes (tests/make_golden.py)"), f)
    return dict(file=rel, sr=sr, channels=channels, frames=n_frames, T=T)


def audio_part(rel):
    return {"type": "audio", "audio_url": rel, "raw_audio": None, "offset": None, "duration": None}


def build_records(case, data_dir, rng, K):
    """Returns (records, audio_info). Record ids R0..R6; see README for what each covers."""
    info = []

    def A(name, sr, channels=1, long=False, seconds=None):
        if seconds is None:
            seconds = float(rng.uniform(0.4, 0.8))  # short: keeps tests/golden small
        rel = f"wavs/{name}.wav"
        info.append(write_audio(data_dir, rel, rng, sr, channels, seconds, K, long=long))
        return rel

    recs = []
    # R0: the official zero-shot voice cloning layout (start_index 4: turns 0..3 are context).
    recs.append(
        {
            "messages": [
                {"role": "system", "content": "Generate audio following instruction."},
                {"role": "user", "content": "This is a short reference transcript for voice cloning."},
                {"role": "assistant", "content": audio_part(A("r0_ref", 24000))},
                {"role": "user", "content": "Now say the target text in the same voice."},
                {"role": "assistant", "content": audio_part(A("r0_target", 24000))},
            ],
            "start_index": 4,
            "speaker": None,
            "misc": {},
        }
    )
    # R1: reference audio (22.05 kHz) inside a user turn (text part + audio part), start_index null.
    recs.append(
        {
            "messages": [
                {"role": "system", "content": {"type": "text", "text": "You are a helpful assistant."}},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Listen to the audio and say it again."},
                        audio_part(A("r1_user", 22050)),
                    ],
                },
                {"role": "assistant", "content": audio_part(A("r1_answer", 24000))},
            ],
            "start_index": None,
        }
    )
    # R2: assistant text + audio in one turn, with a recipient.
    recs.append(
        {
            "messages": [
                {"role": "user", "content": "Bob, please answer the question."},
                {
                    "role": "assistant",
                    "recipient": "bob",
                    "content": ["Hello there!", audio_part(A("r2_answer", 16000))],
                },
            ],
            "start_index": None,
        }
    )
    # R3: two consecutive assistant audio turns (the first ends with <|eom_id|>).
    recs.append(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Read the next two lines."}]},
                {"role": "assistant", "content": [audio_part(A("r3_first", 24000))]},
                {"role": "assistant", "content": audio_part(A("r3_second", 22050))},
            ],
            "start_index": None,
        }
    )
    # R4: 44.1 kHz stereo user audio, 22.05 kHz assistant audio.
    recs.append(
        {
            "messages": [
                {"role": "user", "content": audio_part(A("r4_user_stereo", 44100, channels=2))},
                {"role": "assistant", "content": audio_part(A("r4_answer", 22050))},
            ],
            "start_index": None,
        }
    )
    # R5: text only.
    recs.append(
        {
            "messages": [
                {"role": "user", "content": "How are you doing today?"},
                {"role": "assistant", "content": "I am doing well, thanks for asking."},
            ],
            "start_index": None,
        }
    )
    if case == "whisper_long":
        # R6: a 35 s user audio (8 kHz) that the collator cuts into two 30 s Whisper chunks,
        # another user audio after it, then assistant audio.
        recs.append(
            {
                "messages": [
                    {"role": "system", "content": "Generate audio following instruction."},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Listen to this long recording."},
                            audio_part(A("r6_long", 8000, long=True, seconds=35.0)),
                        ],
                    },
                    {"role": "user", "content": [audio_part(A("r6_short", 16000))]},
                    {"role": "assistant", "content": audio_part(A("r6_answer", 24000))},
                ],
                "start_index": None,
            }
        )
    return recs, info


# --------------------------------------------------------------------------------------------
# Official sample construction (what a dataset would hand the official collator)
# --------------------------------------------------------------------------------------------
WHISPER_SR = 16000


def load_wav(path):
    """(mono float32 waveform at the file's own rate, rate): decoded like the official audio tokenizer's
    `librosa.load(path, mono=True, sr=None)` (soundfile, float32, mean over channels; bit-identical).
    The official collator resamples it to 16 kHz itself (`librosa.resample`, soxr_hq)."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(data.mean(axis=1))), sr


def resampled_len(n, sr, target=WHISPER_SR):
    """Length of the official collator's `librosa.resample(wv, orig_sr=sr, target_sr=16000)` (fix=True).
    librosa pads/cuts soxr's output to ceil(n * (target / sr)) in float64 for a Python int rate; the
    collator passes the rate as a 0-d int64 tensor, which makes that product float32 (short of it for
    many longer clips, e.g. 22.05 kHz from 37208 samples on). The records here must be where both agree."""
    n64 = int(np.ceil(n * (float(target) / sr)))
    n32 = int(np.ceil(n * (float(target) / torch.tensor(sr, dtype=torch.long))))
    assert n64 == n32 == -(-n * target // sr), (n, sr, n64, n32)
    return n64 if sr != target else n


def build_sample(rec, tok, data_dir, cfg, chunk_samples=30 * WHISPER_SR):
    input_tokens, label_tokens, audio_contents, _ = prepare_chatml_sample(copy.deepcopy(rec), tok)
    assert input_tokens is not None, "prepare_chatml_sample failed"
    input_ids = torch.tensor(input_tokens, dtype=torch.long)
    label_ids = torch.tensor(label_tokens, dtype=torch.long)
    in_id, out_id = cfg.audio_in_token_idx, cfg.audio_out_token_idx
    kinds = [t for t in input_tokens if t in (in_id, out_id)]
    assert len(kinds) == len(audio_contents)
    K = cfg.audio_num_codebooks
    codes_l, wavs, rates = [], [], []
    expect = dict(out_codes=[], in_codes=[], n_chunks=0, mel_frames=[])  # self-check of the collated batch
    seen_out = False
    for kind, ac in zip(kinds, audio_contents):
        path = data_dir / ac.audio_url
        codes = torch.from_numpy(np.load(str(path.with_name(path.stem + ".codes.npy"))))
        assert codes.shape[0] == K
        codes_l.append(codes)
        expect["in_codes" if kind == in_id else "out_codes"].append(codes)
        if kind == in_id:
            # Official bug (SPEC 8): Whisper waveforms are indexed by the audio-in ordinal in one loop and
            # by the global audio index in another; both agree only if no audio-out precedes an audio-in.
            assert not (cfg.encode_whisper_embed and seen_out), "audio-in after audio-out: official bug"
            wav, sr = load_wav(path)
            wavs.append(wav)
            rates.append(sr)
            n16 = resampled_len(len(wav), sr)
            n_chunks = math.ceil(n16 / chunk_samples)
            for c in range(n_chunks):  # Whisper frames (hop 160) of each 30 s chunk at 16 kHz
                expect["mel_frames"].append(-(-(min(n16, (c + 1) * chunk_samples) - c * chunk_samples) // 160))
            if cfg.encode_whisper_embed and n_chunks > 1:
                # Official bug (SPEC 8): chunking duplicates the <|AUDIO|> token, and the collator then looks up
                # the codes of every LATER audio by the post-duplication index. Route around: give the official
                # collator one zero-length codes entry per extra chunk, so every later audio gets its own codes.
                # (Only sound when audio-in codes are unused, i.e. encode_audio_in_tokens=False.)
                assert not cfg.encode_audio_in_tokens
                codes_l.extend([torch.zeros((K, 0), dtype=torch.long)] * (n_chunks - 1))
            expect["n_chunks"] += n_chunks
        else:
            seen_out = True
    if codes_l:
        audio_ids_concat = torch.cat(codes_l, dim=1)
        audio_ids_start = torch.tensor(np.cumsum([0] + [c.shape[1] for c in codes_l[:-1]]), dtype=torch.long)
    else:
        audio_ids_concat = torch.zeros((K, 0), dtype=torch.long)
        audio_ids_start = torch.zeros(0, dtype=torch.long)
    if wavs:
        wv_concat = torch.cat(wavs)
        wv_start = torch.tensor(np.cumsum([0] + [len(w) for w in wavs[:-1]]), dtype=torch.long)
        wv_sr = torch.tensor(rates, dtype=torch.long)  # each audio at its own rate: the collator resamples
    else:
        wv_concat = torch.zeros(0, dtype=torch.float32)
        wv_start = torch.zeros(0, dtype=torch.long)
        wv_sr = torch.zeros(0, dtype=torch.long)
    sample = ChatMLDatasetSample(
        input_ids=input_ids,
        label_ids=label_ids,
        audio_ids_concat=audio_ids_concat,
        audio_ids_start=audio_ids_start,
        audio_waveforms_concat=wv_concat,
        audio_waveforms_start=wv_start,
        audio_sample_rate=wv_sr,
        audio_speaker_indices=torch.full((len(audio_contents),), -1, dtype=torch.long),
    )
    sample.expect = expect  # not an official field; the collator never sees it (it gets copies without it)
    return sample


def check_segments(ids, starts, expected, cfg, what):
    """Self-check: the collated audio segments are [BOS | codes | EOS] (+ delay) of the expected sidecars."""
    K, bos, eos = cfg.audio_num_codebooks, cfg.audio_stream_bos_id, cfg.audio_stream_eos_id
    assert len(starts) == len(expected), (what, len(starts), len(expected))
    bounds = list(starts.tolist()) + [ids.shape[1]]
    for i, codes in enumerate(expected):
        seg = ids[:, bounds[i] : bounds[i + 1]]
        T = codes.shape[1]
        if cfg.use_delay_pattern:
            assert seg.shape[1] == T + 2 + K - 1, what
            seg = torch.stack([seg[k, k : k + T + 2] for k in range(K)])
        assert seg.shape[1] == T + 2, what
        assert (seg[:, 0] == bos).all() and (seg[:, -1] == eos).all(), what
        assert torch.equal(seg[:, 1:-1], codes), f"{what}: segment {i} does not hold its own codes"


def make_collator(cfg):
    if cfg.encode_whisper_embed:
        # The collator only touches `.feature_extractor`; a real WhisperProcessor would need a Whisper tokenizer.
        wp = types.SimpleNamespace(feature_extractor=WhisperFeatureExtractor(feature_size=128))
    else:
        wp = None
    return HiggsAudioSampleCollator(
        whisper_processor=wp,
        audio_in_token_id=cfg.audio_in_token_idx,
        audio_out_token_id=cfg.audio_out_token_idx,
        pad_token_id=cfg.pad_token_id,
        audio_stream_bos_id=cfg.audio_stream_bos_id,
        audio_stream_eos_id=cfg.audio_stream_eos_id,
        round_to=8,
        pad_left=False,
        encode_whisper_embed=cfg.encode_whisper_embed,
        return_audio_in_tokens=cfg.encode_audio_in_tokens,
        audio_num_codebooks=cfg.audio_num_codebooks,
        use_delay_pattern=cfg.use_delay_pattern,
        disable_audio_codes_transform=False,
        chunk_size_seconds=30,
        add_new_bos_eos_for_long_chunk=True,
        mask_audio_out_token_label=True,
    )


COLLATED_KEYS = [
    "input_ids",
    "label_ids",
    "attention_mask",
    "audio_out_ids",
    "audio_out_ids_start",
    "label_audio_ids",
    "audio_in_ids",
    "audio_in_ids_start",
    "audio_features",
    "audio_feature_attention_mask",
]
N_FIRST = 4


@torch.no_grad()
def run_batch(model, collator, samples, prefix):
    # The official collator writes -100 into the callers' label_ids (SPEC 8): always hand it copies.
    plain = [ChatMLDatasetSample(**{f: getattr(x, f) for f in x.__dataclass_fields__}) for x in samples]
    batch = collator(copy.deepcopy(plain))
    cfg = model.config
    check_segments(
        batch.audio_out_ids, batch.audio_out_ids_start, sum((x.expect["out_codes"] for x in samples), []), cfg, "out"
    )
    if cfg.encode_audio_in_tokens:
        check_segments(
            batch.audio_in_ids, batch.audio_in_ids_start, sum((x.expect["in_codes"] for x in samples), []), cfg, "in"
        )
    if cfg.encode_whisper_embed:
        assert batch.audio_features.shape[0] == sum(x.expect["n_chunks"] for x in samples)
        mel = batch.audio_feature_attention_mask.sum(-1).tolist()
        assert mel == sum((x.expect["mel_frames"] for x in samples), []), mel  # resampled lengths as predicted
    out = {}
    for k in COLLATED_KEYS:
        v = getattr(batch, k)
        if v is not None:
            out[k] = v.clone().numpy()
    res = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        audio_features=batch.audio_features,
        audio_feature_attention_mask=batch.audio_feature_attention_mask,
        audio_in_ids=batch.audio_in_ids,
        audio_in_ids_start=batch.audio_in_ids_start,
        audio_out_ids=batch.audio_out_ids,
        audio_out_ids_start=batch.audio_out_ids_start,
        audio_out_ids_start_group_loc=batch.audio_out_ids_start_group_loc,
        label_ids=batch.label_ids,
        label_audio_ids=batch.label_audio_ids,
        use_cache=False,
        output_hidden_states=True,
        return_dict=True,
    )
    am = res.attention_mask
    valid = am.bool()
    hidden = res.hidden_states[-1]
    hidden = hidden * valid.unsqueeze(-1).to(hidden.dtype)  # padded positions are meaningless: stored as 0
    logits = res.logits.float()
    labels = res.expanded_labels
    K = model.config.audio_num_codebooks
    audio_logits = res.audio_logits
    n_out = int(res.audio_out_mask.sum())
    if audio_logits is None:
        audio_logits = torch.zeros((0, K, CODEBOOK_SIZE + 2))
    audio_logits = audio_logits.reshape(n_out, K, CODEBOOK_SIZE + 2).float()
    lab_a = batch.label_audio_ids
    if lab_a.numel() == 0:
        lab_a = torch.zeros((K, 0), dtype=torch.long)
    assert lab_a.shape == (K, n_out), (lab_a.shape, n_out)

    out["expanded_input_ids"] = res.expanded_input_ids.numpy()
    out["expanded_labels"] = labels.numpy()
    out["attention_mask_expanded"] = am.numpy()
    out["audio_out_mask"] = res.audio_out_mask.numpy()
    out["audio_in_mask"] = res.audio_in_mask.numpy()
    out["audio_in_discrete_codes_mask"] = res.audio_in_discrete_codes_mask.numpy()
    out["hidden"] = hidden.float().numpy()
    out["audio_logits"] = audio_logits.numpy()
    nxt = labels[:, 1:] != -100
    out["text_logits_labelled"] = logits[:, :-1][nxt].numpy()
    first = []
    for b in range(logits.shape[0]):
        pos = torch.nonzero(valid[b]).flatten()[:N_FIRST]
        first.append(logits[b, pos])
    out["text_logits_first"] = torch.stack(first).numpy()
    out["text_logits_first_pos"] = torch.stack(
        [torch.nonzero(valid[b]).flatten()[:N_FIRST] for b in range(logits.shape[0])]
    ).numpy()

    # Loss (SPEC 7), float64 from the official fp32 logits.
    lg = logits.double()
    tgt = labels[:, 1:][nxt]
    text_sum = F.cross_entropy(lg[:, :-1][nxt], tgt, reduction="sum") if tgt.numel() else torch.tensor(0.0)
    text_cnt = int(nxt.sum())
    al = audio_logits.double()
    a_sum = np.zeros(K)
    a_cnt = np.zeros(K, dtype=np.int64)
    for k in range(K):
        if n_out < 2:
            continue
        lk = lab_a[k, 1:]
        m = lk != -100
        a_cnt[k] = int(m.sum())
        if a_cnt[k]:
            a_sum[k] = float(F.cross_entropy(al[:-1, k][m], lk[m], reduction="sum"))
    out["text_loss_sum"] = np.float64(float(text_sum))
    out["text_count"] = np.int64(text_cnt)
    out["audio_loss_sum"] = a_sum
    out["audio_count"] = a_cnt
    out["text_loss"] = np.float64(float(text_sum) / text_cnt if text_cnt else float("nan"))
    out["audio_loss"] = np.float64(np.mean(a_sum / a_cnt) if (a_cnt > 0).all() else float("nan"))
    return {f"{prefix}{k}": v for k, v in out.items()}


# --------------------------------------------------------------------------------------------
README = """\
# Golden values from the official Higgs-Audio v2 code

Written by `tests/make_golden.py` (run `/tmp/refvenv/bin/python tests/make_golden.py`; it deletes and
rewrites this folder; the venv recipe is in its docstring). Official code: boson-multimodal 0.1.1,
transformers 4.46.3, torch 2.11, librosa 0.11.0, soxr 1.1.0, CPU, fp32, eval mode, `use_cache=False`.
Float values are reproducible bit for bit on one machine, not across CPUs (SIMD kernels: ~1e-6 in
logits, up to 7e-5 in Whisper features of near-silent mel bins). Official attention
implementation as auto-selected: SDPA (the plain `LlamaDecoderLayer` of `dual_ffn_nodelay` layer 1
runs eager attention, same maths).

## Layout (per case `<case>/`)
- `ckpt/`: official checkpoint (`HiggsAudioModel.save_pretrained`: `config.json`, `generation_config.json`,
  fp32 `model.safetensors`) + tokenizer (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`).
  The golden forward runs on the model RELOADED from these files with `HiggsAudioModel.from_pretrained`.
- `data/records.jsonl` (ChatML, relative `audio_url`s), `data/wavs/*.wav` (16-bit PCM) and
  `data/wavs/<stem>.codes.npy` (int64 `(num_codebooks, T)`, `T = ceil(frames * 25 / sr)`, random codes).
- `expected_bs1.npz` (each record alone: batch b = record b) and `expected_bsall.npz` (all records in one
  batch, b = 0). `batch_size`, `num_batches` stored. Keys per batch, prefixed `b{b}_`:
  - official collator output: `input_ids label_ids attention_mask audio_out_ids audio_out_ids_start
    label_audio_ids`, `audio_in_ids audio_in_ids_start` (absent when `encode_audio_in_tokens` is false),
    `audio_features audio_feature_attention_mask` (Whisper cases only).
  - official model output: `expanded_input_ids expanded_labels attention_mask_expanded audio_out_mask
    audio_in_mask audio_in_discrete_codes_mask`, `hidden` (final normed hidden, (B, L, 64), set to 0 where
    `attention_mask_expanded == 0`), `audio_logits` (N_out, K, 34), `text_logits_labelled` (logits at
    every (b, t) with `expanded_labels[b, t+1] != -100`, row-major), `text_logits_first` (B, 4, 768): the
    logits at the first 4 ATTENDED positions of each row, whose indices are `text_logits_first_pos`.
  - loss (SPEC 7) in float64 from those logits: `text_loss_sum text_count text_loss`,
    `audio_loss_sum audio_count` (per codebook, (K,)), `audio_loss` = mean_k(sum_k / count_k)
    (NaN when there is no supervised audio, e.g. the text-only record).

## Cases (tiny Llama: hidden 64, 3 layers, 4 heads / 2 kv, head_dim 16, llama3 RoPE; 32 codes + BOS 32 / EOS 33)
| case | adapter | layers with audio FFN | delay | K | tower | audio-in codes | embed |
|---|---|---|---|---|---|---|---|
| released | dual_ffn_fast_forward | 0,1,2 | yes | 8 | skipped | yes | sum |
| tower_ff | dual_ffn_fast_forward | 1 (0, 2 fast-forward) | yes | 4 | Whisper (d 16, 2 layers) | yes | sum |
| whisper_long | dual_ffn_fast_forward | 0,1,2 | yes | 4 | Whisper | no (Whisper only) | sum |
| dual_ffn_nodelay | dual_ffn | 0,2 (1 = plain Llama layer) | no | 4 | skipped | yes | avg |

Tokenizer: byte-level BPE of 512 + the 256 Llama-3 special slots at `512 + (id - 128000)`:
`<|begin_of_text|>` 512, `<|end_of_text|>` 513 (pad), `<|start_header_id|>` 518, `<|end_header_id|>` 519,
`<|eom_id|>` 520, `<|eot_id|>` 521, `<|audio_bos|>` 523, `<|audio_eos|>` 524, `<|audio_out_bos|>` 525,
`<|AUDIO|>` 527, `<|AUDIO_OUT|>` 528, `<|recipient|>` 529. Like Llama-3 it prepends `<|begin_of_text|>`
when `add_special_tokens=True`; the official code always encodes with `add_special_tokens=False`.

## Records (same in every case; whisper_long adds R6)
- R0: official zero-shot cloning layout (system, user transcript, assistant ref audio, user text, assistant
  target audio), `start_index` 4: ref audio is context (all its audio labels -100).
- R1: system as a `{"type":"text"}` part; user `[text part, audio part]` (22.05 kHz); assistant audio (24 kHz).
- R2: assistant `["plain string", audio part]` with `recipient: "bob"` (recipient tokens are labelled).
- R3: user text; two consecutive assistant audio turns (first ends with `<|eom_id|>`); 24 kHz and 22.05 kHz.
- R4: user audio from a 44.1 kHz STEREO file (channels differ; mono = mean), assistant audio 22.05 kHz.
- R5: text only (no audio anywhere).
- R6 (whisper_long only): system; user `[text, 35 s audio at 8 kHz]` (mostly digital silence with tone bursts
  at 0-0.4 s, 29.8-30.2 s, 34.6-35 s); user `[16 kHz audio]`; assistant audio. The collator cuts the 35 s audio
  into a 30 s and a 5 s Whisper chunk and duplicates its `<|audio_bos|><|AUDIO|><|audio_eos|>` triplet.

System/user audio (audio-in) enters the official collator at the file's OWN sample rate, as the official
pipeline hands it over: `audio_waveforms_concat` (float32 mono), `audio_waveforms_start`, `audio_sample_rate`
(int64, one per audio). Decoded with `soundfile.read(float32, always_2d)` and averaged over channels, which
is bit-identical to the official audio tokenizer's `librosa.load(path, mono=True, sr=None)`. In Whisper
cases the collator resamples each to 16 kHz itself: `librosa.resample(wv.numpy(), orig_sr=sr,
target_sr=16000)` (librosa's default `res_type="soxr_hq"`, float32 in and out), bit-identical to
`soxr.resample(x, sr, 16000, quality="HQ")` zero-padded to `ceil(n * 16000 / sr)` samples (soxr alone gives
round(n * 16000 / sr), up to one sample fewer). Whisper input covered: 22.05 kHz (R1), 44.1 kHz stereo (R4),
and in whisper_long 8 kHz (R6 long) and 16 kHz (R6 short, not resampled). The script checks every
resampled length through the collated `audio_feature_attention_mask` (ceil(len / 160) mel frames per chunk).
`audio_ids_concat` = the sidecar codes of all audio parts of the record in order.

## Official bugs / quirks routed around or worth knowing
- The collator writes -100 into the caller's `label_ids`: every collator call gets a deep copy.
- Whisper waveform indexing (ordinal of audio-in in one loop, global audio index in the other): all
  records put every system/user audio before any assistant audio, where both agree.
- Long audio (>30 s) duplicates `<|AUDIO|>`, after which the collator fetches the codes of every later
  audio by the post-duplication index. For R6 the script hands the official collator one extra
  zero-length codes entry after the long audio (per extra chunk) so the assistant audio gets its own codes
  (sound only because whisper_long has `encode_audio_in_tokens=false`, so audio-in codes are unused).
  Our dataset should just give each audio its own codes.
- Batch size 1: the official merge LEFT-pads (`left_padding = use_cache or batch == 1`) up to a multiple of 8,
  so in `expected_bs1.npz` rows can start with padding; batches > 1 are right-padded. The collator's own
  right padding (pad id, mask 0) also survives the merge. Compare at `attention_mask_expanded == 1`.
  Position ids are `cumsum(mask) - 1` either way, so valid positions are unaffected.
- The collator passes `audio_sample_rate[idx]`, a 0-d tensor, to librosa as `orig_sr`. With an int64 tensor
  librosa's target length `ceil(n * (16000 / sr))` is computed in float32 and falls short of the float64
  value for many longer clips (first at n = 37208 samples for 22.05 kHz, 74416 for 44.1 kHz, 18604 for
  11.025 kHz, by 1 at first, more for longer ones; for 8, 24, 32, 48 kHz only past 2^24 samples); a float64
  tensor or a Python int gives the float64 length. All clips here are short enough for both to agree (the
  script asserts it).
- `text_config.tie_word_embeddings` is true (as released) but the official code never ties the heads.
- `audio_out_ids_start_group_loc` is not stored: the collator appends one entry per SAMPLE, not per
  segment (wrong) and the forward never uses it.
- In fast-forward layers the official code removes audio-code positions (audio-in codes AND audio-out)
  from the text positions' attention and passes them through unchanged; Whisper-feature positions are
  ordinary (text-path) positions.
"""


def file_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def main():
    t0 = time.time()
    if GOLDEN.exists():
        shutil.rmtree(GOLDEN)
    GOLDEN.mkdir(parents=True)
    (GOLDEN / "README.md").write_text(README)

    tok_built = build_tokenizer()
    for ci, (case, sw) in enumerate(CASES.items()):
        case_dir = GOLDEN / case
        ckpt = case_dir / "ckpt"
        data_dir = case_dir / "data"
        data_dir.mkdir(parents=True)

        # checkpoint
        torch.manual_seed(1000 + ci)
        cfg = make_config(sw)
        model = HiggsAudioModel(cfg)
        reinit_(model, seed=2000 + ci)
        model.save_pretrained(str(ckpt), safe_serialization=True)
        tok_built.save_pretrained(str(ckpt))
        del model
        tok = AutoTokenizer.from_pretrained(str(ckpt))
        check_tokenizer(tok)
        model = HiggsAudioModel.from_pretrained(str(ckpt), torch_dtype=torch.float32)
        model.eval()
        cfg = model.config
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert keys == set(model.state_dict().keys()), keys ^ set(model.state_dict().keys())

        # data
        rng = np.random.default_rng(3000 + ci)
        records, info = build_records(case, data_dir, rng, cfg.audio_num_codebooks)
        with open(data_dir / "records.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        samples = [build_sample(r, tok, data_dir, cfg) for r in records]

        collator = make_collator(cfg)
        for name, bs in [("bs1", 1), ("bsall", len(samples))]:
            arrays = {"batch_size": np.int64(bs), "num_batches": np.int64(math.ceil(len(samples) / bs))}
            for b in range(0, len(samples), bs):
                arrays.update(run_batch(model, collator, samples[b : b + bs], f"b{b // bs}_"))
            np.savez_compressed(str(case_dir / f"expected_{name}.npz"), **arrays)

            # report
            print(f"[{case}] expected_{name}.npz")
            for b in range(int(arrays["num_batches"])):
                p = f"b{b}_"
                feats = arrays.get(p + "audio_features")
                print(
                    f"  b{b}: input_ids {arrays[p + 'input_ids'].shape}"
                    f" expanded {arrays[p + 'expanded_input_ids'].shape}"
                    f" audio_logits {arrays[p + 'audio_logits'].shape} text_loss {float(arrays[p + 'text_loss']):.5f}"
                    f" ({int(arrays[p + 'text_count'])}) audio_loss {float(arrays[p + 'audio_loss']):.5f}"
                    f" ({arrays[p + 'audio_count'].tolist()})"
                    + (f" audio_features {feats.shape}" if feats is not None else "")
                )
        # sanity: the sum over the bs=1 batches equals the all-in-one batch
        e1 = np.load(case_dir / "expected_bs1.npz")
        ea = np.load(case_dir / "expected_bsall.npz")
        n1 = int(e1["num_batches"])
        ts = sum(float(e1[f"b{b}_text_loss_sum"]) for b in range(n1))
        tc = sum(int(e1[f"b{b}_text_count"]) for b in range(n1))
        asum = sum(e1[f"b{b}_audio_loss_sum"] for b in range(n1))
        acnt = sum(e1[f"b{b}_audio_count"] for b in range(n1))
        assert tc == int(ea["b0_text_count"]) and (acnt == ea["b0_audio_count"]).all()
        print(
            f"  bs1 vs bsall: text sum {ts:.6f} vs {float(ea['b0_text_loss_sum']):.6f};"
            f" audio sums max |diff| {np.abs(asum - ea['b0_audio_loss_sum']).max():.2e}"
        )
        print(f"  logits std: text {e1['b0_text_logits_first'].std():.2f}, audio {ea['b0_audio_logits'].std():.2f}")

    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    print(f"total size of {GOLDEN.relative_to(ROOT)}: {total / 1e6:.2f} MB; digest {file_digest(GOLDEN)[:16]}")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
