"""Write the tiny local MME-format dataset behind tasks/vtw_tiny (committed; rerun to rebuild).

Eight 32x32 pictures of one coloured square each, two yes/no questions per picture (one "Yes",
one "No", as MME's pairwise scoring requires), saved with ``datasets.save_to_disk``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from PIL import ImageDraw

from vtw_eval.testbed.scenes import COLOURS  # the testbed's colours: one table


def make_docs(num_images: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for index in range(num_images):
        colour = list(COLOURS)[index % len(COLOURS)]
        other = rng.choice([c for c in COLOURS if c != colour])
        image = PILImage.new("RGB", (32, 32), (255, 255, 255))
        x, y = rng.randint(0, 16), rng.randint(0, 16)
        ImageDraw.Draw(image).rectangle([x, y, x + 15, y + 15], fill=COLOURS[colour])
        for asked, answer in ((colour, "Yes"), (other, "No")):
            docs.append(
                {
                    "question_id": f"tiny/{index:03d}.png",
                    "question": f"Is there a {asked} square in the image ? Please answer yes or no.",
                    "answer": answer,
                    "category": "color",
                    "image": image,
                }
            )
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "tasks" / "vtw_tiny" / "data"))
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    features = Features(
        {
            "question_id": Value("string"),
            "question": Value("string"),
            "answer": Value("string"),
            "category": Value("string"),
            "image": Image(),
        }
    )
    dataset = Dataset.from_list(make_docs(args.num_images, args.seed), features=features)
    DatasetDict({"test": dataset}).save_to_disk(args.out)  # lmms-eval reads the split by name
    print(f"wrote {len(dataset)} docs to {args.out}")


if __name__ == "__main__":
    main()
