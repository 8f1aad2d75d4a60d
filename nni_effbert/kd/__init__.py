"""Knowledge distillation: the teacher (``teacher``), its output cache (``cache``), the KD
losses (``losses``), the training and evaluation loop with the loaded experiment (``train``),
and CPU latency measurement (``latency``). Nothing here knows about NNI."""
