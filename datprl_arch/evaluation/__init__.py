"""Evaluation against the degraded input: ``metrics`` (per-image PSNR/SSIM through BasicSR's functions, native
16-bit or 8-bit), ``aggregate`` (per set, task, domain, overall; spread and t intervals), ``report`` (md/csv/json),
``samples`` (the picture) and ``runner.run_benchmark`` (``python -m datprl_arch.benchmark``).

The model's validation imports ``metrics``; nothing here is imported eagerly, so importing this package stays
free of the model registry."""
