"""Optional integrations. Nothing here is imported by ``import branchify``.

* :mod:`branchify.integrations.hf` - Hugging Face: the coarse fx tracer, a Trainer-ready wrapper,
  callback and ``save_pretrained`` export (a package; ``hf.plugin`` is its entry point).
* :mod:`branchify.integrations.lightning` - PyTorch Lightning callback (schedules, logged loss
  parts, resumable loss state, target export) and an optional ``LightningModule``.
"""
