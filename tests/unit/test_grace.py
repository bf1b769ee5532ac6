"""The SIGUSR1 grace from a run's measured save rate (megassm/grace.py, used by slurm/common.sh)."""

import json

from megassm.grace import decide, grace_from_stats, grace_seconds, main


def _stats(tmp_path, **kw):
    stats = {"tag": "step_00000250", "mode": "async", "bytes": 82e9, "write_gbps": 0.328, "step_s": 30.0, **kw}
    path = tmp_path / "save_stats.json"
    path.write_text(json.dumps(stats))
    return path


def test_grace_is_one_and_a_half_step_plus_save_rounded_up_to_30_s():
    assert grace_seconds(82.0, 0.328, 30.0) == 420  # 1.5 x (30 + 250) = 420
    assert grace_seconds(82.0, 0.3, 30.0) == 480  # 1.5 x (30 + 273.3) = 455 -> 480
    assert grace_from_stats({"tag": "t", "mode": "sync", "bytes": 1e9, "write_gbps": 1.0, "step_s": None})[0] == 120


def test_the_measured_rate_wins_over_the_fallback_and_the_explicit_value_over_both(tmp_path, capsys):
    path = _stats(tmp_path)
    grace, line = decide(path, fallback=480, lead=600)
    assert grace == 420 and "82.00 GB / 0.328 GB/s" in line and "WARNING" not in line
    assert decide(tmp_path / "none.json", fallback=480, lead=600)[0] == 480
    grace, line = decide(path, fallback=480, lead=600, explicit=100)
    assert grace == 100 and "explicit" in line and "420 s" in line
    main([str(path), "--fallback", "480", "--lead", "600"])
    assert capsys.readouterr().out.startswith("420\tSIGUSR1 grace 420 s")


def test_a_grace_beyond_the_signal_lead_says_what_to_raise(tmp_path):
    grace, line = decide(_stats(tmp_path, write_gbps=0.1), fallback=480, lead=600)  # 82 GB at 0.1 GB/s
    assert grace == 1290 and "WARNING" in line and "--signal=B:USR1@1350" in line
