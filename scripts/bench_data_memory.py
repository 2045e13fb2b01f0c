"""Peak memory of training on an image folder of N images, for several N: it must not grow with N.

For each N in ``--sizes`` the script writes N JPEG images of ``--image-size`` px (10 classes, smooth random
pictures) under ``--work-dir``, then, in a fresh Python process per N, loads the folder as a task
(``imagefolder:<dir>``: the lazy ``hf:`` path, every image decoded once by the bad-example check), prepares
it for a small ViT at that size with ``crop_flip`` augmentation and trains ``--steps`` optimizer steps.
The child reports its peak resident set size (``ru_maxrss``) after loading and after training, and the
seconds each took. The images are deleted afterwards unless ``--keep``.

    nice -n 10 python scripts/bench_data_memory.py --sizes 2000 20000 --work-dir /work/runs/data/bench_memory

For comparison, the in-memory path that ``hf:`` / ``imagefolder:`` tasks used before decoded every split
into one float32 tensor: N x 3 x S x S x 4 bytes (printed as "eager tensor").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time
import torch
torch.set_num_threads(1)
from topotransfer.data import load_task
from topotransfer.models.hf import ImageNormalization
from topotransfer.preprocess import prepare_task
from topotransfer.training.loop import make_loader, train_epoch
from transformers import ViTConfig, ViTForImageClassification

folder, size, steps, batch, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
task = load_task(f"imagefolder:{folder}", num_val=64, num_test=64, image_size=size, num_workers=workers,
                 cache_dir=os.path.join(folder, "..", "cache"))
t_load = time.perf_counter() - t0
after_load = peak_mb()
norm = ImageNormalization((0.5,) * 3, (0.5,) * 3)
task = prepare_task(task, size, 3, norm, augment="crop_flip")
config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                   image_size=size, patch_size=16, num_channels=3, num_labels=task.num_outputs)
model = ViTForImageClassification(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
t0 = time.perf_counter()
loss, done = train_epoch(model, make_loader(task.train, batch, shuffle=True, seed=0), optimizer,
                         torch.nn.CrossEntropyLoss(), max_steps=steps)
t_train = time.perf_counter() - t0
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"n_train": len(task.train), "load_s": t_load, "train_s": t_train, "steps": done,
                  "peak_rss_after_load_mb": after_load, "peak_rss_mb": peak_mb(), "peak_rss_children_mb": children,
                  "cpu_s": time.process_time()}))
"""


def make_folder(root: Path, n: int, size: int, classes: int = 10, seed: int = 0) -> float:
    """N smooth random RGB JPEGs in ``root/<class>/``; returns the seconds it took."""
    import numpy as np
    from PIL import Image

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # upsampled: compresses like a photo, not noise
        image = Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)
        image.save(root / f"class_{i % classes}" / f"{i:06d}.jpg", quality=85)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000], help="numbers of images")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps trained per size")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=0, help="data.num_workers of the run")
    ap.add_argument("--work-dir", default="/tmp/topotransfer_bench_memory", help="where the images go (deleted)")
    ap.add_argument("--keep", action="store_true", help="keep the generated images")
    args = ap.parse_args()

    work = Path(args.work_dir)
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    try:
        for n in args.sizes:
            folder = work / f"images_{n}"
            gen_s = make_folder(folder, n, args.image_size)
            disk_mb = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / 2**20
            out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(args.image_size), str(args.steps),
                                  str(args.batch_size), str(args.num_workers)],
                                 env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"child for N={n} failed:\n{out.stderr[-3000:]}")
            row = {"n_images": n, "disk_mb": disk_mb, "generate_s": gen_s,
                   "eager_tensor_mb": n * 3 * args.image_size**2 * 4 / 2**20,
                   **json.loads(out.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:
                shutil.rmtree(folder)
    finally:
        if not args.keep and work.exists():
            shutil.rmtree(work)
    print()
    print("| images | on disk | train split | load + check (s) | 5 steps (s) | peak RSS after load | peak RSS | "
          "eager float32 tensor |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n_images']:,} | {r['disk_mb']:.0f} MB | {r['n_train']:,} | {r['load_s']:.1f} | {r['train_s']:.1f} "
              f"| {r['peak_rss_after_load_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB | {r['eager_tensor_mb']:,.0f} MB |")


if __name__ == "__main__":
    main()
