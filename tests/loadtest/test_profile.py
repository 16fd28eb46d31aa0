from __future__ import annotations

import pytest

from loadtest.profile import DailyProfile


def test_default_day_has_night_trough_and_lunch_and_evening_peaks() -> None:
    profile = DailyProfile()
    shares = profile.shares()
    assert sum(shares) == pytest.approx(1.0)
    assert max(shares[2:6]) < min(shares[11:14]) / 4  # night far below lunch
    assert profile.peak_hour in range(19, 23)
    assert shares[12] > shares[9] and shares[12] > shares[15]  # lunch is a local peak
    assert profile.peak_factor == pytest.approx(max(shares) * 24)
    assert profile.requests_per_day_at_peak(profile.peak_rps(10_000)) == pytest.approx(10_000)


def test_profile_from_csv(tmp_path) -> None:
    path = tmp_path / "day.csv"
    path.write_text("hour,weight\n" + "".join(f"{h},{2 if h == 9 else 1}\n" for h in range(24)))
    profile = DailyProfile.from_csv(path)
    assert profile.peak_hour == 9
    assert profile.peak_factor == pytest.approx(2 * 24 / 25)


def test_incomplete_csv_is_refused(tmp_path) -> None:
    path = tmp_path / "day.csv"
    path.write_text("".join(f"{h},1\n" for h in range(23)))
    with pytest.raises(ValueError, match="0-23"):
        DailyProfile.from_csv(path)
