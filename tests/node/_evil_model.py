"""A "custom model" a hostile coordinator names: importing it is the attack (it flags itself)."""

import os

os.environ["FEDCOLLAB_EVIL_MODEL_IMPORTED"] = "1"


class Evil:  # pragma: no cover - must never be built
    def __init__(self, n_features: int, **options: object) -> None:
        os.environ["FEDCOLLAB_EVIL_MODEL_BUILT"] = "1"
