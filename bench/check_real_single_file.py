"""By hand (minutes, ~7 GB of memory on CPU for SD 1.x): a real-size single-file checkpoint (zeros, written as a
sparse file) published through `warmfleet publish` with no --config (which converts it into a diffusers folder with
diffusers' `from_single_file` + `save_pretrained`), synced to L2 and loaded the way a worker does (`from_pretrained`
of that folder, offline), then one 64×64 step run.

    HF_HUB_OFFLINE=1 python -m bench.check_real_single_file [sd|sd2|sdxl] [--dtype float16]

The test suite checks the same files at publish (tests/test_standard_configs.py); this adds the worker's load."""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", nargs="?", default="sd", choices=("sd", "sd2", "sdxl"))
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    import torch
    from click.testing import CliRunner

    from cachemgr import Cache, LocalArchive
    from cachemgr.names import ComponentRef
    from cachemgr.sync import sync_ref
    from fleetctl.cli import main as cli
    from fleetctl.demo import formats
    from workers.models import standard
    from workers.models.base import load_folder
    from workers.models.single_file import pipeline_class

    with tempfile.TemporaryDirectory(prefix="warmfleet-real-") as tmp:
        work = Path(tmp)
        ckpt = formats.save_sparse_checkpoint(formats.original_shapes(standard.CONFIGS / args.family),
                                              work / f"{args.family}.safetensors")
        started = time.monotonic()
        done = CliRunner().invoke(cli, ["publish", "real", "base", "v1", str(ckpt)],
                                  env={"FLEET_HOME": str(work / "home"), "FLEET_BROKER_URL": "redis://127.0.0.1:1/0"})
        print(done.output.strip().splitlines()[-1], f"({time.monotonic() - started:.1f} s)")
        assert done.exit_code == 0, done.output
        ref = ComponentRef("real", "base", "v1")
        store = Cache.at(work / "l2").store
        sync_ref(LocalArchive(work / "home" / "archive"), store, ref)
        root = store.path(ref)
        print(f"converted from {store.manifest(ref).meta['converted_from']['file']}")
        started = time.monotonic()
        pipe = load_folder(pipeline_class(root), root, getattr(torch, args.dtype), None)
        print(f"loaded {type(pipe).__name__} with {type(pipe.scheduler).__name__} offline in "
              f"{time.monotonic() - started:.1f} s")
        image = pipe("a leather jacket", num_inference_steps=1, width=64, height=64).images[0]
        print(f"image {image.size}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10} MiB")


if __name__ == "__main__":
    main()
