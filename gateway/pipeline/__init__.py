"""Samples to records: report by exception, clock stamping, the flush into the buffer."""
