"""Golden voice-cloning generations from the OFFICIAL Higgs-Audio v2 code (boson-multimodal 0.1.1).

Run from the repository root with the reference venv (recipe in tests/make_golden.py), after
tests/make_golden.py (whose checkpoints and reference clips it reuses):

    /tmp/refvenv/bin/python tests/make_golden_generate.py

Writes tests/golden_generate/expected.json and its README. Imports nothing from the repository.
Each prompt is built the way the official serve engine builds one (`HiggsAudioServeEngine.
_prepare_inputs` with force_audio_gen: `prepare_chatml_sample` of the ChatML messages, then
`<|start_header_id|>assistant<|end_header_id|>\\n\\n<|audio_out_bos|>`, its collator with
round_to=1), except that the reference's codes come from its sidecar instead of the audio
tokenizer. Then the official `HiggsAudioModel.generate` runs greedy (do_sample=False), repetition-
aware sampling off, with its default dynamic KV cache (`use_cache=False` crashes in its audio mode:
it builds one next text token per audio position; the static-cache buckets crash on CPU). Only
`generate` is used, nothing is re-implemented. Deterministic: CPU, fp32, one thread.
"""

import copy
import json
import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"

import numpy as np
import torch
from transformers import AutoTokenizer, WhisperFeatureExtractor
from transformers.utils import logging as hf_logging

from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample
from boson_multimodal.model.higgs_audio import HiggsAudioModel
from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

warnings.filterwarnings("ignore")
hf_logging.set_verbosity_error()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
OUT = ROOT / "tests" / "golden_generate"
MAX_NEW_TOKENS = 60  # generate() steps: the prompt step (all-BOS frame), then one frame each
POSTFIX = "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>"
REF_TEXT = "This is a short reference transcript for voice cloning."
CASES = {  # name -> (golden case whose checkpoint and reference clip are used, target texts)
    "released": ("released", ["Now say the target text in the same voice.",
                              "The cat sat on the mat.", "Hello there!"]),
    "tower_ff": ("tower_ff", ["Now say the target text in the same voice.", "Hello there!"]),
    # the audio head's stream-EOS rows zeroed (the golden test does the same): never ends
    "released_no_eos": ("released", ["Now say the target text in the same voice."]),
}

README = """\
# Golden generations from the official Higgs-Audio v2 code

Written by `tests/make_golden_generate.py` (see its docstring): the official
`HiggsAudioModel.generate` of boson-multimodal 0.1.1 (transformers 4.46.3, torch 2.11, CPU,
fp32), greedy, repetition-aware sampling off, on zero-shot cloning prompts built like the
official serve engine builds them. It reuses the checkpoints and the reference clip
`data/wavs/r0_ref.wav` (codes from its sidecar) of `tests/golden/<case>/`:
`released` (all layers DualFFN, 8 codebooks), `tower_ff` (fast-forward layers 0 and 2, a
Whisper tower the prompt does not use, 4 codebooks), and `released_no_eos`: the released one
with the stream-EOS rows of its audio head zeroed, so the stream never ends and runs to the limit.

`expected.json`: `{name: {"ckpt", "data_dir" (relative to this folder), "zero_eos_rows",
"max_new_tokens", "prompts": [...]}}`, each prompt with `messages` (ChatML, audio paths relative to data_dir),
`input_ids` (the official prompt tokens, ending in `<|audio_out_bos|>`), `stream` (the official
`audio_sequences[0]`, (K, L): the all-BOS first frame then every generated frame, delay pattern
applied), `codes` (the serve engine's output: `revert_delay_pattern(stream).clip(0, 31)[:, 1:-1]`)
and `ended` (the stream closed with `<|audio_eos|>` within max_new_tokens). The streams of the
first two cases end, through the EOS countdown with its one-step lag (codebook k is forced to EOS
one frame after the delay pattern would put it); with the large-variance random heads EOS comes
within 20 frames. The `released_no_eos` stream is max_new_tokens (60) frames long.
"""


def prompt_inputs(case_dir, tok, cfg, messages):
    ids, _, audios, _ = prepare_chatml_sample(copy.deepcopy({"messages": messages}), tok)
    ids = ids + tok.encode(POSTFIX, add_special_tokens=False)
    codes = [torch.from_numpy(np.load(case_dir / "data" / a.audio_url.replace(".wav", ".codes.npy")))
             for a in audios]
    sample = ChatMLDatasetSample(
        input_ids=torch.LongTensor(ids), label_ids=None, audio_ids_concat=torch.cat(codes, 1),
        audio_ids_start=torch.tensor(np.cumsum([0] + [c.shape[1] for c in codes[:-1]])),
        audio_waveforms_concat=None, audio_waveforms_start=None, audio_sample_rate=None,
        audio_speaker_indices=None)
    # the collator only touches a Whisper processor's feature extractor (make_golden.py)
    whisper = type("P", (), {"feature_extractor": WhisperFeatureExtractor(feature_size=128)})()
    collator = HiggsAudioSampleCollator(
        whisper_processor=whisper if cfg.encode_whisper_embed else None,
        encode_whisper_embed=cfg.encode_whisper_embed, audio_in_token_id=cfg.audio_in_token_idx,
        audio_out_token_id=cfg.audio_out_token_idx, audio_stream_bos_id=cfg.audio_stream_bos_id,
        audio_stream_eos_id=cfg.audio_stream_eos_id, pad_token_id=cfg.pad_token_id,
        return_audio_in_tokens=False, use_delay_pattern=cfg.use_delay_pattern,
        audio_num_codebooks=cfg.audio_num_codebooks, round_to=1)
    return ids, asdict(collator([sample]))


def main():
    OUT.mkdir(exist_ok=True)
    (OUT / "README.md").write_text(README)
    expected = {}
    for name, (case, texts) in CASES.items():
        case_dir = GOLDEN / case
        tok = AutoTokenizer.from_pretrained(str(case_dir / "ckpt"))
        model = HiggsAudioModel.from_pretrained(str(case_dir / "ckpt"), torch_dtype=torch.float32).eval()
        cfg = model.config
        zero_eos = name.endswith("_no_eos")
        if zero_eos:
            rows = cfg.audio_codebook_size + 2
            with torch.no_grad():
                model.audio_decoder_proj.audio_lm_head.weight[cfg.audio_stream_eos_id::rows] = 0
        prompts = []
        for text in texts:
            messages = [
                {"role": "system", "content": "Generate audio following instruction."},
                {"role": "user", "content": REF_TEXT},
                {"role": "assistant", "content": {"type": "audio", "audio_url": "wavs/r0_ref.wav"}},
                {"role": "user", "content": text},
            ]
            ids, inputs = prompt_inputs(case_dir, tok, cfg, messages)
            text_ids, audio = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, use_cache=True,
                                             do_sample=False, ras_win_len=None, tokenizer=tok,
                                             stop_strings=["<|end_of_text|>", "<|eot_id|>"])
            stream = audio[0]
            after = text_ids[0, len(ids):].tolist()
            ended = cfg.audio_eos_token_id in after
            codes = revert_delay_pattern(stream).clip(0, cfg.audio_codebook_size - 1)[:, 1:-1]
            prompts.append(dict(messages=messages, input_ids=ids, stream=stream.tolist(),
                                codes=codes.tolist(), ended=ended))
            print(f"[{name}] {text!r}: {len(ids)} prompt tokens, stream {tuple(stream.shape)}, "
                  f"codes {tuple(codes.shape)}, ended {ended}")
        expected[name] = dict(ckpt=f"../golden/{case}/ckpt", data_dir=f"../golden/{case}/data",
                              zero_eos_rows=zero_eos, max_new_tokens=MAX_NEW_TOKENS, prompts=prompts)
    (OUT / "expected.json").write_text(json.dumps(expected) + "\n")


if __name__ == "__main__":
    sys.exit(main())
