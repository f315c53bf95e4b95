"""The testbed's miniature benchmarks as a prepared datasets cache under the hub ids that
lmms-eval's built-in tasks load, so that ``--tasks mme,gqa,...`` runs them offline, unchanged.

With ``HF_HUB_OFFLINE=1`` datasets never reads the hub: it falls back to its prepared Arrow cache,
``<HF_DATASETS_CACHE>/<org>___<snake_name>/<config>/0.0.0/<hash>/`` holding ``dataset_info.json``
and ``<snake_name>-<split>.arrow``. Only ever write this into a folder of this project's: in a
user's own Hugging Face cache, a later run of the real benchmarks would read the miniature data.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

from datasets import Dataset, DatasetInfo, SplitDict, SplitInfo, load_from_disk
from datasets.arrow_writer import ArrowWriter
from datasets.naming import camelcase_to_snakecase, filenames_for_dataset_split

from vtw_eval.testbed.tasks import TASKS

CACHE_HASH = "0000000000000000"  # any name will do: datasets takes the newest folder of a config


class HubDataset(NamedTuple):
    """Where a built-in task's data lives on the hub: id, config and split."""

    hub_id: str
    config: str
    split: str


# Where each testbed task's built-in task (vtw_eval.testbed.tasks.TASKS) loads its data.
HUB_DATASETS: dict[str, HubDataset] = {
    "mme": HubDataset("lmms-lab-encoder/MME", "default", "test"),
    "pope": HubDataset("lmms-lab-encoder/POPE", "default", "test"),
    "scienceqa_img": HubDataset("lmms-lab-encoder/ScienceQA", "ScienceQA-IMG", "test"),
    "gqa": HubDataset("lmms-lab-encoder/GQA", "testdev_balanced_instructions", "testdev"),
    "textvqa_val": HubDataset("lmms-lab-encoder/textvqa", "default", "validation"),
    "mmbench_en_dev": HubDataset("lmms-lab-encoder/MMBench", "en", "dev"),
    "coco2017_cap_val": HubDataset("lmms-lab-encoder/COCO-Caption2017", "default", "val"),
}
# GQA's process_docs joins its questions to a second config of pictures by imageId.
GQA_IMAGES = HubDataset("lmms-lab-encoder/GQA", "testdev_balanced_images", "testdev")
TASK_NAMES = [TASKS[folder].built_in for folder in HUB_DATASETS]


def write_prepared(dataset: Dataset, where: HubDataset, datasets_cache: Path) -> Path:
    """``dataset`` as datasets' prepared cache of ``where``; returns its folder."""
    org, name = where.hub_id.split("/")
    snake_name = camelcase_to_snakecase(name)
    folder = datasets_cache / f"{org}___{snake_name}" / where.config / "0.0.0" / CACHE_HASH
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (arrow_file,) = filenames_for_dataset_split(str(folder), snake_name, where.split, filetype_suffix="arrow")
    with ArrowWriter(features=dataset.features, path=arrow_file) as writer:
        writer.write_table(dataset.data.table)
        num_examples, num_bytes = writer.finalize()
    splits = SplitDict(dataset_name=snake_name)
    splits.add(SplitInfo(name=where.split, num_bytes=num_bytes, num_examples=num_examples, dataset_name=snake_name))
    info = DatasetInfo(features=dataset.features, builder_name=snake_name, config_name=where.config, splits=splits)
    info.write_to_directory(str(folder))
    return folder


def write_hub_cache(data_dir: str | Path, hf_home: str | Path) -> Path:
    """Every testbed task from ``data_dir`` (save_to_disk folders, split ``test``) into the
    datasets cache of ``hf_home``; returns that datasets cache folder."""
    hf_home = Path(hf_home).resolve()
    if hf_home == (Path.home() / ".cache" / "huggingface").resolve() or (hf_home / "hub").exists():
        raise ValueError(f"{hf_home} looks like a real Hugging Face cache; give a folder of this project's")
    datasets_cache = hf_home / "datasets"
    for folder, where in HUB_DATASETS.items():
        # In memory, so that nothing is written beside the committed data.
        docs = load_from_disk(str(Path(data_dir) / folder), keep_in_memory=True)["test"]
        if folder == "gqa":
            first = {image_id: index for index, image_id in reversed(list(enumerate(docs["imageId"])))}
            pictures = docs.select(sorted(first.values()), keep_in_memory=True).flatten_indices(keep_in_memory=True)
            pictures = pictures.select_columns(["imageId", "image"]).rename_column("imageId", "id")
            write_prepared(pictures, GQA_IMAGES, datasets_cache)
            docs = docs.remove_columns("image")
        write_prepared(docs, where, datasets_cache)
    return datasets_cache


def hub_environment(hf_home: str | Path) -> dict[str, str]:
    """Environment variables under which lmms-eval reads the cache of ``hf_home``, offline."""
    hf_home = Path(hf_home).resolve()
    return {
        "HF_HOME": str(hf_home),
        "HF_DATASETS_CACHE": str(hf_home / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def written_hub_environment(hf_home: str | Path) -> dict[str, str]:
    """``hub_environment`` of a cache that ``make testbed-cache`` has written; a ValueError naming
    ``--hf-home`` and the command otherwise (before any lmms-eval run)."""
    env = hub_environment(hf_home)
    if not (Path(env["HF_DATASETS_CACHE"]) / "lmms-lab-encoder___mme").is_dir():
        raise ValueError(f"--hf-home {hf_home}: no testbed cache there; run `make testbed-cache` first")
    return env
