"""Data preparation: every input format gives the same samples as the hand-written ChatML, bad
input gives an error naming its record and field (never a traceback, never invented audio),
--skip_invalid drops exactly the bad records, and `prepare` writes the audio tokenizer's codes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import train as train_mod
from audio import codes_path, expected_frames
from checkpoint import load_tokenizer, model_spec, read_config
from collate import Collator
from data import expanded_length, load_dataset, main, make_sample
from errors import DataError
from formats import load_records, read_records

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_DATA = os.path.join(ROOT, "demo", "data")

SYSTEM = "Generate audio following instruction."


@pytest.fixture(scope="module")
def tiny():
    """(text tokenizer, config) of the tiny model: 8 codebooks of 32 codes."""
    return model_spec("tiny")


def write_clip(path, seconds=1.0, sr=24000, channels=1, codes=True, seed=0, amplitude=0.3,
               frames=None):
    """A noise clip (16-bit PCM) and, unless codes=False, a sidecar of random codes with the frame
    count the audio tokenizer gives (or `frames`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    sf.write(path, (amplitude * rng.uniform(-1, 1, (n, channels))).astype(np.float32), sr,
             subtype="PCM_16")
    if codes:
        np.save(codes_path(path), rng.integers(0, 32, (8, frames or expected_frames(n, sr))))


def lines(*objs, **kw):
    return "".join(json.dumps(o, **kw) + "\n" for o in objs)


def write_lines(path, objs):
    path.write_text(lines(*objs), encoding="utf-8")
    return str(path)


def chatml(ref_text, ref_audio, text, audio, speaker=None):
    """The official cloning layout, written out by hand."""
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": ref_text},
        {"role": "assistant", "content": {"type": "audio", "audio_url": ref_audio}},
        {"role": "user", "content": text},
        {"role": "assistant", "content": {"type": "audio", "audio_url": audio}}],
        "start_index": 4, "speaker": speaker}


def user(text):
    return {"role": "user", "content": text}


def audio_msg(url, **kw):
    return {"role": "assistant", "content": {"type": "audio", "audio_url": url, **kw}}


def flat(i, **kw):
    return {"audio": f"c{i}.wav", "text": f"Sentence {i}.", **kw}


def swift(audios, content="<audio>"):
    return {"messages": [user("Say it."), {"role": "assistant", "content": content}],
            "audios": audios}


def sharegpt(i, who="human", text="Hi."):
    return {"conversations": [{"from": who, "value": text}, {"from": "gpt", "value": "<audio>"}],
            "audios": [f"c{i}.wav"]}


def same_samples(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.label_ids, y.label_ids)
        assert [s.is_out for s in x.audios] == [s.is_out for s in y.audios]
        assert all(torch.equal(s.codes, t.codes) for s, t in zip(x.audios, y.audios))


def samples_of(path, tiny):
    samples, invalid = load_dataset(str(path), *tiny)
    assert invalid == [], [x.reason for x in invalid]
    return samples


def cli(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------------------------
# Formats


TEXTS = {"alice": ["The sun is bright today.", "Please close the door.", "I like green apples."],
         "bob": ["Good morning to you all.", "The music was very loud."]}


def test_every_format_gives_the_samples_of_hand_written_chatml(tmp_path, tiny):
    clips = {s: [f"voices/{s}/{s[0]}{i}.wav" for i in range(len(t))] for s, t in TEXTS.items()}
    for s, texts in TEXTS.items():
        for i, (text, clip) in enumerate(zip(texts, clips[s])):
            write_clip(str(tmp_path / clip), 0.8 + 0.1 * i, seed=len(s) * 10 + i)
            (tmp_path / clip).with_suffix(".txt").write_text(text + "\n")
    # each clip is a target, its reference the next clip of the same speaker
    pairs = [(s, (i + 1) % len(t), i) for s, t in TEXTS.items() for i in range(len(t))]
    args = [(TEXTS[s][r], clips[s][r], TEXTS[s][i], clips[s][i], s) for s, r, i in pairs]
    want = samples_of(write_lines(tmp_path / "chatml.jsonl", [chatml(*a) for a in args]), tiny)

    with_ref = [dict(ref_text=rt, ref_audio=ra, text=t, audio=a, speaker=s) for rt, ra, t, a, s in args]
    rt, ra, t, a, _ = args[1]
    with_ref[1] = {"prompt_text": rt, "reference_audio": ra, "transcript": t, "audio_filepath": a,
                   "speaker_id": 7}  # aliases
    unpaired = [{"text": t, "audio": a, "speaker": s} for _, _, t, a, s in args]
    swift_records = [{"messages": [{"role": "system", "content": SYSTEM}, user(rt),
                                   {"role": "assistant", "content": "<audio>"}, user(t),
                                   {"role": "assistant", "content": "<audio>"}], "audios": [ra, a]}
                     for rt, ra, t, a, _ in args]
    sharegpt_records = [{"system": SYSTEM, "audios": [ra, a], "conversations": [
        {"from": "human", "value": rt}, {"from": "gpt", "value": "<audio>"},
        {"from": "human", "value": t}, {"from": "gpt", "value": "<audio>"}]}
        for rt, ra, t, a, _ in args]
    (tmp_path / "unpaired.json").write_text(json.dumps(unpaired, indent=2))  # a JSON list
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt_records))
    inputs = [("flat", write_lines(tmp_path / "flat.jsonl", with_ref)),
              ("flat", str(tmp_path / "unpaired.json")),
              ("swift", write_lines(tmp_path / "swift.jsonl", swift_records)),
              ("sharegpt", str(tmp_path / "sharegpt.json")),
              ("folder", str(tmp_path / "voices"))]
    for fmt, path in inputs:
        records, invalid, detected = read_records(path)
        assert (detected, invalid) == (fmt, []), path
        same_samples(samples_of(path, tiny), want)
    assert [r.speaker for r in records] == [s for s, _, _ in pairs]  # the folder's subfolders

    # LJSpeech: metadata.csv of id|text|normalized text, audio in wavs/; one speaker
    lj = tmp_path / "lj"
    for i, text in enumerate(TEXTS["alice"]):
        wav = str(lj / "wavs" / f"LJ-{i}.wav")
        write_clip(wav, 0.8 + 0.1 * i, seed=50 + i)
        np.save(codes_path(wav), np.load(codes_path(str(tmp_path / clips["alice"][i]))))
    (lj / "metadata.csv").write_text("".join(f"LJ-{i}|{t.upper()}|{t}\n"
                                             for i, t in enumerate(TEXTS["alice"])))
    same_samples(samples_of(lj, tiny), want[:3])
    assert read_records(str(lj / "metadata.csv"))[2] == "folder"


def test_tagged_chat_trains_only_the_final_assistant_turns(tmp_path, tiny):
    write_clip(str(tmp_path / "q.wav"), seed=1)
    write_clip(str(tmp_path / "a.wav"), seed=2)
    tagged = {"messages": [user("Repeat this: <audio>"),
                           {"role": "assistant", "content": "Sure. <audio>"}],
              "audios": ["q.wav", "a.wav"]}
    hand = {"messages": [
        user(["Repeat this:", {"type": "audio", "audio_url": "q.wav"}]),
        {"role": "assistant", "content": ["Sure.", {"type": "audio", "audio_url": "a.wav"}]}],
        "start_index": 1}
    same_samples(samples_of(write_lines(tmp_path / "s.jsonl", [tagged]), tiny),
                 samples_of(write_lines(tmp_path / "h.jsonl", [hand]), tiny))


# ----------------------------------------------------------------------------------------------
# Errors: each names the file, the record and the field, and says what to do


@pytest.fixture
def clean(tmp_path):
    """A folder of six 1 s clips c0..c5.wav with codes."""
    for i in range(6):
        write_clip(str(tmp_path / f"c{i}.wav"), seed=i)
    return tmp_path


def cloning(ref=0, tgt=1, **over):
    """A valid cloning record over the clips of `clean`."""
    return chatml(f"Reference sentence {ref}.", f"c{ref}.wav", f"Target sentence {tgt}.",
                  f"c{tgt}.wav") | over


def with_turn(k, message):
    """A cloning record whose message k is replaced."""
    messages = cloning()["messages"]
    messages[k] = message
    return cloning(messages=messages)


def one_invalid(path, tiny, max_seq_len=4096):
    """The reason of the one invalid record, which must be record 1."""
    samples, invalid = load_dataset(str(path), *tiny, max_seq_len=max_seq_len)
    assert [x.index for x in invalid] == [1], [x.reason for x in invalid]
    return invalid[0].reason


BAD_RECORDS = {  # name -> (record 1 of three, words its error must hold)
    "nothing trained": (cloning(start_index=5),
                        ["no trainable assistant audio or text", "start_index 5", "lower start_index"]),
    "no assistant turn": ({"messages": [user("Hi.")]}, ["Missing required message types"]),
    "assistant first": ({"messages": [audio_msg("c1.wav")]}, ["messages[0]", "user turn"]),
    "late system": (with_turn(2, {"role": "system", "content": "Be brief."}),
                    ["messages[2]", "system prompt can only come first"]),
    "empty text": (with_turn(3, user("  ")), ["messages[3].content", "empty text"]),
    "missing audio": (with_turn(4, audio_msg("nope.wav")),
                      ["messages[4].content", "nope.wav not found"]),
    "bad offset": (with_turn(4, audio_msg("c1.wav", offset="1")),
                   ["messages[4].content.offset", "seconds"]),
    "offset not a number": (with_turn(4, audio_msg("c1.wav", offset=float("nan"))),
                            ["messages[4].content.offset", "finite", "nan"]),
    "infinite duration": (with_turn(4, audio_msg("c1.wav", duration=float("inf"))),
                          ["messages[4].content.duration", "finite", "inf"]),
    "offset past the end": (with_turn(4, audio_msg("c1.wav", offset=5.0)),
                            ["messages[4].content", "window", "holds no audio"]),
    "raw_audio not base64": (with_turn(4, {"role": "assistant", "content": {
        "type": "audio", "raw_audio": "@@@"}}), ["messages[4].content", "not base64"]),
    "bad start_index": (cloning(start_index="4"), ["start_index must be"]),
    "unknown role": (with_turn(1, {"role": "bot", "content": "x"}), ["messages[1].role", "'bot'"]),
}


@pytest.mark.parametrize("name", BAD_RECORDS)
def test_bad_chatml_record_names_record_and_field(clean, tiny, name):
    bad, words = BAD_RECORDS[name]
    path = write_lines(clean / "d.jsonl", [cloning(), bad, cloning(2, 3)])
    reason = one_invalid(path, tiny)
    assert reason.startswith(f"{path}:2 (record 1): "), reason
    for w in words:
        assert w in reason, reason


def sidecar(codes):
    """A writer of a clip whose sidecar holds `codes`."""
    return lambda path: (write_clip(path), np.save(codes_path(path), codes))


BAD_FILES = {  # name -> (writer of the target audio of record 1, words its error must hold)
    "unreadable audio": (lambda p: open(p, "wb").write(b"RIFF, not really"),
                         ["cannot read audio", "WAV"]),
    "empty audio": (lambda p: sf.write(p, np.zeros((0, 1), np.float32), 24000), ["is empty"]),
    "missing codes": (lambda p: write_clip(p, codes=False),
                      ["codes", "not found", "python data.py prepare"]),
    "wrong codebook count": (sidecar(np.zeros((4, 25), int)), ["4 codebooks", "needs 8"]),
    "codes out of range": (sidecar(np.full((8, 25), 40)), ["outside [0, 32)"]),
    "codes not integers": (sidecar(np.zeros((8, 25))), ["integer array"]),
    "unreadable codes": (sidecar(np.array([{}])), ["cannot read codes"]),
    "codes in another container": (lambda p: (write_clip(p), np.savez(codes_path(p) + ".npz",
                                                                       np.zeros((8, 25), int)),
                                              os.replace(codes_path(p) + ".npz", codes_path(p))),
                                   ["cannot read codes", "a .npy array is needed"]),
    "frames vs duration": (lambda p: write_clip(p, frames=31),
                           ["31 frames", "gives 25", "delete it"]),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_audio_or_codes_names_record_and_field(clean, tiny, name):
    write, words = BAD_FILES[name]
    write(str(clean / "bad.wav"))
    path = write_lines(clean / "d.jsonl", [cloning(), with_turn(4, audio_msg("bad.wav")),
                                           cloning(2, 3)])
    reason = one_invalid(path, tiny)
    assert reason.startswith(f"{path}:2 (record 1): messages[4].content: "), reason
    for w in words:
        assert w in reason, reason


def test_too_long_after_expansion(clean, tiny):
    write_clip(str(clean / "long.wav"), seconds=6.0)
    path = write_lines(clean / "d.jsonl", [cloning(), with_turn(4, audio_msg("long.wav")),
                                           cloning(2, 3)])
    reason = one_invalid(path, tiny, max_seq_len=200)
    assert "more than --max_seq_len 200" in reason and "split" in reason


BAD_CONVERTED = {  # name -> (maker of the good records 0 and 2, bad record 1, words)
    "flat without text": (flat, {"audio": "c1.wav"}, ["no target text", "add \"text\""]),
    "flat empty text": (flat, flat(1, text=" "), ["\"text\" is empty"]),
    "flat half a reference": (flat, flat(1, ref_audio="c0.wav"),
                              ["has a ref_audio but no ref_text"]),
    "flat missing reference audio": (flat, flat(1, ref_audio="x.wav", ref_text="Y."),
                                     ["\"ref_audio\": audio file", "x.wav not found"]),
    "speaker with one clip": (lambda i: flat(i, speaker="a"), flat(1, speaker="solo"),
                              ["speaker 'solo' has no other clip", "ref_audio"]),
    "swift tags vs audios": (lambda i: swift([f"c{i}.wav"]), swift(["c1.wav", "c2.wav"]),
                             ["\"audios\" has 2 paths", "1 <audio> tags"]),
    "swift tag without audio": (lambda i: swift([f"c{i}.wav"]), swift([], "<audio> <audio>"),
                                ["messages[1] has more <audio> tags than the 0 paths"]),
    "sharegpt unknown role": (sharegpt, sharegpt(1, who="narrator"),
                              ["conversations[0].from is 'narrator'"]),
    "sharegpt empty text": (sharegpt, sharegpt(1, text=""),
                            ["conversations[0].value is empty text"]),
}


@pytest.mark.parametrize("name", BAD_CONVERTED)
def test_bad_converted_record_names_the_users_field(clean, tiny, name):
    good, bad, words = BAD_CONVERTED[name]
    path = write_lines(clean / "d.jsonl", [good(0), bad, good(2)])
    reason = one_invalid(path, tiny)
    assert reason.startswith(f"{path}:2 (record 1): "), reason
    for w in words:
        assert w in reason, reason


def test_bad_json_line_and_folder_clip(clean, tiny):
    path = clean / "d.jsonl"
    path.write_text(lines(cloning()) + "\n" + '{"messages": [}\n' + lines(cloning(2, 3)))
    reason = one_invalid(path, tiny)
    assert reason.startswith(f"{path}:3 (record 1): invalid JSON at column 15"), reason
    voices = clean / "voices" / "amy"
    for i in range(3):
        write_clip(str(voices / f"a{i}.wav"), seed=i)
        if i != 1:
            (voices / f"a{i}.txt").write_text("Some words.")
    reason = one_invalid(clean / "voices", tiny)
    assert reason.startswith(f"{voices / 'a1.wav'} (record 1): no transcript a1.txt"), reason


@pytest.mark.parametrize("content,words", [
    ('[{"messages": []},\n {"messages": [}]\n', ["invalid JSON at line 2 column 16"]),
    ('{\n  "messages": [\n    {"role": "user" "content": "x"}\n  ]\n}\n', ["line 3 column 21"]),
    ('{"foo": 1}\n{"bar": 2}\n', ["unknown format", "['foo']", "--format"]),
    ("[1, 2]", ["unknown format", "no record is a JSON object"]),
    ("", ["empty file"]),
    ("id,text\na,b\n", ["invalid JSON at line 1"]),
    (b"RIFF\x00\xff\xfe binary", ["not UTF-8 text"]),
])
def test_unusable_input_exits_2_with_a_message(tmp_path, capsys, content, words):
    path = tmp_path / "data.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc, out, err = cli(["check", str(path)], capsys)
    assert rc == 2 and err.startswith(f"error: {path}"), err
    for w in words:
        assert w in err, err


def test_unusable_paths_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    empty, demo = str(tmp_path / "empty"), os.path.join(DEMO_DATA, "train.jsonl")
    for argv, words in [(["check", str(tmp_path / "nope.jsonl")], "no such file"),
                        (["check", empty], "no audio clips found"),
                        (["check", empty, "--format", "flat"], "not a folder"),
                        (["check", demo, "--model", empty], "config.json not found"),
                        (["prepare", demo, "--tokenizer", empty], "config.json not found")]:
        rc, out, err = cli(argv, capsys)
        assert rc == 2 and err.startswith("error: ") and words in err, err


ODD_BUT_VALID = {  # file name -> content; each must pass `check --model tiny`
    "bom.jsonl": "\ufeff" + lines(cloning()),
    "crlf.jsonl": lines(cloning(), cloning(2, 3)).replace("\n", "\r\n\r\n"),
    "u2028.jsonl": lines(cloning(), cloning(2, 3) | {"speaker": "a\u2028b"}, ensure_ascii=False),
    "one_object.json": json.dumps(cloning(), indent=2),
    "offset.jsonl": lines({"messages": [user("Say it."),
                                        audio_msg("c1.wav", offset=0.2, duration=0.5)]}),
    "metadata.csv": "file|text\nc0.wav|Zero.\nc1.wav|One.\n",
    "numeric_speaker.jsonl": lines(flat(0, speaker_id=3), flat(1, speaker_id=3)),
}
ODD_AND_INVALID = {  # each is rejected (exit 1) with a message naming record 0, never a traceback
    "scalar.jsonl": "5\n" + lines(cloning()),
    "content_number.jsonl": lines({"messages": [user(5)]}),
    "audio_no_url.jsonl": lines({"messages": [user([{"type": "audio"}])]}),
    "messages_string.jsonl": lines({"messages": "hello"}),
    "audio_number.jsonl": lines({"audio": 5, "text": "x"}),
    "audios_number.jsonl": lines({"messages": [user("<audio>")], "audios": 3}),
    "conversations_string.jsonl": lines({"conversations": "x"}),
    "duration_zero.jsonl": lines(with_turn(4, audio_msg("c1.wav", duration=0))),
    "raw_audio_no_codes.jsonl": lines(with_turn(4, {"role": "assistant", "content": {
        "type": "audio", "raw_audio": "UklGRg=="}})),
    "csv_no_text.csv": "c0.wav\nc1.wav|One.\nc2.wav|Two.\n",
}


def test_odd_inputs_never_traceback(clean, capsys):
    for name, content in ODD_BUT_VALID.items():
        (clean / name).write_text(content, encoding="utf-8")
        rc, out, err = cli(["check", str(clean / name), "--model", "tiny"], capsys)
        assert rc == 0, (name, out, err)
    (clean / "forced.jsonl").write_text(lines(swift(["c0.wav"])))
    for name, fmt in [(n, "auto") for n in ODD_AND_INVALID] + [("forced.jsonl", "chatml")]:
        if name in ODD_AND_INVALID:
            (clean / name).write_text(ODD_AND_INVALID[name], encoding="utf-8")
        rc, out, err = cli(["check", str(clean / name), "--format", fmt], capsys)
        assert rc == 1 and "invalid (1;" in out and "(record 0): " in out, (name, out, err)

@pytest.mark.slow
def test_cli_in_a_subprocess_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\x00\x01\x02\xff")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "check", str(bad)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("error: ")


# ----------------------------------------------------------------------------------------------
# check report, --skip_invalid


def test_check_report_counts_and_flags(clean, capsys):
    write_clip(str(clean / "loud.wav"), amplitude=4.0, seed=7)  # clipped when written as PCM
    write_clip(str(clean / "quiet.wav"), amplitude=0.001, seed=8)
    write_clip(str(clean / "stereo.wav"), seconds=1.5, sr=44100, channels=2, seed=9)
    normal = [chatml("Fifteen letters.", f"c{i}.wav", "Fifteen letters.", f"c{i + 1}.wav", "s")
              for i in range(5)]
    wrong = chatml("Fifteen letters.", "c0.wav", "Far too long a transcript for 1 s of speech. " * 3,
                   "c5.wav", "s")
    odd = [chatml("Fifteen letters.", "c0.wav", "Fifteen letters.", f"{n}.wav", "t")
           for n in ("loud", "quiet", "stereo")]
    text_only = {"messages": [user("Hi."), {"role": "assistant", "content": "Hello."}]}
    path = write_lines(clean / "d.jsonl", normal + [wrong] + odd + [text_only])
    rc, out, err = cli(["check", path], capsys)  # training data needs a voice to learn
    assert rc == 1 and f"{path}:10 (record 9): no trainable assistant audio" in out
    assert "messages[1] hold only text" in out
    rc, out, err = cli(["check", path, "--allow_text_only"], capsys)
    assert rc == 0, out + err
    assert f"{path}: chatml format, 10 records: 10 valid, 0 invalid" in out
    assert "speakers: 3 (s: 6, t: 3, (unnamed): 1)" in out
    assert f"{path}:10 (record 9): trains text only" in out
    assert "target audio: 0.00 h (9.5 s)" in out
    assert "audio files: 9 (24000 Hz: 8, 44100 Hz: 1; 1 multi-channel" in out
    assert "codes: 8 codebooks of 1024 values" in out and "not checked (pass --model" in out
    assert f"{path}:6 (record 5): speaking rate 134.0 characters/s, 8.4x the median 16.0" in out
    assert "loud.wav (used by" in out and "clipped" in out
    assert "quiet.wav (used by" in out and "near-silent" in out
    rc, out, err = cli(["check", path, "--model", "tiny", "--allow_text_only"], capsys)
    assert rc == 0 and "codes: 8 codebooks of 32 values, checked against --model tiny" in out
    assert "sequence length after audio expansion: min " in out
    np.save(codes_path(str(clean / "c3.wav")), np.zeros((12, 25), int))  # one sidecar disagrees
    rc, out, err = cli(["check", path, "--allow_text_only"], capsys)
    assert rc == 0 and "disagree on the codebook count: 8 codebooks: 8 files, 12 codebooks: 1" in out
    os.remove(codes_path(str(clean / "c1.wav")))
    rc, out, err = cli(["check", path, "--allow_text_only"], capsys)
    assert rc == 1 and "8 valid, 2 invalid" in out and "invalid (2; training stops" in out
    assert f"{path}:1 (record 0): messages[4].content: audio codes" in out
    assert f"{path}:2 (record 1): messages[2].content: audio codes" in out


def test_skip_invalid_drops_exactly_the_bad_records(clean, tiny):
    objs = [cloning(0, 1), cloning(1, 2, start_index=9), cloning(2, 3), cloning(3, 4, messages=[]),
            cloning(4, 5)]
    path = write_lines(clean / "d.jsonl", objs)
    cfg = train_mod.parse(train_mod.TrainConfig, ["--output_dir", str(clean / "run")])
    with pytest.raises(DataError) as e:
        train_mod.load_data(path, *tiny, cfg)
    message = str(e.value)
    assert f"{path}: 2 of 5 records are invalid" in message and "--skip_invalid" in message
    assert f"{path}:2 (record 1)" in message and f"{path}:4 (record 3)" in message
    assert not os.path.exists(cfg.run.output_dir)

    cfg.data.skip_invalid = True
    samples = train_mod.load_data(path, *tiny, cfg)
    same_samples(samples, samples_of(write_lines(clean / "good.jsonl", objs[::2]), tiny))
    other = write_lines(clean / "eval.jsonl", [cloning(), {"messages": [user("x")]}])
    train_mod.load_data(other, *tiny, cfg)
    train_mod.load_data(path, *tiny, cfg)  # rerun: its lines are replaced, the eval lines kept
    with open(os.path.join(cfg.run.output_dir, "skipped_records.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["data"], r["index"], r["source"]) for r in rows] == [
        (other, 1, f"{other}:2 (record 1)"), (path, 1, f"{path}:2 (record 1)"),
        (path, 3, f"{path}:4 (record 3)")]
    assert "no trainable assistant audio or text" in rows[1]["reason"]
    assert "\"messages\" is empty" in rows[2]["reason"]


# ----------------------------------------------------------------------------------------------
# Expanded length


def test_expanded_length_matches_the_collator(tiny):
    cases = [(tiny, load_records(os.path.join(DEMO_DATA, "eval.jsonl")))]
    for case in ("released", "dual_ffn_nodelay", "tower_ff", "whisper_long"):  # delay off, Whisper
        ckpt = os.path.join(ROOT, "tests", "golden", case, "ckpt")
        records = load_records(os.path.join(ROOT, "tests", "golden", case, "data", "records.jsonl"))
        cases.append(((load_tokenizer(ckpt), read_config(ckpt)), records))
    for (tok, cfg), records in cases:
        collator = Collator(cfg)
        for r in records:
            s = make_sample(r, tok, cfg)
            assert expanded_length(s, cfg) == collator([s]).attention_mask.sum(), r.source


# ----------------------------------------------------------------------------------------------
# prepare


def test_prepare_writes_codes_for_any_rate_and_resumes(tmp_path, tiny, audio_tokenizer, capsys):
    from transformers import HiggsAudioV2TokenizerModel

    # four rates at 12000 samples of 24 kHz (one batch), two of 24100 samples (25 frames, floor)
    clips = {"r16.wav": (0.5, 16000, 1), "r22.wav": (0.5, 22050, 2), "r44.wav": (0.5, 44100, 2),
             "r48.wav": (0.5, 48000, 1), "same1.wav": (24100 / 24000, 24000, 1),
             "same2.wav": (24100 / 24000, 24000, 1)}
    wav = {name: str(tmp_path / "v" / name) for name in clips}
    for i, (name, (sec, sr, ch)) in enumerate(clips.items()):
        write_clip(wav[name], sec, sr, ch, codes=False, seed=i)
    data = write_lines(tmp_path / "d.jsonl", [{"text": f"Clip {n}.", "audio": f"v/{n}"} for n in clips])
    prepare = ["prepare", data, "--tokenizer", audio_tokenizer, "--device", "cpu"]
    assert main(["check", data]) == 1
    rc, out, err = cli(prepare + ["--write_chatml"], capsys)
    assert rc == 0 and "6 audio files, 0 with valid codes already, 6 to encode" in out, out + err
    codes = {name: np.load(codes_path(wav[name])) for name in clips}
    for name, (sec, sr, ch) in clips.items():
        c = codes[name]
        assert c.shape == (8, expected_frames(sf.info(wav[name]).frames, sr)), name
        assert c.dtype == np.int16 and 0 <= c.min() <= c.max() < 32
    assert codes["r16.wav"].shape[1] == 13 and codes["same1.wav"].shape[1] == 25
    assert len(np.unique(codes["same1.wav"])) > 4
    # clips encoded in one batch get the codes they get alone
    model = HiggsAudioV2TokenizerModel.from_pretrained(audio_tokenizer).eval()
    with torch.no_grad():
        x = torch.from_numpy(sf.read(wav["same2.wav"], dtype="float32")[0])[None, None]
        assert np.array_equal(model.encode(x, return_dict=False)[0].numpy(), codes["same2.wav"])

    mtimes = {name: os.stat(codes_path(wav[name])).st_mtime_ns for name in clips}
    np.save(codes_path(wav["r16.wav"]), codes["r16.wav"][:, :-3])  # stale: re-encoded
    rc, out, err = cli(prepare, capsys)
    assert rc == 0 and "6 audio files, 5 with valid codes already, 1 to encode" in out
    assert np.array_equal(np.load(codes_path(wav["r16.wav"])), codes["r16.wav"])
    assert all(os.stat(codes_path(wav[n])).st_mtime_ns == mtimes[n] for n in clips if n != "r16.wav")

    assert main(["check", data, "--model", "tiny"]) == 0
    same_samples(samples_of(tmp_path / "d.chatml.jsonl", tiny), samples_of(data, tiny))


def test_prepare_reports_files_it_cannot_encode(tmp_path, audio_tokenizer, capsys):
    write_clip(str(tmp_path / "ok.wav"), codes=False)
    write_clip(str(tmp_path / "tiny.wav"), seconds=0.003, codes=False)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....")
    path = write_lines(tmp_path / "d.jsonl", [
        {"text": "Ok.", "audio": "ok.wav"}, {"text": "Short.", "audio": "tiny.wav"},
        {"text": "Broken.", "audio": "broken.wav"}, {"text": "Missing.", "audio": "missing.wav"},
        {"text": "No audio."}])
    rc, out, err = cli(["prepare", path, "--tokenizer", audio_tokenizer, "--device", "cpu"], capsys)
    assert rc == 1 and "1 encoded, 3 failed, 1 records skipped" in out, out + err
    assert "tiny.wav: 3.0 ms is shorter than one 40 ms frame" in out
    assert "broken.wav: cannot read audio" in out and "missing.wav not found" in out
    assert f"skipped: {path}:5 (record 4): no target audio" in out
    assert os.path.isfile(codes_path(str(tmp_path / "ok.wav")))
    assert not os.path.exists(codes_path(str(tmp_path / "tiny.wav")))


def test_json_list_errors_name_the_line(tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "a"},
                         {"role": "assistant", "content": {"type": "audio", "audio_url": "x.wav"}}]}
    bad = {"messages": [{"role": "user", "content": ""}]}
    path = tmp_path / "list.json"
    path.write_text("[\n  " + json.dumps(good) + ",\n\n  " + json.dumps(bad, indent=2) + "\n]\n")
    rc, out, err = cli(["check", str(path)], capsys)
    assert rc == 1
    assert f"{path}:2 (record 0): messages[1].content: audio file" in out
    assert f"{path}:4 (record 1): messages[0].content is empty text" in out


def test_stale_codes_are_refused_everywhere_and_prepare_encodes_them_again(tmp_path, tiny,
                                                                           audio_tokenizer,
                                                                           capsys):
    import generate

    for i in range(2):
        write_clip(str(tmp_path / f"c{i}.wav"), codes=False, seed=i)
    path = write_lines(tmp_path / "d.jsonl", [flat(0, speaker="s"), flat(1, speaker="s")])
    prepare = ["prepare", path, "--tokenizer", audio_tokenizer, "--device", "cpu"]
    rc, out, err = cli(prepare, capsys)
    assert rc == 0 and "2 to encode" in out, out + err
    assert cli(["check", path], capsys)[0] == 0
    wav, later = str(tmp_path / "c0.wav"), os.stat(codes_path(str(tmp_path / "c0.wav"))).st_mtime + 5
    write_clip(wav, codes=False, seed=7)  # re-recorded at the same length, after its codes
    os.utime(wav, (later, later))
    rc, out, err = cli(["check", path], capsys)
    assert rc == 1 and "c0.codes.npy are stale: the audio's content changed after it was" in out
    assert "rerun `python data.py prepare`" in out
    assert all("are stale" in x.reason for x in load_dataset(path, *tiny)[1])
    ref = ["--model", "tiny", "--ref_audio", wav, "--ref_text", "Hi.", "--text", "Yes.", "--out",
           str(tmp_path / "o.wav"), "--device", "cpu", "--max_seconds", "0.2"]
    assert generate.main(ref) == 2
    assert "are stale (the audio's content changed after it was encoded); pass --tokenizer" in \
        capsys.readouterr().err
    assert generate.main(["--model", "tiny", "--data", path, "--out_dir", str(tmp_path / "g"),
                          "--device", "cpu", "--max_seconds", "0.2"]) == 2
    assert "are stale" in capsys.readouterr().err
    rc, out, err = cli(prepare, capsys)
    assert rc == 0 and "1 with valid codes already, 1 to encode" in out
    assert cli(["check", path], capsys)[0] == 0
    # a copy keeps its codes: they are older than the audio, but their provenance says whose
    earlier = later - 100
    os.utime(codes_path(wav), (earlier, earlier))
    os.utime(os.path.splitext(wav)[0] + ".codes.json", (earlier, earlier))
    assert cli(["check", path], capsys)[0] == 0
    # a sidecar of an earlier version (no provenance): make's rule
    os.remove(os.path.splitext(wav)[0] + ".codes.json")
    rc, out, err = cli(["check", path], capsys)
    assert rc == 1 and "stale: the codes are older than the audio" in out
    os.utime(codes_path(wav), (later + 1, later + 1))
    assert cli(["check", path], capsys)[0] == 0


def test_codes_in_another_byte_order_read_as_their_values(clean, tiny):
    codes = np.random.default_rng(0).integers(0, 32, (8, 25)).astype(">i2")
    write_clip(str(clean / "cbig.wav"))
    np.save(codes_path(str(clean / "cbig.wav")), codes)
    [sample] = samples_of(write_lines(clean / "d.jsonl", [cloning(0, "big")]), tiny)
    assert np.array_equal(sample.audios[1].codes.numpy(), codes.astype(np.int16))


def test_check_shares_its_work_among_processes_and_can_sample_the_audio_checks(clean, capsys):
    write_clip(str(clean / "quiet.wav"), amplitude=0.001, seed=8)
    records = [cloning(i, i + 1) for i in range(5)] + [cloning(0, "quiet")]
    (clean / "cquiet.wav").symlink_to(clean / "quiet.wav")
    (clean / "cquiet.codes.npy").symlink_to(clean / "quiet.codes.npy")
    path = write_lines(clean / "d.jsonl", records)
    rc, alone, _ = cli(["check", path], capsys)
    rc2, shared, _ = cli(["check", path, "--workers", "2"], capsys)
    assert rc == rc2 == 0 and alone == shared and "near-silent" in alone
    rc, out, _ = cli(["check", path, "--audio_checks", "2"], capsys)
    assert rc == 0 and "audio checks (silence, clipping): 2 of 7 files decoded" in out
