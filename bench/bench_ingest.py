"""Benchmark video ingest against plain PyAV decoding, its peak memory, and store codecs.

    python bench/bench_ingest.py [--video CLIP.mp4] [--frames 6000] [--reps 5]

Without --video it renders real Atari frames (ale_py, Breakout, 160x210 at 60 fps, sticky
random policy) to an H.264 mp4 (libx264 defaults). The 4x longer video is the same clip
remuxed four times end to end (no re-encode), so both have identical content per frame.

Prints, as medians of --reps runs: plain decode frames/s (one decoder thread, as ingest
uses for frames this small, and FFmpeg's default threading for comparison), decode + shape
(crop, area resize to 64x64 RGB) of every frame, full ingest at 15 fps (the default) and at
the source rate; the ingest/plain ratio; peak RSS of an ingest subprocess for the short and
the long video (it should not grow); and the compression comparison behind the store codec
choice. Writes everything to bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "ingest.json"


def render_atari_clip(path: Path, frames: int, game: str = "breakout", seed: int = 0) -> None:
    """Real Atari frames from a sticky random policy, encoded with libx264 at 60 fps."""
    import ale_py
    from ale_py import roms

    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    ale = ale_py.ALEInterface()
    ale.setInt("random_seed", seed)
    ale.loadROM(roms.get_rom_path(game))
    actions = ale.getMinimalActionSet()
    rng = np.random.default_rng(seed)
    action = actions[0]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=60)
        stream.width, stream.height, stream.pix_fmt = 160, 210, "yuv420p"
        for i in range(frames):
            if i % 4 == 0 and rng.random() > 0.8:
                action = actions[rng.integers(len(actions))]
            ale.act(action)
            if ale.game_over():
                ale.reset_game()
            frame = av.VideoFrame.from_ndarray(ale.getScreenRGB(), format="rgb24")  # [210, 160, 3]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def remux_repeated(src: Path, dst: Path, times: int) -> None:
    """`src` played `times` times in a row, by copying packets with shifted timestamps."""
    with av.open(str(src)) as inp:
        length = inp.streams.video[0].duration
    with av.open(str(dst), "w") as out:
        for k in range(times):
            with av.open(str(src)) as inp:
                in_stream = inp.streams.video[0]
                if k == 0:
                    out_stream = out.add_stream_from_template(in_stream)
                for packet in inp.demux(in_stream):
                    if packet.dts is None:
                        continue
                    packet.pts += k * length
                    packet.dts += k * length
                    packet.stream = out_stream
                    out.mux(packet)


def median_rate(fn, frames: int, reps: int) -> float:
    """Median frames/s of `fn()` over `reps` runs."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return frames / statistics.median(times)


def plain_decode(video: Path, threads: int | None) -> int:
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        if threads is not None:
            stream.codec_context.thread_count = threads
        return sum(1 for _ in container.decode(stream))


def decode_and_shape(video: Path) -> int:
    from tinyworlds.data.video import FrameShaper, plan_geometry

    n = 0
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        geometry = plan_geometry(stream.width, stream.height, 64, None, "crop")
        shaper = FrameShaper((stream.width, stream.height), geometry, False)
        for frame in container.decode(stream):
            shaper(frame)  # [64, 64, 3]
            n += 1
    return n


def peak_memory(video: Path, out: Path) -> dict:
    """Memory of a fresh process that ingests `video`: RSS before, peak RSS during, Python peak.

    The kernel's peak-RSS mark is reset after the imports (/proc/self/clear_refs), so the peak
    is that of the ingest itself, not of loading the libraries.
    """
    code = (
        "import sys, tracemalloc\n"
        "from tinyworlds.data.ingest import ingest\n"
        "def status(key):\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith(key))\n"
        "    return int(line.split()[1]) / 1024\n"
        "before = status('VmRSS:')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "tracemalloc.start()\n"
        "ingest(sys.argv[1], sys.argv[2], progress=False)\n"
        "print(before, status('VmHWM:'), tracemalloc.get_traced_memory()[1] / 2**20)\n"
    )
    command = [sys.executable, "-c", code, str(video), str(out)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    before, peak, traced = map(float, done.stdout.split())
    return {"rss_after_imports_mib": before, "peak_rss_during_ingest_mib": peak, "python_alloc_peak_mib": traced}


def codec_comparison(frames: np.ndarray, workdir: Path, reps: int) -> list[dict]:
    """Ratio, write and read speed of candidate codecs on real 64x64 frames [N, H, W, C]."""
    import h5py
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    rng = np.random.default_rng(0)
    window = 16
    starts = rng.integers(0, len(frames) - window, 200)
    shape = frames.shape[1:]
    candidates = [
        ("zarr", "none", None, 128),
        ("zarr", "ZstdCodec(level=1)", ZstdCodec(level=1), 128),
        ("zarr", "ZstdCodec(level=3)", ZstdCodec(level=3), 64),
        ("zarr", "ZstdCodec(level=3)", ZstdCodec(level=3), 128),
        ("zarr", "ZstdCodec(level=3)", ZstdCodec(level=3), 256),
        ("zarr", "ZstdCodec(level=5)", ZstdCodec(level=5), 128),
        ("zarr", "Blosc(zstd, 3, shuffle)", BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=1), 128),
        ("zarr", "Blosc(lz4, 5, shuffle)", BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=1), 128),
        ("zarr", "Blosc(zstd, 3, bitshuffle)",
         BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=1), 128),
        ("hdf5", "gzip 1", {"compression": "gzip", "compression_opts": 1}, 64),
        ("hdf5", "gzip 4", {"compression": "gzip", "compression_opts": 4}, 64),
        ("hdf5", "gzip 4", {"compression": "gzip", "compression_opts": 4}, 128),
        ("hdf5", "lzf", {"compression": "lzf"}, 64),
    ]
    rows = []
    for fmt, name, codec, chunk in candidates:
        chunk = min(chunk, len(frames))  # a chunk no longer than a short clip (HDF5 refuses it)
        path = workdir / f"codec.{fmt}"
        shutil.rmtree(path, ignore_errors=True)
        path.unlink(missing_ok=True)
        t = time.perf_counter()
        if fmt == "zarr":
            group = zarr.open_group(path, mode="w")
            array = group.create_array("frames", shape=frames.shape, chunks=(chunk, *shape), dtype="uint8",
                                       compressors=codec, config={"write_empty_chunks": True})
            array[:] = frames
            disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            reader = zarr.open_array(path / "frames", mode="r")
        else:
            with h5py.File(path, "w") as f:
                f.create_dataset("frames", data=frames, chunks=(chunk, *shape), **codec)
            disk = path.stat().st_size
            handle = h5py.File(path, "r")
            reader = handle["frames"]
        write_s = time.perf_counter() - t
        seq = median_rate(lambda: reader[:], frames.nbytes, reps)
        rand = median_rate(lambda: [reader[s : s + window] for s in starts], len(starts) * window, reps)
        if fmt == "hdf5":
            handle.close()
        rows.append({"format": fmt, "codec": name, "chunk_frames": chunk, "ratio": frames.nbytes / disk,
                     "write_mb_s": frames.nbytes / write_s / 1e6, "seq_read_mb_s": seq / 1e6,
                     "random_16_frame_reads_frames_s": rand})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--video", type=Path, help="an existing clip (default: render Atari frames)")
    parser.add_argument("--frames", type=int, default=6000, help="frames to render when no --video")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from tinyworlds.data.ingest import ingest
    from tinyworlds.data.stores import open_frame_store
    from tinyworlds.data.video import probe_video

    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        work = Path(tmp)
        short = args.video or work / "atari.mp4"
        if args.video is None:
            print(f"rendering {args.frames} Breakout frames ...", flush=True)
            render_atari_clip(short, args.frames)
        long = work / "atari_x4.mp4"
        remux_repeated(short, long, 4)
        info = probe_video(short)
        n = plain_decode(short, 1)
        print(f"clip: {short.name} {info.width}x{info.height} {info.codec} {info.fps:g} fps, {n} frames")

        store = work / "out.zarr"
        rates = {
            "plain_decode_1_thread": median_rate(lambda: plain_decode(short, 1), n, args.reps),
            "plain_decode_default_threads": median_rate(lambda: plain_decode(short, None), n, args.reps),
            "decode_and_shape_every_frame": median_rate(lambda: decode_and_shape(short), n, args.reps),
            "ingest_15fps": median_rate(lambda: ingest(short, store, progress=False), n, args.reps),
            "ingest_source_fps": median_rate(lambda: ingest(short, store, fps=info.fps, progress=False), n, args.reps),
            "plain_decode_1_thread_x4_video": median_rate(lambda: plain_decode(long, 1), 4 * n, args.reps),
            "ingest_15fps_x4_video": median_rate(lambda: ingest(long, store, progress=False), 4 * n, args.reps),
        }
        ratios = {
            "plain_over_ingest_15fps": rates["plain_decode_1_thread"] / rates["ingest_15fps"],
            "plain_over_ingest_15fps_x4_video": rates["plain_decode_1_thread_x4_video"] / rates["ingest_15fps_x4_video"],
            "plain_over_ingest_source_fps": rates["plain_decode_1_thread"] / rates["ingest_source_fps"],
        }
        print(f"\n{'source frames/s (median of %d)' % args.reps:44s}")
        for key, value in rates.items():
            print(f"  {key:42s} {value:10,.0f}")
        for key, value in ratios.items():
            print(f"  {key:42s} {value:10.2f}x")

        memory = {"short": peak_memory(short, work / "mem.zarr"), "long_x4": peak_memory(long, work / "mem.zarr")}
        print(f"\n{'memory of one ingest process':44s} {'short':>10s} {'4x long':>10s}")
        for key in memory["short"]:
            print(f"  {key:42s} {memory['short'][key]:6.1f} MiB {memory['long_x4'][key]:6.1f} MiB")

        ingest(long, store, progress=False)
        with open_frame_store(store) as frames_store:
            frames = frames_store.frames[: min(len(frames_store), 2000)]  # [N, 64, 64, 3]
        codecs = codec_comparison(frames, work, args.reps)
        print(f"\nstore codecs on {len(frames)} ingested 64x64 RGB frames ({frames.nbytes / 1e6:.1f} MB raw)")
        print(f"  {'format':6s} {'codec':28s} {'chunk':>5s} {'ratio':>7s} {'write MB/s':>10s} "
              f"{'seq read MB/s':>13s} {'rand16 frames/s':>15s}")
        for row in codecs:
            print(f"  {row['format']:6s} {row['codec']:28s} {row['chunk_frames']:5d} {row['ratio']:7.1f} "
                  f"{row['write_mb_s']:10.0f} {row['seq_read_mb_s']:13.0f} "
                  f"{row['random_16_frame_reads_frames_s']:15,.0f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "clip": {"source": str(args.video or "rendered breakout"), "frames": n, "width": info.width,
                 "height": info.height, "codec": info.codec, "fps": info.fps},
        "reps": args.reps, "cpu_count": os.cpu_count(), "pyav": av.__version__,
        "source_frames_per_s": rates, "ratios": ratios, "memory": memory, "codecs": codecs,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
