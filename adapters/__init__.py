"""Adapters for third-party code (solvers, and one operator's model); one module per upstream.

Installed as ``flash_plugin.adapters`` (never as a top-level ``adapters`` module). Each adapter
module implements ``flash_adapt_solver`` (or, for bkse, ``flash_register_operators``) and is listed
in flash-plugin's own ``[project.entry-points.flash_plugin]``; none imports its upstream at plugin
load time:

* `flash_plugin.adapters.compvis`: shared plumbing for the CompVis ``DDIMSampler`` forks (no hooks);
* `flash_plugin.adapters.psld`: LituRout/PSLD (PSLD, GML-DPS, Latent-DPS);
* `flash_plugin.adapters.resample`: soominkwon/resample;
* `flash_plugin.adapters.dps`: DPS2022/diffusion-posterior-sampling (pixel space);
* `flash_plugin.adapters.deepinv`: deepinv's DPS / PosteriorDiffusion and Physics <-> Operator (extra ``[deepinv]``);
* `flash_plugin.adapters.kernel_wizard`: the paper's learned bkse blur as the operator ``"kernel-wizard"``
  (VinAIResearch/blur-kernel-space-exploring; our port of its network in `.kernel_wizard_net`, no hooks).

See ``docs/flash-your-existing-solver.md``.
"""
