"""The job tests' own diagnostics: a job that times out must show where its processes wait."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

from job_submit_util import dump_stacks


def test_dump_stacks_finds_the_driver_by_its_command_line_and_shows_its_frames():
    marker = f"marker-{uuid.uuid4().hex[:8]}"
    code = "import time\ndef waits_here():\n    time.sleep(60)\nwaits_here()"
    proc = subprocess.Popen([sys.executable, "-c", code, marker])
    try:
        time.sleep(1.0)  # let the interpreter reach the sleep
        text = dump_stacks(["python", "-c", code, marker])
    finally:
        proc.kill()
        proc.wait()
    assert f"pid {proc.pid}" in text, text
    assert "waits_here" in text, text
    assert "not dumped" not in text

