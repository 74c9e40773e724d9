"""DVC stage `ingest@NAME`: decode params `datasets.NAME.source` into data/frames/NAME.zarr."""

import sys

from tinyworlds.core.params import Layout, load_params, section
from tinyworlds.core.stage import run_stage
from tinyworlds.data.ingest import ingest


def main(name: str) -> None:
    params = load_params()
    spec = section(params, "datasets", name)
    crop = spec.get("crop")
    report = ingest(
        spec["source"],
        Layout().frames(name),
        size=section(params, "data", "size"),
        fps=section(params, "data", "fps"),
        crop=tuple(crop) if crop else None,
        fit=spec.get("fit", "crop"),
        start=spec.get("start"),
        end=spec.get("end"),
        grayscale=spec.get("grayscale", False),
        allow_partial=spec.get("allow_partial", False),
        drop_idle=spec.get("drop_idle"),
        progress=False,
    )
    print(f"ingest@{name}: {report.summary()}")


if __name__ == "__main__":
    run_stage(lambda: main(sys.argv[1]))
