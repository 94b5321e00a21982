"""The CLI answers at once: `synthfar --help` imports no stage, and a stage's module (its config and
sub-command) loads without torch, Ray, diffusers, transformers or matplotlib, which it imports only
when it runs. Checked in fresh interpreters (the test process itself has them all loaded); the
assertion is on what gets imported, not on seconds, so a busy CI box cannot make it flaky."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from synthfar_ray.cli import STAGES

HEAVY = ("torch", "ray", "diffusers", "transformers", "matplotlib", "torchvision")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loaded_after(code: str) -> set[str]:
    """Top-level packages of HEAVY that a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1])) & set(HEAVY)


def test_help_imports_no_stage():
    code = ("import contextlib, io, sys\nfrom synthfar_ray.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as buf:\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "assert all(name in buf.getvalue() for name in ('generate', 'train', 'pipeline')), buf.getvalue()\n"
            "assert not any(m.startswith('synthfar_ray.') and m.split('.')[1] in "
            "('generate', 'train', 'sampling', 'tune', 'report', 'pipeline', 'evaluate', 'ingest') for m in sys.modules)")
    assert loaded_after(code) == set()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_module_loads_without_heavy_imports(stage):
    module = STAGES[stage][0]
    if __import__("importlib").util.find_spec(module) is None:
        pytest.skip(f"{module} is not built")
    assert loaded_after(f"import {module}") == set(), f"{module} imports heavy packages at import time"


# Nor pandas (~0.35-0.6 s): a bad train config took 1.1-1.3 s while train's config imported the quality
# stage, sample and tune 1.0-1.2 s, quality 1.0 s and report (matplotlib too) 2.1 s; 0.4-0.7 s each once
# the configs moved beside, not into, their pandas code (sampling_config.py, quality_config.py; 2026-12-07).
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_module_loads_without_pandas(stage):
    code = f"import sys, {STAGES[stage][0]}\nassert 'pandas' not in sys.modules, '{stage} imports pandas'"
    loaded_after(code)


BAD_CONFIGS = {  # stage -> a config file that breaks one rule
    "train": "name: x\nstorage_path: /tmp/x\nplan: mix\nsynthetic: /data/s\n",  # mix without `real`
    "sample": "synthetic: /data/s\nreal: /data/r\nmethod: cl-sam\nk: 10\nk_multiple: 2\n",  # k and k_multiple
    "quality": "duplicate_distance: 9\n",  # above 3
}


@pytest.mark.parametrize("stage", sorted(BAD_CONFIGS))
def test_config_error_answers_before_heavy_imports(tmp_path, stage):
    """A bad config fails with its one-line error while torch, Ray and pandas are still unimported."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONFIGS[stage])
    args = ["quality", "/data/s", "--config", str(bad)] if stage == "quality" else [stage, str(bad)]
    code = (f"import contextlib, io, sys\nfrom synthfar_ray.cli import main\n"
            f"with contextlib.redirect_stderr(io.StringIO()) as err:\n    code = main({args!r})\n"
            f"assert code == 2 and 'error' in err.getvalue(), (code, err.getvalue())\n"
            f"assert 'pandas' not in sys.modules")
    assert loaded_after(code) == set()
