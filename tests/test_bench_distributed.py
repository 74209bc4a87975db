"""The benchmark over several processes (torchrun, gloo on CPU) and its resume from finished batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from flash_plugin.bench.distributed import Shard

ARGS = ["bench", "--task", "gblur-varying", "--solver", "latent-dps", "--n-images", "4", "--batch-size", "1",
        "--num-steps", "6", "--threads", "1", "--no-progress"]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLASH_PLUGIN_DISABLE_EXTERNAL": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def _bench(out, *extra, nproc=None):
    if nproc is None:
        cmd = [sys.executable, "-m", "flash_plugin.cli", *ARGS, "--out", str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "flash_plugin.cli", *ARGS, "--out", str(out), *extra]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "bench_gblur-varying_latent-dps.json").read_text()), done


def test_rounds_deal_every_item_once_and_keep_processes_in_step():
    items = list(range(5))
    dealt = [list(Shard(rank, 2).rounds(items)) for rank in range(2)]
    assert dealt == [[0, 2, 4], [1, 3, None]]
    assert sorted(i for d in dealt for i in d if i is not None) == items


def test_two_processes_equal_one_image_for_image_and_a_run_resumes(tmp_path):
    one, _ = _bench(tmp_path / "one")
    two, done = _bench(tmp_path / "two", nproc=2)
    assert one["processes"] == 1 and two["processes"] == 2
    assert two["per_image"] == one["per_image"]
    assert two["start_steps"] == one["start_steps"] and two["sigma2"] == one["sigma2"]
    assert two["methods"]["flash"]["fd_fmnist"] == one["methods"]["flash"]["fd_fmnist"]
    assert done.stdout.count("wrote ") == 1  # one report, from the first process
    # A stopped run: keep two of the four finished batches; the rerun solves only the others.
    parts = tmp_path / "one" / ".parts" / "gblur-varying_latent-dps"
    for f in sorted(parts.glob("batch_*.safetensors"))[2:]:
        f.unlink()
    again, done = _bench(tmp_path / "one")
    assert "2 of 4 batches done already" in done.stderr
    assert again["per_image"] == one["per_image"]
    # A run with other settings in the same place starts over: nothing of the old batches is mixed in.
    other, done = _bench(tmp_path / "one", "--seed", "3")
    assert "batches done already" not in done.stderr and other["seed"] == 3
    assert other["per_image"] != one["per_image"]


def test_reconstruct_on_two_processes_writes_what_one_writes(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / f"img{i}.png")
    args = ["reconstruct", str(folder), "--batch-size", "1", "--num-steps", "6", "--threads", "1", "--no-progress"]
    outs = {}
    for nproc in (None, 2):
        out = tmp_path / f"out{nproc}"
        head = [sys.executable] if nproc is None else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       f"--nproc_per_node={nproc}"]
        done = subprocess.run([*head, "-m", "flash_plugin.cli", *args, "--out", str(out)], env=_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("wrote ") == 1
        outs[nproc] = json.loads((out / "results.json").read_text())["images"]
    strip = lambda recs: {n: {k: v for k, v in r.items() if k != "wall_s"} for n, r in recs.items()}  # noqa: E731
    assert strip(outs[2]) == strip(outs[None]) and len(outs[2]) == 3
