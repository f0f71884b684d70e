"""Domain data: loading (``loading``) and Great Expectations validation (``validation``)."""

from l3m.data.loading import DataError, LoadedDomain, load_domain, read_raw

__all__ = ["DataError", "LoadedDomain", "load_domain", "read_raw"]
