"""`tinyworlds datasets`: what is configured in params.yaml and what is on disk."""

from __future__ import annotations

from pathlib import Path

from tinyworlds.core.params import Layout, load_params, section


def dataset_rows(params_path: Path) -> list[dict]:
    """One row per configured dataset; stores not yet ingested say so instead of failing."""
    from tinyworlds.data.stores import open_frame_store

    params = load_params(params_path)
    layout = Layout(params_path.parent)
    train_on = set(params.get("data", {}).get("train_on", []))
    rows = []
    for name, spec in section(params, "datasets").items():
        row = {"name": name, "source": spec.get("source", "?"), "train": name in train_on, "store": layout.frames(name)}
        if row["store"].exists():
            with open_frame_store(row["store"]) as store:
                row.update(
                    frames=len(store),
                    size=f"{store.size}x{store.size}x{store.channels}",
                    fps=store.fps,
                    disk_mb=store.disk_bytes() / 1e6,
                    actions=store.true_actions is not None,
                )
        rows.append(row)
    return rows


def print_datasets(params_path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"datasets in {params_path}")
    for column in ("name", "source", "train_on", "frames", "size", "fps", "disk", "true actions"):
        table.add_column(column)
    for row in dataset_rows(params_path):
        if "frames" in row:
            cells = [str(row["frames"]), row["size"], f"{row['fps']:g}", f"{row['disk_mb']:.1f} MB", "yes" if row["actions"] else "no"]
        else:
            cells = ["not ingested (run dvc repro)", "", "", "", ""]
        table.add_row(row["name"], str(row["source"]), "yes" if row["train"] else "no", *cells)
    Console().print(table)
