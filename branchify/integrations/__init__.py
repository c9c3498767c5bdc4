"""Optional integrations. Nothing here is imported by ``import branchify``.

* :mod:`branchify.integrations.hf_tracer` - the coarse fx tracer for Hugging Face models.
* :mod:`branchify.integrations.hf` - Trainer-ready wrapper, callback and export for HF models.
* :mod:`branchify.integrations.lightning` - PyTorch Lightning callback (schedules, logged loss
  parts, resumable loss state, target export) and an optional ``LightningModule``.
"""
