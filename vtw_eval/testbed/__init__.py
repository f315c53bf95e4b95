"""The testbed: synthetic scenes, miniature copies of standard benchmarks in their hub schemas, and a
small LLaVA trained on them (scripts/train_testbed.py), so VTW's effect can be measured offline."""
