"""Peak memory of preparing one huge training image (10000 x 10000 px by default), JPEG and PNG, for a 512 px run:
decoded at full size then resized, vs reduced while decoding (`load_rgb(min_side=...)`, what PersonalizedBase
does). Each measurement is a fresh child process (its peak RSS, from getrusage), alternated in one run; the images
are written by another child, since Linux carries a parent's resident size into the peak of the children it starts.

    python scripts/benchmark_image_memory.py [--side 10000] [--size 512]
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = """
import resource, sys, warnings
warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning above 89 Mpx
sys.path.insert(0, {root!r})
from ldm.data.image_ops import load_rgb, resize
image = load_rgb({path!r}, min_side={min_side})
resize(image.crop((0, 0, min(image.size), min(image.size))), {size})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_image(path, side):
    """A smooth RGB gradient (compresses well, so the file stays small; the decoded image is side^2 * 3 bytes)."""
    ramp = np.linspace(0, 255, side, dtype=np.float32).astype(np.uint8)
    rows = np.empty((side, side, 3), dtype=np.uint8)
    rows[..., 0] = ramp[None, :]
    rows[..., 1] = ramp[:, None]
    rows[..., 2] = 128
    Image.fromarray(rows).save(path)


def peak_mib(path, min_side, size):
    code = CHILD.format(root=ROOT, path=path, min_side=min_side, size=size)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    kib = int(out.split()[-1])
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=10000, help="side of the square test image, px")
    p.add_argument("--size", type=int, default=512, help="training size the image is prepared for, px")
    p.add_argument("--write", help=argparse.SUPPRESS)  # child: write the test image to this path
    args = p.parse_args(argv)
    if args.write:
        return write_image(args.write, args.side)
    with tempfile.TemporaryDirectory() as tmp:
        for ext in ("jpg", "png"):
            path = os.path.join(tmp, f"huge.{ext}")
            subprocess.run([sys.executable, __file__, "--write", path, "--side", str(args.side)], check=True)
            full = peak_mib(path, None, args.size)
            reduced = peak_mib(path, args.size, args.size)
            print(f"{args.side}x{args.side} {ext.upper()} -> {args.size} px: peak RSS {full:.0f} MiB decoded at full "
                  f"size, {reduced:.0f} MiB reduced while decoding ({full / reduced:.1f}x less)")


if __name__ == "__main__":
    main()
