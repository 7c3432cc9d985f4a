"""The extract stage (see ``diffeat.extract.run``)."""

from diffeat.extract.run import ExtractReport, SettingResult, extract

__all__ = ["ExtractReport", "SettingResult", "extract"]
