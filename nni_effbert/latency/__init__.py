"""Latency: measuring a student end to end (:mod:`.measure`), the per-device lookup table that
predicts it and its check against measurements (:mod:`.table`)."""
