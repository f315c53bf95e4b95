"""Seeded synthetic scenes with exact answers: coloured shapes in the four quadrants, and text.

A scene holds one to three shapes, each in its own quadrant (left/right x top/bottom), or one
rendered text: a large digit or a short word. Everything a question can ask (existence, colour,
count, position, the text, a caption) is read off the scene, never off the pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SHORT_WORDS = ("cat", "dog", "sun", "box", "car", "hat")


@dataclass(frozen=True)
class Item:
    colour: str
    shape: str
    quadrant: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    items: tuple[Item, ...] = ()
    text: str | None = None  # a digit or one of SHORT_WORDS

    def has(self, colour: str | None = None, shape: str | None = None) -> bool:
        return any((colour in (None, i.colour)) and (shape in (None, i.shape)) for i in self.items)

    def caption(self) -> str:
        if self.text is not None:
            kind = f"number {NUMBER_WORDS[int(self.text)]}" if self.text.isdigit() else f"word {self.text}"
            return f"the {kind} written in black ."
        names = [f"a {item.name} at the {item.quadrant}" for item in self.items]
        return (" and ".join(names) if len(names) < 3 else f"{names[0]} , {names[1]} and {names[2]}") + " ."


def random_scene(rng: random.Random, with_text: bool = False) -> Scene:
    if with_text:
        return Scene(text=str(rng.randrange(10)) if rng.random() < 0.5 else rng.choice(SHORT_WORDS))
    quadrants = rng.sample(QUADRANTS, rng.randint(1, 3))
    return Scene(items=tuple(Item(rng.choice(list(COLOURS)), rng.choice(SHAPES), q) for q in quadrants))


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """The scene as a 64x64 RGB picture, with a little jitter in place and size."""
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if scene.text is not None and scene.text.isdigit():
        font = ImageFont.load_default(size=rng.randint(36, 44))
        draw.text((rng.randint(14, 24), rng.randint(2, 10)), scene.text, fill=(0, 0, 0), font=font)
    elif scene.text is not None:
        font = ImageFont.load_default(size=rng.randint(18, 22))
        draw.text((rng.randint(2, 14), rng.randint(8, 28)), scene.text, fill=(0, 0, 0), font=font)
    half = SIZE // 2
    for item in scene.items:
        x0 = (half if "right" in item.quadrant else 0) + rng.randint(2, 6)
        y0 = (half if "bottom" in item.quadrant else 0) + rng.randint(2, 6)
        side = rng.randint(20, 24)
        box = [x0, y0, x0 + side, y0 + side]
        colour = COLOURS[item.colour]
        if item.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif item.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=colour)
    return image
