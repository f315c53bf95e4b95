"""`python -m vtw_eval.tasks` prints the folder to give lmms-eval's --include_path."""

from vtw_eval.tasks import TASKS_DIR

print(TASKS_DIR)
