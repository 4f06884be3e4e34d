"""The run report: summary numbers, and the HTML in a real headless browser (Debian's Chromium)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from reloop.report import RunRecord, Series, summarize, write_report

CHROMIUM = shutil.which("chromium")


def record(n: int = 4000) -> RunRecord:
    rng = np.random.default_rng(0)
    ts = np.sort(rng.integers(874_700_000_000, 893_000_000_000, n))
    y = rng.integers(0, 2, n).astype(float)
    p = np.clip(0.5 + 0.2 * (y - 0.5) + rng.normal(0, 0.25, n), 0.01, 0.99)
    users = rng.integers(0, 40, n).astype(str).astype(object)
    better = np.clip(p + 0.1 * (y - 0.5), 0.0, 1.0)
    return RunRecord(
        "t1",
        "movielens-100k",
        "dcnv2",
        {"served": Series(ts, y, p, users), "served+memory": Series(ts, y, better, users)},
        alerts=[{"ts": int(ts[2500]), "action": "retrain", "summary": "adwin:logloss <b>"}],
        versions=[{"ts": int(ts[10]), "version": "v000001", "reason": "bootstrap"}],
        shift={"scenario": "abrupt_interest", "start_ts": int(ts[2400]), "changed_labels": 900},
        throughput={"replay": 12000.0, "feature job": 60000.0},
        counts={"replayed": n},
    )


def test_summary_numbers():
    s = summarize(record())
    assert s["variants"]["served"]["n"] == 4000
    assert s["variants"]["served+memory"]["auc"] > s["variants"]["served"]["auc"]
    assert s["memory_auc_gain"] == pytest.approx(s["variants"]["served+memory"]["auc"] - s["variants"]["served"]["auc"])
    assert len(s["over_time"]["served"]["auc"]) == 20


def test_report_files(tmp_path):
    paths = write_report(record(), tmp_path)
    for key in ("summary", "html", "metrics", "memory_gain", "throughput"):
        assert paths[key].exists() and paths[key].stat().st_size > 0
    html = paths["html"].read_text()
    assert "data:image/png;base64," in html and "http" not in html.replace("http-equiv", "")
    assert "&lt;b&gt;" in html, "alert text is escaped"
    assert json.loads(paths["summary"].read_text())["run_id"] == "t1"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is installed by scripts/setup.sh")
def test_report_opens_in_headless_chromium_without_errors(tmp_path):
    from playwright.sync_api import sync_playwright

    paths = write_report(record(), tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(paths["html"].as_uri())
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
            assert len(images) == 3
            assert all(done and width > 100 for done, width in images), images
            assert page.title() == "reloop run t1"
            assert "Quality per variant" in page.inner_text("body")
            assert errors == []
        finally:
            browser.close()
