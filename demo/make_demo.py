"""(Re)create the demo data bundled with this repo, deterministically (same packages, same bytes).

    python demo/make_demo.py    # from the repo root; needs espeak-ng (apt-get install espeak-ng)

demo/tokenizer/: a byte-level BPE of exactly 512 tokens, then the 256 Llama-3 special tokens at
512 + (official id - 128000), the vocabulary of `HiggsConfig.tiny()`. demo/data/: 24 espeak-ng
clips (3 voices), their codes sidecars, train.jsonl and eval.jsonl in the official voice-cloning
layout. The codes come from transformers' HiggsAudioV2TokenizerModel at a tiny config (8 x 32
codes, 25 Hz) with random weights, so they exercise the pipeline but carry no acoustic meaning.

Frame count: clips are padded to whole 960-sample hops, where encode() gives exactly n / 960
frames. Otherwise it gives ceil(n / 960), but floor when 1 <= n mod 960 <= 118 (measured: HuBERT's
window 400, stride 320 at 16 kHz after padding 160 a side gives 2T frames, every second kept).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
from audio import write_provenance  # noqa: E402
from chatml import DEFAULT_SYSTEM_PROMPT as SYSTEM_PROMPT, cloning_record  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(HERE, "tokenizer")
DATA_DIR = os.path.join(HERE, "data")
SEED = 1234
SAMPLE_RATE = 24000
HOP = 960  # 24 kHz / 960 = 25 frames/s, as the released audio tokenizer
NUM_CODEBOOKS = 8
CODEBOOK_SIZE = 32
MAX_DEMO_BYTES = 3 * 1024 * 1024

# speaker -> (espeak-ng voice, words per minute)
SPEAKERS = {"espeak_m1": ("en+m1", 175), "espeak_f3": ("en+f3", 175),
            "espeak_us_m3": ("en-us+m3", 175)}
TRANSCRIPTS = {  # the last NUM_EVAL_PER_SPEAKER of each speaker are the eval targets
    "espeak_m1": ["The sun is bright today.", "Please close the door.", "I like green apples.",
                  "We walked to the river.", "The train is late again.",
                  "She reads a book at night.", "Open the window, please.",
                  "The cat sleeps on the mat."],
    "espeak_f3": ["Good morning to you all.", "The music was very loud.",
                  "He found a small blue stone.", "Let us meet after lunch.",
                  "The garden needs more water.", "My phone is on the table.",
                  "It will rain this evening.", "Thank you for the kind words."],
    "espeak_us_m3": ["Turn left at the corner.", "The coffee is still hot.",
                     "We need three more chairs.", "Birds sing in the early spring.",
                     "This road leads to the city.", "Her voice was calm and clear.",
                     "The bus stops here at noon.", "I will call you tomorrow."]}
NUM_EVAL_PER_SPEAKER = 2
NUM_TRAIN_RECORDS = 40

# The BPE's training text (corpus_text adds the transcripts and prompt words).
CORPUS = """
Generate audio following instruction. The system gives an instruction, the user writes a text,
and the assistant answers with audio in the voice of the reference speaker.
Speech synthesis turns written words into spoken sound. A good voice sounds natural and clear.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
Every morning the town wakes up slowly. People walk to work, children run to school, and the
bakery on the corner sells fresh bread. In the afternoon the streets are quiet, and in the evening
families sit together, talk about their day, and listen to the radio or read the news.
Once upon a time there was a little house near the forest. An old man and his daughter lived there
with a dog, two cats and a few chickens. They grew potatoes, beans and tomatoes in the garden, and
every summer they picked berries in the woods. The winters were long and cold, but the fire was warm.
Numbers and time: one, two, three, four, five, six, seven, eight, nine, ten, first, second, third,
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday, today, tomorrow, yesterday, hour,
minute, week, month, year, morning, noon, afternoon, evening, night.
Questions and answers: What is your name? Where do you live? How are you today? I am fine, thank
you. Could you help me, please? Of course, I would be happy to help. Why is the sky blue? Because
sunlight is scattered by the air. Which way is the station? Go straight ahead and turn right.
Colours and things: red, orange, yellow, green, blue, purple, black, white, brown, grey; a table, a
chair, a window, a door, a book, a phone, a cup of coffee, a glass of water, a bag, a key, a car.
The weather changes quickly here. It was sunny this morning, then the wind came, and now it looks
like rain. Please take an umbrella and a warm coat when you go out.
"""


def corpus_text() -> str:
    extra = [SYSTEM_PROMPT, "system user assistant"]
    extra += [t for ts in TRANSCRIPTS.values() for t in ts]
    return CORPUS + "\n" + "\n".join(extra) + "\n"


# Text tokenizer
NAMED_SPECIALS = {
    128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
    128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
    128011: "<|audio_bos|>", 128012: "<|audio_eos|>", 128013: "<|audio_out_bos|>",
    128015: "<|AUDIO|>", 128016: "<|AUDIO_OUT|>", 128017: "<|recipient|>"}
BPE_VOCAB = 512
SPECIAL_BASE = 512  # id of <|begin_of_text|>; HiggsConfig.tiny() special_base


def special_token_names() -> list[str]:
    """The 256 Llama-3 special tokens in id order 128000..128255. Unnamed ones get Meta's Llama-3
    reserved numbering (128002-128005 -> 0-3, 128008 -> 4, 128010 on -> id - 128005)."""
    number = lambda i: i - 128002 if i < 128006 else 4 if i == 128008 else i - 128005  # noqa: E731
    names = [NAMED_SPECIALS.get(i, f"<|reserved_special_token_{number(i)}|>")
             for i in range(128000, 128256)]
    assert len(set(names)) == 256
    return names


def build_tokenizer(out_dir: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    if tok.get_vocab_size() != BPE_VOCAB:
        raise SystemExit(f"BPE trained to {tok.get_vocab_size()} tokens, need exactly {BPE_VOCAB}: "
                         "enlarge CORPUS")
    names = special_token_names()
    tok.add_special_tokens(names)  # appended in order -> ids 512..767
    for i, name in enumerate(names):
        assert tok.token_to_id(name) == SPECIAL_BASE + i, name
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(  # like Llama-3: encode() prepends bos
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
        special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>", model_max_length=131072)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    fast.save_pretrained(out_dir)
    # transformers 5 writes tokenizer_class "TokenizersBackend" and no special_tokens_map.json;
    # name the class both 4.x and 5.x know and write the map, so older transformers load it too.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        tok_cfg = dict(json.load(f), tokenizer_class="PreTrainedTokenizerFast")
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(tok_cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": bos, "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"},
                  f, indent=2)
        f.write("\n")
    fast = PreTrainedTokenizerFast.from_pretrained(out_dir)  # the checks run on the files
    assert len(fast) == BPE_VOCAB + 256 == 768, len(fast)
    got = fast.encode("<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>", add_special_tokens=False)
    assert got == [525, 528, 524], got
    got = fast.encode("<|audio_bos|><|AUDIO|><|audio_eos|>", add_special_tokens=False)
    assert got == [523, 527, 524], got
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (512, 521, 513)
    for text in [SYSTEM_PROMPT] + [t for ts in TRANSCRIPTS.values() for t in ts]:
        ids = fast.encode(text, add_special_tokens=False)
        assert max(ids) < BPE_VOCAB and fast.decode(ids) == text, text
    return fast


# Speech
def require_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit("make_demo.py: espeak-ng not found. The demo clips are synthesised with "
                         "it; install it (Debian/Ubuntu: apt-get update && apt-get install -y "
                         "espeak-ng) and rerun. It is only needed to regenerate demo/data.")
    return exe


def synthesize(exe: str, voice: str, wpm: int, text: str) -> np.ndarray:
    """espeak-ng speech -> trimmed, peak-normalised mono float32 at 24 kHz whose length is a whole
    number of 960-sample hops (trailing silence pads the last hop), quantised to 16 bits."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.wav")
        subprocess.run([exe, "-v", voice, "-s", str(wpm), "-w", path, text], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    wav = data.mean(axis=1)
    loud = np.flatnonzero(np.abs(wav) > 0.02 * np.abs(wav).max())
    margin = int(0.05 * sr)  # keep 50 ms of silence around the speech
    wav = wav[max(0, loud[0] - margin): loud[-1] + margin]
    wav = AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), sr, SAMPLE_RATE).numpy()
    wav = 0.9 * wav / np.abs(wav).max()
    wav = np.pad(wav, (0, (-len(wav)) % HOP))
    return np.round(wav * 32767).astype(np.int16).astype(np.float32) / 32768.0  # as stored


# Audio codes
def build_audio_tokenizer():
    """A small, randomly initialised HiggsAudioV2TokenizerModel: 8 quantizers x 32 codes, 25 Hz."""
    from transformers import HiggsAudioV2TokenizerConfig, HiggsAudioV2TokenizerModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # transformers derives num_quantizers = 1000 * bandwidth // (frame_rate * log2(codebook_size))
    bandwidth = NUM_CODEBOOKS * math.log2(CODEBOOK_SIZE) * (SAMPLE_RATE / HOP) / 1000
    cfg = HiggsAudioV2TokenizerConfig(
        target_bandwidths=[bandwidth], sample_rate=SAMPLE_RATE, codebook_size=CODEBOOK_SIZE,
        codebook_dim=16, semantic_sample_rate=16000, downsample_factor=320,
        # DAC acoustic encoder with the released hop (8*5*4*2*3 = 960); tiny channels
        acoustic_model_config={"encoder_hidden_size": 8, "downsampling_ratios": [8, 5, 4, 2, 3],
                               "decoder_hidden_size": 64, "upsampling_ratios": [8, 5, 4, 2, 3],
                               "hidden_size": 32},
        # HuBERT semantic model (stride 320 at 16 kHz = 50 Hz, subsampled by 2 to 25 Hz); tiny
        semantic_model_config={"model_type": "hubert", "hidden_size": 32, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "intermediate_size": 64,
                               "conv_dim": [32] * 7, "num_conv_pos_embeddings": 16,
                               "num_conv_pos_embedding_groups": 4})
    assert cfg.num_quantizers == NUM_CODEBOOKS and cfg.frame_rate == 25 and cfg.hop_length == HOP
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HiggsAudioV2TokenizerModel(cfg).eval()


@torch.no_grad()
def seed_codebooks(model, waves: list[np.ndarray]) -> None:
    """transformers zero-initialises the RVQ codebooks (all codes would be 0): seed each with frames
    of its own input, quantizer by quantizer on the residual (the first step of a k-means init)."""
    gen = torch.Generator().manual_seed(SEED)
    # the quantizer's input, exactly as encode() builds it (code copied from encode())
    embeddings = []
    for w in waves:
        x = torch.from_numpy(w)[None, None]
        sem = model.encoder_semantic(model._extract_semantic_features(x).transpose(1, 2))
        n_ac = model._get_conv1d_output_lengths(x.shape[2], model.acoustic_encoder)
        ac = model.acoustic_encoder(x if n_ac == sem.shape[2] else
                                    torch.nn.functional.pad(x, (model.pad, model.pad)))
        emb = torch.cat([ac, sem], dim=1)
        embeddings.append(model.fc(emb.transpose(1, 2)).transpose(1, 2))  # (1, H, T)
    residual = torch.cat(embeddings, dim=2)
    for q in model.quantizer.quantizers:
        proj = q.project_in(residual[0].T)  # (frames, codebook_dim)
        pick = torch.randperm(proj.shape[0], generator=gen)[:CODEBOOK_SIZE]
        q.codebook.embed.copy_(proj[pick])
        q.codebook.embed_avg.copy_(proj[pick])
        residual = residual - q.decode(q.encode(residual))


# ChatML records
def build_records(clips: dict) -> tuple[list[dict], list[dict]]:
    """clips: speaker -> [(text, file)]. Eval targets are each speaker's last clips and appear in no
    train record (neither as target nor as reference); references are other clips of the speaker."""
    train_pairs, evals = [], []
    for speaker, items in clips.items():
        train, held = items[:-NUM_EVAL_PER_SPEAKER], items[-NUM_EVAL_PER_SPEAKER:]
        for i, target in enumerate(held):
            evals.append(cloning_record(*train[i], *target, speaker))
        n = len(train)
        for offset in range(1, n):  # (offset, speaker, target) order; every target early on
            for t in range(n):
                train_pairs.append((offset, speaker, train[(t + offset) % n], train[t]))
    train_pairs.sort(key=lambda p: p[0])  # stable: offset 1 for all, then offset 2, ...
    records = [cloning_record(*ref, *tgt, s) for _, s, ref, tgt in train_pairs[:NUM_TRAIN_RECORDS]]
    random.Random(SEED).shuffle(records)
    return records, evals


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


@torch.no_grad()
def main() -> None:
    exe = require_espeak()
    torch.manual_seed(SEED)
    torch.set_num_threads(min(4, torch.get_num_threads()))

    tok = build_tokenizer(TOKENIZER_DIR)
    print(f"tokenizer: {TOKENIZER_DIR} ({len(tok)} tokens)")

    if os.path.isdir(DATA_DIR):
        shutil.rmtree(DATA_DIR)
    os.makedirs(DATA_DIR)
    clips, waves = {}, {}
    for speaker, (voice, wpm) in SPEAKERS.items():
        clips[speaker] = []
        for i, text in enumerate(TRANSCRIPTS[speaker]):
            name = f"{speaker}_{i:02d}.wav"
            wav = synthesize(exe, voice, wpm, text)
            dur = len(wav) / SAMPLE_RATE
            if not 1.0 <= dur <= 3.0:
                raise SystemExit(f"{name}: {dur:.2f} s, outside 1-3 s; shorten or lengthen "
                                 f"{text!r}")
            sf.write(os.path.join(DATA_DIR, name), wav, SAMPLE_RATE, subtype="PCM_16")
            clips[speaker].append((text, name))
            waves[name] = wav

    model = build_audio_tokenizer()
    seed_codebooks(model, list(waves.values()))
    usage = np.zeros((NUM_CODEBOOKS, CODEBOOK_SIZE), dtype=np.int64)
    for name, wav in waves.items():
        back, _ = sf.read(os.path.join(DATA_DIR, name), dtype="float32")
        assert np.array_equal(back, wav), name  # codes are computed from exactly the stored samples
        codes = model.encode(torch.from_numpy(wav)[None, None], return_dict=False)[0]
        codes = codes.numpy().astype(np.int64)  # (8, T)
        frames = math.ceil(len(wav) * 25 / SAMPLE_RATE)  # ceil(duration * 25), exact in floats
        assert len(wav) % HOP == 0 and codes.shape == (NUM_CODEBOOKS, frames) == \
            (NUM_CODEBOOKS, len(wav) // HOP), (name, codes.shape, len(wav))
        assert codes.dtype == np.int64 and codes.min() >= 0 and codes.max() < CODEBOOK_SIZE
        np.save(os.path.join(DATA_DIR, name[:-4] + ".codes.npy"), codes)
        write_provenance(os.path.join(DATA_DIR, name), "demo/make_demo.py (random weights)")
        for k in range(NUM_CODEBOOKS):
            usage[k] += np.bincount(codes[k], minlength=CODEBOOK_SIZE)
    print(f"codes: {len(waves)} clips, {usage[0].sum()} frames, "
          f"distinct codes per codebook {[int((u > 0).sum()) for u in usage]}")

    train, evals = build_records(clips)
    write_jsonl(os.path.join(DATA_DIR, "train.jsonl"), train)
    write_jsonl(os.path.join(DATA_DIR, "eval.jsonl"), evals)
    eval_targets = {r["messages"][4]["content"]["audio_url"] for r in evals}
    train_audio = {r["messages"][i]["content"]["audio_url"] for r in train for i in (2, 4)}
    assert not eval_targets & train_audio
    total_sec = sum(len(w) for w in waves.values()) / SAMPLE_RATE
    print(f"data: {DATA_DIR} ({len(waves)} clips, {total_sec:.1f} s; {len(train)} train, "
          f"{len(evals)} eval records)")

    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(HERE) for f in fs)
    print(f"demo/: {size / 1024:.0f} KiB")
    if size > MAX_DEMO_BYTES:
        raise SystemExit(f"demo/ is {size} bytes, over the {MAX_DEMO_BYTES} byte budget")


if __name__ == "__main__":
    sys.exit(main())
