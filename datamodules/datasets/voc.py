"""Reader for the Pascal VOC directory layout (also used by the embedded synthetic dataset).

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClass/<id>.png        palette PNG of class ids, 255 = void
    <root>/SegmentationClassAug/<id>.png     SBD-augmented masks (real VOC train_aug)
    <root>/ImageSets/Segmentation/<split>.txt

A list file has one image id per line, or two root-relative paths per line
("/JPEGImages/x.jpg /SegmentationClassAug/x.png", the DeepLab/SBD convention).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# The VOC colour palette (the standard bit-interleaving construction), index 255 = void (cream).
def voc_palette() -> list[int]:
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    palette[255 * 3: 256 * 3] = [224, 224, 192]
    return palette


@dataclass(frozen=True)
class SplitFiles:
    """The image and mask files of one split, in list-file order."""
    ids: list[str]
    images: list[Path]
    masks: list[Path]

    def __len__(self) -> int:
        return len(self.ids)


def read_split(root: Path, list_file: str, mask_dir: str = "SegmentationClass") -> SplitFiles:
    """Read `<root>/ImageSets/Segmentation/<list_file>` into image and mask paths."""
    root = Path(root)
    list_path = root / "ImageSets" / "Segmentation" / list_file
    if not list_path.is_file():
        raise FileNotFoundError(f"list file {list_path} is missing")
    ids, images, masks = [], [], []
    for number, line in enumerate(list_path.read_text().splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) == 2:
            image, mask = (root / t.lstrip("/") for t in tokens)
            ids.append(image.stem)
        elif len(tokens) == 1:
            ids.append(tokens[0])
            image, mask = root / "JPEGImages" / f"{tokens[0]}.jpg", root / mask_dir / f"{tokens[0]}.png"
        else:
            raise ValueError(f"{list_path}:{number}: expected an id or two paths, got {line!r}")
        images.append(image)
        masks.append(mask)
    return SplitFiles(ids, images, masks)


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def load_mask(path: Path) -> np.ndarray:
    """Class ids uint8 (H, W) from a palette (or greyscale) PNG."""
    with Image.open(path) as mask:
        if mask.mode not in ("P", "L"):
            raise ValueError(f"{path}: a mask must be a palette or greyscale PNG, not mode {mask.mode}")
        return np.asarray(mask, dtype=np.uint8)


def save_mask(path: Path, mask: np.ndarray) -> None:
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    image.save(path)
