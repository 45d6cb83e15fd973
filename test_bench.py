"""bench.py's CPU smoke path (the GPU numbers come from device runs, README 'Performance')."""
import os
import subprocess
import sys

import pytest

import bench

ROOT = os.path.dirname(os.path.abspath(__file__))

@pytest.mark.slow
def test_bench_cpu_tiny_reports_its_json_fields():
    r = bench.main(["--device", "cpu", "--preset", "tiny", "--steps", "1", "--warmup", "1",
                    "--batch_size", "2"])
    assert r["positions_per_s"] > 0 and r["pipeline_samples_per_s"] > 0
    assert {"peak_gib", "mfu", "target_audio_s_per_s"} <= r.keys()
    assert r["positions_per_sample"] == 553  # 2x40 text + 8 s reference + 10 s target

@pytest.mark.slow
def test_bench_generate_cpu_tiny_reports_consistent_fields_and_matches_transformers():
    r = bench.main(["--generate", "--device", "cpu", "--preset", "tiny", "--batch_size", "2",
                    "--frames", "20", "--steps", "1", "--baseline"])
    assert r["batch_size"] == 2 and r["frames"] == 20 and r["decode"] == "eager"
    assert r["ms_per_frame"] == pytest.approx(r["seconds"] / 20 * 1e3)
    assert r["audio_seconds_per_s"] == pytest.approx(2 * 20 / 25 / r["seconds"])
    # text, <|audio_out_bos|>, 8 s of codes with stream BOS/EOS and the delay, <|audio_eos|>,
    # text, <|audio_out_bos|>
    assert r["prompt_positions"] == 40 + 1 + (200 + 2 + 7) + 1 + 40 + 1
    assert r["compile_seconds"] >= 0
    assert 0 < r["prefill_seconds"] < r["seconds"]
    assert r["decode_ms_per_frame"] == pytest.approx((r["seconds"] - r["prefill_seconds"]) / 20 * 1e3)
    assert r["generate_speedup"] == pytest.approx(r["baseline_ms_per_frame"] / r["ms_per_frame"])
    assert r["baseline_same_codes"]  # transformers' greedy generate picks the same frames


@pytest.mark.slow
def test_bench_data_times_the_real_path_and_reports_its_json_fields():
    r = bench.main(["--data", os.path.join(ROOT, "demo", "data", "train.jsonl"), "--preset", "tiny",
                    "--device", "cpu", "--batch_size", "4", "--steps", "1", "--warmup", "1"])
    assert r["steps"] == 2 * r["steps_per_epoch"] == 20 and r["distinct_shapes"] >= 1
    assert r["first_epoch_positions_per_s"] > 0 and r["steady_positions_per_s"] > 0
    assert 0 <= r["padding_fraction"] < 0.5 and r["fixed_positions_per_s"] > 0
    assert {"first_epoch_share", "steady_share", "host_syncs_per_step", "compiled_graphs"} <= r.keys()


def test_bench_fp8_without_fp8_tensor_cores_is_one_line():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--device", "cpu",
                          "--preset", "tiny", "--fp8"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: --fp8 needs a GPU with FP8 tensor cores (H100 or newer); the device is cpu; "
        "leave --fp8 off"], out.stderr


def test_bench_fp8_with_generate_is_one_line_not_ignored():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--device", "cpu",
                          "--preset", "tiny", "--generate", "--fp8"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: --fp8 times training steps; --generate has no FP8 path: leave --fp8 off"], out.stderr
