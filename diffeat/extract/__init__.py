"""The extract stage (see ``diffeat.extract.run``); its options are ``ExtractConfig``."""

from diffeat.extract.config import ExtractConfig
from diffeat.extract.results import ExtractReport, SettingResult
from diffeat.extract.run import extract, run_extract

__all__ = ["ExtractConfig", "ExtractReport", "SettingResult", "extract", "run_extract"]
