"""bench.py's CPU smoke path (the GPU numbers come from device runs, README 'Performance')."""
import bench


def test_bench_cpu_tiny_reports_its_json_fields():
    r = bench.main(["--device", "cpu", "--preset", "tiny", "--steps", "1", "--warmup", "1",
                    "--batch_size", "2"])
    assert r["positions_per_s"] > 0 and r["pipeline_samples_per_s"] > 0
    assert {"peak_gib", "mfu", "target_audio_s_per_s"} <= r.keys()
    assert r["positions_per_sample"] == 553  # 2x40 text + 8 s reference + 10 s target
