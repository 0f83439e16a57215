"""Typed, validated training configs loaded from plain Python files."""

from tuneforge.config.load import load_config, parse_cfg_options
from tuneforge.config.schema import Config

__all__ = ["Config", "load_config", "parse_cfg_options"]
