"""Miniature copies of the standard benchmarks, in the schemas of the hub datasets lmms-eval loads.

Each builder turns a scene into one doc of its task (or two, for MME's yes/no pairs). Training
examples are made by the same builders from other seeds, and their prompts by lmms-eval's own
``doc_to_text`` functions, so the model is trained on exactly the prompts it is evaluated with.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from lmms_eval.tasks.scienceqa.utils import sqa_doc_to_target

from vtw_eval.testbed.scenes import COLOURS, NUMBER_WORDS, SHAPES, Scene, random_scene, render

LETTERS = "ABCD"


def _unique_shape_item(scene: Scene, rng: random.Random):
    """An item whose shape occurs once in the scene, so 'the <shape>' names it."""
    unique = [i for i in scene.items if sum(j.shape == i.shape for j in scene.items) == 1]
    return rng.choice(unique) if unique else None


def _absent(scene: Scene, rng: random.Random) -> tuple[str, str]:
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if not scene.has(colour, shape):
            return colour, shape


def mme_docs(scene: Scene, image, index: int, rng: random.Random) -> list[dict]:
    """A yes and a no question about one image (MME scores the pair)."""
    item = rng.choice(scene.items)
    category = rng.choice(["existence", "count", "position", "color"])
    if category == "existence":
        colour, shape = _absent(scene, rng)
        questions = [f"Is there a {item.name} in the image?", f"Is there a {colour} {shape} in the image?"]
    elif category == "count":
        wrong = rng.choice([n for n in range(1, 4) if n != len(scene.items)])
        questions = [f"Are there {NUMBER_WORDS[n]} shapes in the image?" for n in (len(scene.items), wrong)]
    elif category == "position":
        side, other = ("left", "right") if "left" in item.quadrant else ("right", "left")
        questions = [f"Is the {item.name} on the {s} of the image?" for s in (side, other)]
    else:
        other = rng.choice([c for c in COLOURS if c != item.colour])
        questions = [f"Is the {item.shape} {c}?" for c in (item.colour, other)] if len(scene.items) == 1 else None
        if questions is None:
            colour, shape = _absent(scene, rng)
            questions, category = (
                [f"Is there a {item.name} in the image?", f"Is there a {colour} {shape} in the image?"],
                "existence",
            )
    return [
        {
            "question_id": f"testbed/{index:05d}.png",
            "question": q + " Please answer yes or no.",
            "answer": a,
            "category": category,
            "image": image,
        }
        for q, a in zip(questions, ("Yes", "No"))
    ]


def pope_docs(scene: Scene, image, index: int, rng: random.Random) -> list[dict]:
    present = sorted({item.shape for item in scene.items})
    missing = [shape for shape in SHAPES if shape not in present]
    if missing and rng.random() < 0.5:
        shape, answer = rng.choice(missing), "no"
    else:
        shape, answer = rng.choice(present), "yes"
    return [
        {
            "question_id": str(index),
            "question": f"Is there a {shape} in the image?",
            "answer": answer,
            "image_source": f"testbed_{index:05d}",
            "image": image,
            "category": rng.choice(["adversarial", "popular", "random"]),
        }
    ]


def gqa_docs(scene: Scene, image, index: int, rng: random.Random) -> list[dict]:
    item = _unique_shape_item(scene, rng)
    if item is not None and rng.random() < 0.5:
        question, answer = f"What color is the {item.shape}?", item.colour
    else:
        item = rng.choice(scene.items)
        question, answer = f"What shape is in the {item.quadrant} of the image?", item.shape
    return [
        {
            "id": str(index),
            "imageId": f"testbed{index}",
            "question": question,
            "answer": answer,
            "fullAnswer": f"The answer is {answer}.",
            "image": image,
        }
    ]


def gqa_training_docs(scene: Scene, image, index: int, rng: random.Random) -> list[dict]:
    """GQA-format questions asked in training only: where a named shape is, on which side, and how
    many shapes there are. MME's and POPE's yes/no questions need these facts, and a model learning
    them from yes/no answers alone stays at chance; asked directly, they are learnt quickly."""
    unique = [i for i in scene.items if sum(j.name == i.name for j in scene.items) == 1]
    kind = rng.choice(["where", "side", "count"]) if unique else "count"
    if kind == "count":
        question, answer = "How many shapes are in the image?", NUMBER_WORDS[len(scene.items)]
    else:
        item = rng.choice(unique)
        only_shape = sum(j.shape == item.shape for j in scene.items) == 1
        name = item.shape if only_shape and rng.random() < 0.5 else item.name
        if kind == "where":
            question, answer = f"Where is the {name} in the image?", item.quadrant
        else:
            question, answer = f"Which side of the image is the {name} on?", item.quadrant.split()[1]
    return [{"id": str(index), "question": question, "answer": answer, "image": image}]


def scienceqa_docs(scene: Scene, image, index: int, rng: random.Random) -> list[dict]:
    item = rng.choice(scene.items)
    choices = list(COLOURS)
    return [
        {
            "image": image,
            "question": f"Which color is the {item.shape} in the {item.quadrant}?",
            "choices": choices,
            "answer": choices.index(item.colour),
            "hint": "",
            "task": "closed choice",
            "grade": "grade1",
            "subject": "natural science",
            "topic": "colors",
            "category": "Colors",
            "skill": "Identify colors",
            "lecture": "",
            "solution": "",
        }
    ]


def mmbench_docs(scene: Scene, image, index: int, rng: random.Random) -> list[dict]:
    count = len(scene.items)
    options = [NUMBER_WORDS[n] for n in (1, 2, 3, 4)]
    return [
        {
            "index": index,
            "question": "How many shapes are in the image?",
            "hint": "nan",
            **dict(zip(LETTERS, options)),
            "answer": LETTERS[count - 1],
            "category": "object_counting",
            "image": image,
            "source": "testbed",
            "L2-category": "fine-grained perception (instance-level)",
            "comment": "nan",
            "split": "dev",
        }
    ]


def textvqa_docs(scene: Scene, image, index: int, rng: random.Random) -> list[dict]:
    answer = scene.text
    kind = "number" if answer.isdigit() else "word"
    return [
        {
            "image_id": f"testbed{index}",
            "question_id": index,
            "question": f"what {kind} is written in the image?",
            "question_tokens": ["what", kind, "is", "written", "in", "the", "image"],
            "image": image,
            "image_width": 64,
            "image_height": 64,
            "flickr_original_url": "",
            "flickr_300k_url": "",
            "answers": [answer] * 10,
            "image_classes": [kind],
            "set_name": "val",
            "ocr_tokens": [answer],
        }
    ]


def coco_docs(scene: Scene, image, index: int, rng: random.Random) -> list[dict]:
    caption = scene.caption()
    variants = [
        caption,
        caption.replace(" a ", " one ", 1),
        caption.replace(" .", " in the picture ."),
        f"a picture of {caption}",
        caption.replace("a ", "one ", 1),
    ]
    return [
        {
            "question_id": f"COCO_val2017_{index:012d}.jpg",
            "image": image,
            "question": "Please carefully observe the image and come up with a caption for the image.",
            "answer": variants,
            "id": index,
            "license": 1,
            "file_name": f"{index:012d}.jpg",
            "coco_url": "",
            "height": 64,
            "width": 64,
            "date_captured": "2026-11-24",
        }
    ]


class TestbedTask(NamedTuple):
    """One miniature benchmark: how a scene becomes its docs, and how a doc is answered."""

    build_docs: Callable[..., list[dict]]  # (scene, image, index, rng) -> docs in the hub schema
    with_text: bool  # its scenes hold rendered text (TextVQA) instead of shapes
    built_in: str  # the lmms-eval task that runs it; its YAML gives the prompt
    target: Callable[[dict], str]  # the answer as the model should say it


TASKS: dict[str, TestbedTask] = {
    "mme": TestbedTask(mme_docs, False, "mme", lambda d: d["answer"]),
    "pope": TestbedTask(pope_docs, False, "pope", lambda d: d["answer"].capitalize()),
    "gqa": TestbedTask(gqa_docs, False, "gqa", lambda d: d["answer"]),
    "scienceqa_img": TestbedTask(scienceqa_docs, False, "scienceqa_img", sqa_doc_to_target),
    # mmbench_en_dev's aggregation asks an OpenAI judge; _static is its regex extraction, same data.
    "mmbench_en_dev": TestbedTask(mmbench_docs, False, "mmbench_en_dev_static", lambda d: d["answer"]),
    "textvqa_val": TestbedTask(textvqa_docs, True, "textvqa_val", lambda d: d["answers"][0]),
    "coco2017_cap_val": TestbedTask(coco_docs, False, "coco2017_cap_val", lambda d: d["answer"][0]),
}


def built_in_prompts() -> dict[str, Callable[[dict], str]]:
    """Per testbed task, its built-in task's ``doc_to_text`` with the YAML's default prompt
    arguments: the prompts lmms-eval evaluates with, so training uses exactly those."""
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import load_yaml_config

    index = TaskManager(verbosity="ERROR").task_index
    prompts = {}
    for folder, task in TASKS.items():
        config = load_yaml_config(yaml_path=index[task.built_in]["yaml_path"])
        kwargs = (config.get("lmms_eval_specific_kwargs") or {}).get("default")
        doc_to_text = config["doc_to_text"]
        prompts[folder] = (lambda d, f=doc_to_text, k=kwargs: f(d, k)) if kwargs else doc_to_text
    return prompts


# Main metric of each testbed task (as lmms-eval names it), its chance level and its best value.
# MME sums acc + acc+ (each 0..100) over its 4 categories: guessing gives 50 + 25 per category.
# GQA asks a colour (1 of 4) or a shape (1 of 3); MMBench counts one to three shapes (options A-C
# of four); TextVQA asks a digit (1 of 10) or a word (1 of 6), half each, and says which. COCO
# captions have no chance level: K=0 (captions without the image) is their reference.
CHANCE: dict[str, tuple[str, float | None]] = {
    "mme": ("mme_perception_score", 4 * 75.0),
    "gqa": ("exact_match", 0.3),
    "scienceqa_img": ("exact_match", 0.25),
    "mmbench_en_dev_static": ("gpt_eval_score", 100 / 3),
    "textvqa_val": ("exact_match", (1 / 10 + 1 / 6) / 2),
    "pope": ("pope_accuracy", 0.5),
    "coco2017_cap_val": ("coco_CIDEr", None),
}
BEST = {"mme_perception_score": 800.0, "gpt_eval_score": 100.0, "exact_match": 1.0, "pope_accuracy": 1.0}


def check_claims(rows: list[dict], withdraw_layer: int, num_layers: int) -> list[tuple[str, bool, str]]:
    """The testbed's three claims, on vtw-diff rows (vtw_eval.diff.metric_rows) of three runs in
    this order: the baseline, VTW at the calibrated K, K=0.

    Scores are compared as fractions of each metric's range from chance to best:
    (a) the baseline closes at least half of the gap from chance to best, on every task;
    (b) at K=0 at most a fifth of it remains, on every task (all need the image);
    (c) VTW at the calibrated ``withdraw_layer`` is within 2 percentage points of the metric's full
        range of the baseline, on every task, and withdraws something (K < ``num_layers``).
    """
    by_task = {(row["task"], row["metric"]): row for row in rows}
    found = {"a": [], "b": [], "c": []}
    for task, (metric, chance) in CHANCE.items():
        row = by_task.get((task, metric))
        if row is None or chance is None:
            continue
        gap = BEST[metric] - chance
        baseline, vtw, k0 = row["values"]
        # 1e-9 keeps the edges inside: 2 docs of 100 are 2 points, though 0.77 - 0.75 > 0.02 in floats
        found["a"].append((task, (baseline - chance) / gap >= 0.5 - 1e-9, f"{baseline:.3g}"))
        found["b"].append((task, (k0 - chance) / gap <= 0.2 + 1e-9, f"{k0:.3g}"))
        delta = vtw - baseline
        found["c"].append((task, abs(delta) / BEST[metric] <= 0.02 + 1e-9, f"{delta:+.3g}"))
    claims = {
        "a": "(a) baseline far above chance",
        "b": "(b) near chance at K=0",
        "c": f"(c) VTW at K={withdraw_layer} of {num_layers} within 2 points of baseline",
    }
    withdraws = {"a": True, "b": True, "c": withdraw_layer < num_layers}
    return [
        (
            claims[key],
            bool(items) and withdraws[key] and all(ok for _, ok, _ in items),
            ", ".join(f"{t} {d}" for t, _, d in items),
        )
        for key, items in found.items()
    ]


def image_key(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def make_docs(
    task: str, num_scenes: int, seed: int, exclude: frozenset[str] = frozenset(), builder: Callable | None = None
) -> list[dict]:
    """Docs of ``num_scenes`` scenes, by the task's builder or ``builder``. A picture that is in
    ``exclude`` (by image_key) is drawn again with new jitter: redrawing the whole scene would skew
    the scenes towards those with more variants (most one-shape pictures are in the training set)."""
    builder = builder or TASKS[task].build_docs
    rng = random.Random(f"{builder.__name__}-{seed}")
    docs = []
    for index in range(num_scenes):
        scene = random_scene(rng, with_text=TASKS[task].with_text)
        for _ in range(10_000):
            image = render(scene, rng)
            if image_key(image) not in exclude:
                break
        else:
            raise RuntimeError(f"every picture of {scene} drawn is in the excluded set")
        docs += builder(scene, image, index, rng)
    return docs


# Scenes drawn per task for training, as multiples of ``num_per_task``: yes/no questions (which
# need the question compared with the picture) and reading words are learnt slowest, so they get more.
TRAINING_SHARE = {"mme": 4, "pope": 6, "gqa": 2, "textvqa_val": 3}
# Training-only question builders, each prompted as the task it is keyed by, with its scene share.
TRAINING_ONLY = {"gqa": (gqa_training_docs, 3)}


class Example(NamedTuple):
    task: str
    image: object  # PIL image
    prompt: str  # as lmms-eval's doc_to_text builds it
    answer: str


def training_examples(num_per_task: int, seed: int) -> list[Example]:
    """Examples of every task and the training-only questions, shuffled."""
    examples, prompts = [], built_in_prompts()
    for task, (_, _, _, target) in TASKS.items():
        docs = make_docs(task, num_per_task * TRAINING_SHARE.get(task, 1), seed)
        if task in TRAINING_ONLY:
            extra_builder, share = TRAINING_ONLY[task]
            docs += make_docs(task, num_per_task * share, seed, builder=extra_builder)
        examples += [Example(task, doc["image"], prompts[task](doc), target(doc)) for doc in docs]
    random.Random(seed).shuffle(examples)
    return examples


def write_datasets(out: str | Path, num_scenes: int, seed: int, training_per_task: int, training_seed: int) -> dict:
    """Every task's evaluation docs, saved with ``save_to_disk`` under ``out/<task>`` (split ``test``).

    Pictures that occur in the training set (``training_examples(training_per_task, training_seed)``)
    are redrawn, so evaluation images are held out.
    """
    from datasets import Dataset, DatasetDict

    seen = frozenset(image_key(example.image) for example in training_examples(training_per_task, training_seed))
    sizes = {}
    for task in TASKS:
        docs = make_docs(task, num_scenes, seed, exclude=seen)
        DatasetDict({"test": Dataset.from_list(docs)}).save_to_disk(str(Path(out) / task))
        sizes[task] = len(docs)
    return sizes
