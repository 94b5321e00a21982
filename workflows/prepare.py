"""`ray job submit` entrypoint for `synthfar prepare`:
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python workflows/prepare.py SRC OUT --size 256
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the uploaded working dir

from synthfar_ray.workflow import run_workflow  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_workflow("prepare"))
