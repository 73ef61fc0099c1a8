"""Throughput and worker memory of micro_sam.distributed on this machine (see benchmarks/README.md).

    python benchmarks/bench_distributed.py throughput --images 8 --workers 1 2
    python benchmarks/bench_distributed.py memory --sizes 4096 16384 --segmenter oracle [--tiled]
    python benchmarks/bench_distributed.py memory --sizes 4096 --segmenter vit_t_demo
    python benchmarks/bench_distributed.py slices --slices 4

throughput: the bundled vit_t_demo (AIS) on 512 x 512 synthetic nuclei images with a LocalCluster of 1 or 2
worker processes (the cores split among them for torch); the model is loaded and warmed up on every worker
before the timed run (one image per worker), so the figure is the steady rate.

memory: blockwise segmentation (blocks 1024 x 1024, halo 64) of a square image that repeats one 1024 x 1024
pattern of blobs, on a fresh LocalCluster of 2 workers per size; reports each worker's peak resident memory
(ru_maxrss) and the wall time per block. ``--segmenter oracle`` uses the exact stand-in model of the tests
(tests/micro_sam_distributed/_oracle.py: milliseconds per block, so a 16384 x 16384 image is feasible on two
cores); ``vit_t_demo`` the bundled model with 512 x 512 tiles (halo 64) inside each block.

slices: seconds per 640 x 640 slice of the per-slice 3D segmentation with vit_t_demo in this process
(1 torch thread), the unit of the volume arithmetic.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def throughput(n_images: int, workers, size: int = 512):
    import tifffile

    from micro_sam.distributed import segment_images
    from micro_sam.distributed._cluster import get_client
    from micro_sam.sample_data import synthetic_nuclei_2d

    with tempfile.TemporaryDirectory() as tmp:
        for folder, count, offset in (("warm", 2, 1000), ("images", n_images, 0)):
            os.makedirs(os.path.join(tmp, folder))
            for i in range(count):
                image, _ = synthetic_nuclei_2d(shape=(size, size), seed=offset + i)
                tifffile.imwrite(os.path.join(tmp, folder, f"{i:03d}.tif"), image)
        rates = {}
        for n_workers in workers:
            with get_client(None, n_workers, verbose=False) as client:
                segment_images(os.path.join(tmp, "warm"), os.path.join(tmp, f"warm{n_workers}"), "vit_t_demo",
                               scheduler=client, verbose=False, device="cpu")
                start = time.perf_counter()
                segment_images(os.path.join(tmp, "images"), os.path.join(tmp, f"out{n_workers}"), "vit_t_demo",
                               scheduler=client, verbose=False, device="cpu")
                seconds = time.perf_counter() - start
            rates[n_workers] = 60.0 * n_images / seconds
            print(f"{n_workers} worker(s): {n_images} images of {size} x {size} in {seconds:.1f} s = "
                  f"{rates[n_workers]:.2f} images/min", flush=True)
        if len(rates) > 1:
            first, last = min(rates), max(rates)
            print(f"ratio {last} / {first} workers: {rates[last] / rates[first]:.2f}")


def _pattern_image(size: int):
    from micro_sam_distributed._oracle import blob_image, random_blobs

    tile, _ = blob_image((1024, 1024), random_blobs((1024, 1024), 300, radius_range=(6, 20), seed=0), seed=0)
    reps = size // 1024
    return np.tile(tile, (reps, reps))


def memory(sizes, segmenter: str, tiled: bool = False):
    import zarr

    from micro_sam.distributed import segment_blockwise
    from micro_sam.distributed._cluster import get_client

    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "image.zarr")
            array = zarr.open_array(path, mode="w", shape=(size, size), chunks=(1024, 1024), dtype="uint8")
            array[...] = _pattern_image(size)
            kwargs = dict(block_shape=(1024, 1024), block_halo=(64, 64), verbose=False)
            if segmenter == "oracle":
                from micro_sam_distributed._oracle import make_oracle

                kwargs.update(segmenter_factory=make_oracle)
                if tiled:  # tiled 2D AIS: decoder maps on the image's tile grid, then the blocks from the maps
                    kwargs.update(tile_shape=(512, 512), halo=(64, 64))
            else:
                kwargs.update(model_type=segmenter, device="cpu", tile_shape=(512, 512), halo=(64, 64))
            with get_client(None, 2, verbose=False) as client:
                before = client.run(_peak_rss_mb)
                start = time.perf_counter()
                labels = segment_blockwise(path, os.path.join(tmp, "labels.zarr"), scheduler=client, **kwargs)
                seconds = time.perf_counter() - start
                peaks = client.run(_peak_rss_mb)
            n_blocks = (size // 1024) ** 2
            n_objects = int(zarr.open_group(os.path.join(tmp, "labels.zarr"), mode="r").attrs[
                "micro_sam_blockwise"]["n_objects"])
            print(f"{segmenter}{' tiled' if 'tile_shape' in kwargs else ''}, {size} x {size} ({n_blocks} blocks, {n_objects} objects, labels {labels.shape}): "
                  f"{seconds:.1f} s = {2 * seconds / n_blocks:.2f} worker-s per block; worker peak RSS "
                  f"{', '.join(f'{v:.0f}' for v in peaks.values())} MB (after start "
                  f"{', '.join(f'{v:.0f}' for v in before.values())} MB); client peak {_peak_rss_mb():.0f} MB",
                  flush=True)


def slices(n_slices: int, size: int = 640):
    import torch

    from micro_sam.automatic_segmentation import automatic_instance_segmentation, get_predictor_and_segmenter
    from micro_sam.sample_data import synthetic_nuclei_3d

    torch.set_num_threads(1)
    volume, _ = synthetic_nuclei_3d(shape=(n_slices, size, size), seed=0)
    predictor, segmenter = get_predictor_and_segmenter("vit_t_demo", device="cpu")
    automatic_instance_segmentation(predictor, segmenter, volume[:1], ndim=3, verbose=False)
    start = time.perf_counter()
    automatic_instance_segmentation(predictor, segmenter, volume, ndim=3, verbose=False)
    seconds = time.perf_counter() - start
    print(f"vit_t_demo, {n_slices} slices of {size} x {size}, 1 thread: {seconds:.1f} s = "
          f"{seconds / n_slices:.2f} s per slice (embedding, AIS, 3D merge)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p = sub.add_parser("memory")
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--segmenter", default="oracle")
    p.add_argument("--tiled", action="store_true", help="oracle: 512 x 512 tiles (halo 64) as with the model.")
    p = sub.add_parser("slices")
    p.add_argument("--slices", type=int, default=4)
    args = parser.parse_args()
    print(f"load: {os.getloadavg()}", flush=True)
    if args.what == "throughput":
        throughput(args.images, args.workers)
    elif args.what == "memory":
        memory(args.sizes, args.segmenter, args.tiled)
    else:
        slices(args.slices)
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
