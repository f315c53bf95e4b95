"""What lmms-eval's deprecated ``LMMS_EVAL_PLUGINS=vtw_eval`` imports (``<plugin>.models``).

vtw_eval registers its backends through the ``lmms_eval.models`` entry point, which lmms-eval
reads by itself once the package is installed; lmms-eval 0.7.3 builds its task index before it
reads the variable, so the variable cannot bring the package's tasks either. Rather than a second,
half-working route, importing this stops lmms-eval at startup with what to do.
"""

raise ImportError(
    "LMMS_EVAL_PLUGINS=vtw_eval is not supported and not needed: once installed, vtw_eval's backends "
    "(--model vtw_llava, vtw_qwen2_5_vl, ...) are registered through the lmms_eval.models entry point. "
    "Remove vtw_eval from LMMS_EVAL_PLUGINS; for the vtw_calibration task pass "
    '--include_path "$(python -m vtw_eval.tasks)".'
)
