"""The trtexec summary parser on real logs from public sources (tests/fixtures/trtexec, each file names its source)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmprune.runtime.trtexec_log import banner_version, parse, parse_file

FIXTURES = Path(__file__).parent / "fixtures" / "trtexec"


def test_tensorrt_10_summary_with_three_percentiles():
    s = parse_file(FIXTURES / "nvidia-tensorrt-4177.log")
    assert s.has_summary and s.throughput_qps == 130.298
    g = s.stats["gpu_compute"]
    assert (g.min, g.max, g.mean, g.median) == (5.34595, 13.3388, 7.58404, 7.14139)
    assert g.percentiles == {"90": 10.2881, "95": 10.8175, "99": 12.9485}
    assert s.stats["h2d"].median == 0.00814819 and s.stats["d2h"].percentiles["99"] == 0.0994873
    assert s.total_host_walltime_s == 3.00082 and s.total_gpu_compute_s == 2.96536


def test_tensorrt_86_version_line_and_device():
    s = parse_file(FIXTURES / "nvidia-tensorrt-3747.log")
    assert s.trt_version == "8.6.3" and s.device == "NVIDIA GeForce RTX 2080"
    assert s.stats["gpu_compute"].median == 197.253 and "latency" not in s.stats


def test_only_the_99th_percentile():
    s = parse_file(FIXTURES / "thu-mig-yolov10-463.log")
    assert s.stats["gpu_compute"].percentiles == {"99": 1.33472}
    assert s.stats["latency"].max == 62.6002 and s.throughput_qps == 759.832


def test_summary_after_trace_lines():
    s = parse_file(FIXTURES / "hmorimitsu-ptlflow-65.log")
    assert s.stats["gpu_compute"].median == 30.333 and s.stats["enqueue"].max == 31.1035


def test_pasted_log_without_prefixes_and_with_lost_equals_signs():
    s = parse_file(FIXTURES / "beyondli-yolo-on-jetson-4.log")
    lat = s.stats["latency"]
    assert (lat.min, lat.max, lat.mean, lat.median) == (5.38959, 6.19507, 5.93288, 6.02185)
    assert lat.percentiles == {"99": 6.17407} and s.stats["gpu_compute"].percentiles == {"99": 3.87793}


def test_banners_of_several_versions():
    lines = [l for l in (FIXTURES / "banners.txt").read_text().splitlines() if not l.startswith("#")]
    assert [parse(l).trt_version for l in lines] == ["10.3.0", "8.6.0", "10.16.0", "8.0.1"]
    assert banner_version("8601") == "8.6.1" and banner_version("110000") == "11.0.0"


def test_scientific_notation():
    # constructed line in the documented format (specs/tensorrt.md): trtexec prints tiny and huge values this way
    s = parse("[07/22/2022-23:37:09] [I] Throughput: 1.29477e+08 qps\n"
              "[07/22/2022-23:37:09] [I] GPU Compute Time: min = 9.5e-05 ms, max = 1.2E-3 ms, mean = 1e-04 ms, "
              "median = 9.9e-05 ms, percentile(99.9%) = 1.1e-03 ms\n")
    g = s.stats["gpu_compute"]
    assert s.throughput_qps == pytest.approx(1.29477e8) and g.min == pytest.approx(9.5e-5)
    assert g.percentiles == {"99.9": pytest.approx(1.1e-3)}


def test_no_summary_is_reported_as_such():
    s = parse("[I] Engine built in 12.3 sec.\n")
    assert not s.has_summary and s.stats == {}
