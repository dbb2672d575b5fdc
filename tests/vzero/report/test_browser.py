"""The report in a real browser: headless Chromium (Debian's `chromium`; .ci/run installs it) opens index.html from
disk, renders a page that is not blank, logs no console error or failed load, and its DOM holds the gallery."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vzero.report import build_report

pytestmark = [pytest.mark.ray, pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        "--enable-logging=stderr", "--v=0", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's `chromium` package)")
def test_the_report_renders_in_headless_chromium_without_errors(vllm_run, tmp_path) -> None:
    page = build_report(vllm_run.out, tmp_path / "report")
    url = page.resolve().as_uri()
    shot = tmp_path / "shot.png"
    res = _chromium(tmp_path / "profile", "--window-size=1280,2400", f"--screenshot={shot}", url)
    assert shot.is_file(), res.stderr[-3000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 20, "the screenshot is (nearly) blank"
    problems = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln or "net::ERR" in ln]
    # Chromium's own UI pages log to the same stream (seen in CI: "Slow network is detected" from chrome://resources);
    # only messages from our page count.
    problems = [ln for ln in problems if "source: chrome://" not in ln]
    assert problems == [], "\n".join(problems)

    dom = _chromium(tmp_path / "profile", "--dump-dom", url).stdout
    assert dom.count('<article class="prompt"') == 2 * 3, "both steps of the run x the default 3 prompts per step"
    assert dom.count('<img class="positive"') == dom.count('<img class="negative"') == 6
    assert "<h2>Gallery</h2>" in dom and dom.count('<p class="question">') == 6
