"""`policyopt inspect`: what a GRPO run records of a few groups per step (``record``), and the
self-contained HTML page drawn from it (``page``)."""

from .record import RECORDS_FILE, InspectConfig, inspected_update, read_records

__all__ = ["RECORDS_FILE", "InspectConfig", "inspected_update", "read_records"]
