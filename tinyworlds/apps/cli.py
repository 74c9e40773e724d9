"""The `tinyworlds` command line.

Each command parses its options and calls one library function; the logic lives in the
library. Errors the user can cause are `TinyWorldsError`s, printed as one `error: ...`
line with exit status 1 and no traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tinyworlds.core.errors import ParameterError, TinyWorldsError

app = typer.Typer(
    help="Train Genie-style world models from gameplay video.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def user_errors(command):
    """Turn a TinyWorldsError into `error: <message>` on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ParameterError as err:
            typer.echo(f"error: {err.as_flags()}", err=True)
            raise typer.Exit(1) from None
        except TinyWorldsError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


WORLD_MODEL_KINDS = ("tokenizer", "lam", "dynamics")  # the folders `WorldModel.load` reads
DEFAULT_MODELS = Path("data/models")


def models_dir(models: Path | None, run: str | None) -> Path:
    """--models, or the models of MLflow run --run fetched from the tracking store, or data/models."""
    if run is None:
        return models or DEFAULT_MODELS
    if models is not None:
        raise ParameterError(("models", "run"), "give one of them: a model directory or an MLflow run")
    from tinyworlds.tracking.models import fetch_run_models

    return fetch_run_models(run, WORLD_MODEL_KINDS, say=lambda line: typer.echo(line, err=True))


def parse_crop(text: str | None) -> tuple[int, int, int, int] | None:
    """`X,Y,W,H` in source pixels -> a tuple, or a one-line error."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        x, y, w, h = (int(p) for p in parts)
    except ValueError:
        raise TinyWorldsError(f"--crop {text!r}: expected X,Y,W,H as four whole numbers of pixels") from None
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise TinyWorldsError(f"--crop {text!r}: X and Y must be >= 0 and W, H > 0")
    return x, y, w, h


def parse_keep_bias(text: str) -> float | str:
    """`auto` or a number -> GenerationSettings.keep_bias, or a one-line error."""
    from tinyworlds.inference.world import check_keep_bias

    try:
        value = text if text == "auto" else float(text)
    except ValueError:
        raise TinyWorldsError(f"--keep-bias {text!r}: expected auto or a number") from None
    check_keep_bias(value, "--keep-bias")  # inf and nan parse as floats
    return value


@app.command()
@user_errors
def record(
    game: Annotated[str, typer.Argument(help="ALE ROM id, e.g. pong, breakout, freeway.")],
    out: Annotated[Path, typer.Option(help="Output mp4; the actions sidecar is written next to it.")],
    frames: Annotated[int, typer.Option(help="Number of frames to record (at the native 60 fps).")] = 3000,
    seed: Annotated[int, typer.Option(help="Seed for the emulator and the policy: same seed, same bytes.")] = 0,
    action_repeat: Annotated[int, typer.Option(help="Frames each chosen action is held for.")] = 4,
    stickiness: Annotated[float, typer.Option(help="Probability of keeping the previous action at each decision.")] = 0.8,
    policy: Annotated[str, typer.Option(help="sticky_random, or balanced: held moves, off the walls, FIRE after a lost life.")] = "balanced",
    record_state: Annotated[bool, typer.Option(help="Also record lives and the player's position (games with a RAM entry).")] = True,
) -> None:
    """Record real Atari gameplay with a random policy to an H.264 mp4 plus a true-actions sidecar."""
    from tinyworlds.data.record import record_gameplay

    result = record_gameplay(
        game, out, frames=frames, seed=seed, action_repeat=action_repeat, stickiness=stickiness, policy=policy,
        record_state=record_state,
    )
    typer.echo(f"wrote {result.video} ({result.frames} frames) and {result.actions}")


@app.command()
@user_errors
def ingest(
    source: Annotated[Path, typer.Argument(help="A video FFmpeg can read, or a TinyWorlds HDF5 file with a `frames` dataset.")],
    out: Annotated[Path, typer.Option(help="Output store: NAME.zarr (default format) or NAME.h5.")],
    size: Annotated[int, typer.Option(help="Output frames are SIZE x SIZE pixels.")] = 64,
    fps: Annotated[float, typer.Option(help="Output frame rate; frames are picked by timestamp.")] = 15.0,
    crop: Annotated[Optional[str], typer.Option(help="X,Y,W,H box in source pixels, applied before resizing.")] = None,
    fit: Annotated[str, typer.Option(help="Non-square sources: crop (centre square), pad (letterbox), or stretch.")] = "crop",
    start: Annotated[Optional[float], typer.Option(help="Start time in seconds.")] = None,
    end: Annotated[Optional[float], typer.Option(help="End time in seconds.")] = None,
    grayscale: Annotated[bool, typer.Option(help="Store one channel instead of RGB.")] = False,
    format: Annotated[Optional[str], typer.Option(help="zarr or hdf5 (default: from the --out suffix).")] = None,
    allow_partial: Annotated[bool, typer.Option(help="Keep the decodable frames of a cut-off video instead of failing.")] = False,
    actions: Annotated[Optional[Path], typer.Option(help="Ground-truth actions sidecar (default: SOURCE's .true_actions.json if present).")] = None,
    drop_idle: Annotated[Optional[int], typer.Option(help="Keep at most this many frames of each run of identical frames.")] = None,
) -> None:
    """Decode a video (streaming) into a uint8 frame store, resampled and resized."""
    from tinyworlds.data.ingest import ingest as ingest_video

    report = ingest_video(
        source,
        out,
        size=size,
        fps=fps,
        crop=parse_crop(crop),
        fit=fit,
        start=start,
        end=end,
        grayscale=grayscale,
        fmt=format,
        allow_partial=allow_partial,
        actions=actions,
        drop_idle=drop_idle,
    )
    typer.echo(report.summary())


@app.command()
@user_errors
def datasets(
    params: Annotated[Path, typer.Option(help="The params file that lists the datasets.")] = Path("params.yaml"),
) -> None:
    """List the configured datasets: frames, size, fps, disk size, ground-truth actions."""
    from tinyworlds.data.catalog import print_datasets

    print_datasets(params)


@app.command()
@user_errors
def runs(
    stage: Annotated[Optional[str], typer.Option(help="Only runs of this stage (e.g. train_dynamics).")] = None,
    limit: Annotated[int, typer.Option(help="How many recent runs to show.")] = 10,
    diff: Annotated[Optional[list[str]], typer.Option(help="Show two runs side by side: --diff RUN --diff RUN.")] = None,
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment (default: from params.yaml).")] = None,
) -> None:
    """Print recent MLflow runs with their key params and final metrics."""
    from tinyworlds.tracking.report import print_runs

    print_runs(stage=stage, limit=limit, diff=diff, experiment=experiment)


@app.command()
@user_errors
def dream(
    dataset: Annotated[Optional[str], typer.Option(help="Start from a clip of data/frames/NAME.zarr (or a store path).")] = None,
    index: Annotated[Optional[int], typer.Option(help="First frame of the dataset clip (default: random).")] = None,
    random: Annotated[bool, typer.Option("--random", help="Start from a random clip (of --dataset, else of any ingested dataset); the default.")] = False,
    video: Annotated[Optional[Path], typer.Option(help="Start from the first frames of this video file.")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Start from one image (PNG, JPEG, ...); resized to the model's size.")] = None,
    frames: Annotated[int, typer.Option(help="Frames to dream after the context.")] = 16,
    actions: Annotated[Optional[str], typer.Option(help="Action ids, e.g. 0,0,2,1, for every rollout; fewer than --frames repeat from the start, more are cut.")] = None,
    random_actions: Annotated[bool, typer.Option("--random-actions", help="Random actions, different per rollout (the default).")] = False,
    replay: Annotated[bool, typer.Option("--replay", help="Replay the real continuation's actions, as the LAM labels them.")] = False,
    batch: Annotated[int, typer.Option(help="Rollouts at once, with seeds SEED, SEED+1, ...")] = 1,
    compare: Annotated[bool, typer.Option("--compare", help="Show the real continuation beside the dream.")] = False,
    context: Annotated[Optional[int], typer.Option(help="Context frames (default: the dynamics model's window - 1).")] = None,
    fps: Annotated[float, typer.Option(help="Rate a --video is sampled at (use the dataset's, params data.fps).")] = 15.0,
    crop: Annotated[Optional[str], typer.Option(help="X,Y,W,H box of a --video in source pixels, as its dataset's crop.")] = None,
    fit: Annotated[str, typer.Option(help="A non-square --video: crop (centre square), pad (letterbox) or stretch.")] = "crop",
    steps: Annotated[int, typer.Option(help="MaskGIT unmasking steps per frame.")] = 8,
    schedule: Annotated[str, typer.Option(help="Unmasking schedule: cosine, exponential or linear.")] = "cosine",
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 1.0,
    redraw: Annotated[bool, typer.Option("--redraw", help="Redraw every patch with the decoder, even those whose token is kept (default: they keep their pixels).")] = False,
    keep_bias: Annotated[str, typer.Option(help="Added to the logit of keeping each patch's token: auto (undo the training's change_weight) or a number (0: as trained).")] = "auto",
    seed: Annotated[Optional[int], typer.Option(help="Seed of the sampling, random actions and random start (default: new).")] = None,
    models: Annotated[Optional[Path], typer.Option(help="Directory with tokenizer/, lam/ and dynamics/ (default data/models).")] = None,
    run: Annotated[Optional[str], typer.Option(help="Use the models of this MLflow run (id or unique prefix), fetched from the tracking store.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    threads: Annotated[str, typer.Option(help="CPU threads: auto (the cores other processes leave idle) or a number.")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: a new data/dreams/<time>-<start>).")] = None,
    scale: Annotated[int, typer.Option(help="Upscale factor of the frames in the videos.")] = 4,
    log: Annotated[bool, typer.Option("--log", help="Log the videos to MLflow (stage dream).")] = False,
) -> None:
    """Dream frames with the trained world model from a dataset clip, a video or an image; write mp4 + gif."""
    from tinyworlds.apps.actions import ActionRequest
    from tinyworlds.apps.dream import DreamOutput
    from tinyworlds.apps.dream import dream as run_dream
    from tinyworlds.apps.start import StartRequest
    from tinyworlds.inference.world import GenerationSettings

    if random and index is not None:
        raise ParameterError(("random", "index"), "give one of them")
    result = run_dream(
        StartRequest(dataset=dataset, index=index, video=video, image=image, context=context, fps=fps,
                     crop=parse_crop(crop), fit=fit),
        ActionRequest(actions=actions, random_actions=random_actions, replay=replay),
        GenerationSettings(steps=steps, schedule=schedule, temperature=temperature, seed=seed,
                           carry_unchanged=not redraw, keep_bias=parse_keep_bias(keep_bias)),
        DreamOutput(out=out, scale=scale, compare=compare, log=log),
        frames=frames, batch=batch, models=models_dir(models, run), device=device, threads=threads,
        say=lambda line: typer.echo(line, err=True),
    )
    typer.echo(result.summary())


@app.command()
@user_errors
def play(
    models: Annotated[Optional[Path], typer.Option(help="Directory with tokenizer/, lam/ and dynamics/ (default data/models).")] = None,
    run: Annotated[Optional[str], typer.Option(help="Play the models of this MLflow run (id or unique prefix), fetched from the tracking store.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Start (and reset) from random clips of this dataset (default: any ingested).")] = None,
    index: Annotated[Optional[int], typer.Option(help="Always start from this frame of --dataset.")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Start (and reset) from this image instead.")] = None,
    keys: Annotated[Optional[str], typer.Option(help="Actions of the arrow/WASD keys, e.g. up=3,down=5,left=1,right=2 (default 0,1,2,3).")] = None,
    port: Annotated[int, typer.Option(help="Port to serve on (0: any free one).")] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback exposes the model to the network.")] = "127.0.0.1",
    context: Annotated[Optional[int], typer.Option(help="Context frames of a start (default: the dynamics model's window - 1).")] = None,
    steps: Annotated[int, typer.Option(help="MaskGIT unmasking steps per frame.")] = 8,
    schedule: Annotated[str, typer.Option(help="Unmasking schedule: cosine, exponential or linear.")] = "cosine",
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 1.0,
    redraw: Annotated[bool, typer.Option("--redraw", help="Redraw every patch with the decoder, even those whose token is kept (default: they keep their pixels).")] = False,
    keep_bias: Annotated[str, typer.Option(help="Added to the logit of keeping each patch's token: auto (undo the training's change_weight) or a number (0: as trained).")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the starts and of the sampling.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    threads: Annotated[str, typer.Option(help="CPU threads: auto (the cores other processes leave idle) or a number.")] = "auto",
) -> None:
    """Play the world model in a local web page: keys or buttons pick the latent action of each next frame."""
    from tinyworlds.apps.play import serve
    from tinyworlds.apps.start import StartRequest
    from tinyworlds.inference.world import GenerationSettings

    serve(
        models=models_dir(models, run), device=device, threads=threads, keys=keys,
        start=StartRequest(dataset=dataset, index=index, image=image, context=context),
        settings=GenerationSettings(steps=steps, schedule=schedule, temperature=temperature, seed=seed,
                                    carry_unchanged=not redraw, keep_bias=parse_keep_bias(keep_bias)),
        host=host, port=port, say=lambda line: typer.echo(line, err=True),
    )


@app.command()
@user_errors
def repro(
    profile: Annotated[str, typer.Option(help="A profile in profiles/ (e.g. large): its params.yaml overrides.")],
    name: Annotated[Optional[str], typer.Option(help="DVC experiment name (default: the profile's, numbered if taken).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the dvc command; run nothing.")] = False,
) -> None:
    """Run the pipeline with a named profile, as one DVC experiment (`dvc exp run -S ...`)."""
    from tinyworlds.core.profiles import run_profile

    status = run_profile(profile, experiment=name, dry_run=dry_run, say=lambda line: typer.echo(line, err=True))
    if status != 0:
        raise typer.Exit(status)


@app.command()
@user_errors
def results(
    metrics: Annotated[Path, typer.Option(help="The evaluate stage's metrics JSON.")] = Path("data/metrics/evaluate.json"),
) -> None:
    """The world model's goals, met or not, per dataset, as a markdown table (from stage evaluate)."""
    from tinyworlds.evaluation.goals import goals_table, load_results

    typer.echo(goals_table(load_results(metrics)))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
