"""lmms-eval task YAMLs shipped with the package: the vtw_calibration group.

    lmms-eval ... --tasks vtw_calibration --include_path "$(python -m vtw_eval.tasks)"

works from any working directory. (lmms-eval 0.7.3's LMMS_EVAL_PLUGINS route for a plugin's tasks
does not: it adds the folder to the include path after the task index has been built.)
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
