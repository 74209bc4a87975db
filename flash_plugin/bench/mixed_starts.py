"""Throughput of mixed-start batches: one batch vs groups of equal start step vs the ideal bound.

    python -m flash_plugin.bench.mixed_starts --batch 32 --steps 100 --repeats 3

On the bundled model, ``B`` samples with start steps drawn uniformly from ``1..N`` are solved
(plain sampler, the denoiser being the cost) three ways in one run:

* ``mixed``: one solve of the whole batch; the loop starts at ``max k`` and a sample joins when the
  loop reaches its step, so each call evaluates the active samples only;
* ``grouped``: one solve per distinct start step (what `FlashSolver` does for solvers without the
  mixed-start capability);
* ``ideal``: ``Σ k_i`` evaluations at the per-sample cost of one full-batch UNet call, i.e. no
  overhead and every call as efficient as a full batch.

Prints denoiser evaluations per second for each and their ratios (median of ``--repeats`` runs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def run(batch: int, steps: int, repeats: int, seed: int, device: str) -> dict[str, float]:
    from flash_plugin.models import load_default_model
    from flash_plugin.solvers import Sampler
    from flash_plugin.types import StartPoint

    model = load_default_model(device=device).latent_diffusion
    solver = Sampler(model, num_steps=steps, eta=0.0)
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(1, steps + 1, (batch,), generator=g)
    z = torch.randn((batch, *model.latent_shape), generator=g).to(device)
    y = torch.zeros((batch, *model.image_shape), device=device)
    evals = int(k.sum())

    def mixed() -> None:
        solver.solve(y, None, start=StartPoint(k.to(device), z))

    def grouped() -> None:
        for step in torch.unique(k).tolist():
            idx = (k == step).nonzero().flatten()
            solver.solve(y[idx.to(device)], None, start=StartPoint(k[idx].to(device), z[idx.to(device)]))

    def full_batch_call() -> None:
        with torch.no_grad():
            model.eps(z, torch.full((batch,), int(solver.schedule.timesteps[steps // 2]), device=device))

    def timed(fn, n: int) -> float:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    mixed()  # warm-up
    t_call = timed(full_batch_call, 5 * repeats)
    t_mixed, t_grouped = timed(mixed, repeats), timed(grouped, repeats)
    t_ideal = evals * t_call / batch
    return {
        "batch": batch, "steps": steps, "evaluations": evals, "distinct_starts": int(torch.unique(k).numel()),
        "mixed_evals_per_s": evals / t_mixed, "grouped_evals_per_s": evals / t_grouped, "ideal_evals_per_s": evals / t_ideal,
        "mixed_s": t_mixed, "grouped_s": t_grouped, "ideal_s": t_ideal,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flash_plugin.bench.mixed_starts", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="samples in the batch (>= 1)")
    parser.add_argument("--steps", type=int, default=100, help="N, the sampler's number of steps (1..1000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per way (median)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the start steps and latents")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.batch < 1 or not 1 <= args.steps <= 1000 or args.repeats < 1:
        parser.error("--batch >= 1, --steps in 1..1000 and --repeats >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available in this torch build")
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args.batch, args.steps, args.repeats, args.seed, args.device)
    print(f"{r['batch']} samples, N = {r['steps']}, {r['distinct_starts']} distinct start steps, {r['evaluations']} evaluations "
          f"(device {args.device}, {torch.get_num_threads()} threads)")
    print("| way | wall s | evaluations / s | vs ideal |\n|---|---|---|---|")
    for way in ("mixed", "grouped", "ideal"):
        print(f"| {way} | {r[way + '_s']:.2f} | {r[way + '_evals_per_s']:.0f} | {r[way + '_evals_per_s'] / r['ideal_evals_per_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
