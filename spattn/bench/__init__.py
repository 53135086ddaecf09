"""Benchmarks: timing and memory harnesses whose results are JSON (see ``spattn bench``)."""

from .speed import SpeedConfig, format_speed_table, print_speed_table, run_speed, write_json
from .timing import time_call

__all__ = ["SpeedConfig", "run_speed", "format_speed_table", "print_speed_table", "time_call", "write_json"]
