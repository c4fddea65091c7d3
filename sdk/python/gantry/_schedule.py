"""`Cron`, `Period` and `Retries`, as Modal names them, each turned into the manifest's
form (docs/schedules.md, docs/functions.md)."""

from __future__ import annotations

from typing import Any, Dict, Union

from .exception import InvalidError


def seconds_text(seconds: float) -> str:
    """A humantime duration: whole seconds when they are whole, else milliseconds."""
    if seconds < 0:
        raise InvalidError(f"a duration cannot be negative ({seconds})")
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


class Schedule:
    def manifest(self) -> Dict[str, Any]:
        raise NotImplementedError


class Cron(Schedule):
    """`Cron("0 9 * * 1-5", timezone="Europe/Berlin")`: five fields, in UTC by default."""

    def __init__(self, cron_string: str, timezone: str = "UTC"):
        if not isinstance(cron_string, str) or len(cron_string.split()) not in (5, 6):
            raise InvalidError(f"Cron needs five fields like \"0 * * * *\", not {cron_string!r}")
        self.cron_string = cron_string
        self.timezone = timezone

    def manifest(self) -> Dict[str, Any]:
        return {"cron": self.cron_string, "timezone": self.timezone}

    def __repr__(self) -> str:
        return f"Cron({self.cron_string!r}, timezone={self.timezone!r})"


class Period(Schedule):
    """`Period(hours=1)`, `Period(seconds=30)`: every so long, from the deploy."""

    def __init__(self, *, days: float = 0, hours: float = 0, minutes: float = 0,
                 seconds: float = 0, weeks: float = 0, months: int = 0, years: int = 0):
        if months or years:
            raise InvalidError("Period(months=, years=) has no fixed length here; use Cron")
        total = (((weeks * 7 + days) * 24 + hours) * 60 + minutes) * 60 + seconds
        if total <= 0:
            raise InvalidError("a Period must be longer than zero")
        self.seconds = total

    def manifest(self) -> Dict[str, Any]:
        return {"period": seconds_text(self.seconds)}

    def __repr__(self) -> str:
        return f"Period(seconds={self.seconds})"


class Retries:
    """`Retries(max_retries=3, backoff_coefficient=2.0, initial_delay=1.0, max_delay=60.0)`:
    retry *n* waits `initial_delay × coefficient^(n-1)` seconds, at most `max_delay`."""

    def __init__(self, *, max_retries: int, backoff_coefficient: float = 2.0,
                 initial_delay: float = 1.0, max_delay: float = 60.0):
        if not 0 <= max_retries <= 10:
            raise InvalidError(f"max_retries must be 0 to 10, not {max_retries}")
        if not 1.0 <= backoff_coefficient <= 10.0:
            raise InvalidError(f"backoff_coefficient must be 1 to 10, not {backoff_coefficient}")
        if not 0 <= initial_delay <= 60:
            raise InvalidError(f"initial_delay must be 0 to 60 seconds, not {initial_delay}")
        if not 1 <= max_delay <= 60:
            raise InvalidError(f"max_delay must be 1 to 60 seconds, not {max_delay}")
        self.max_retries = max_retries
        self.backoff_coefficient = backoff_coefficient
        self.initial_delay = initial_delay
        self.max_delay = max_delay

    def manifest(self) -> Dict[str, Any]:
        return {
            "max_retries": self.max_retries,
            "backoff_coefficient": float(self.backoff_coefficient),
            "initial_delay": seconds_text(self.initial_delay),
            "max_delay": seconds_text(self.max_delay),
        }


def retries_manifest(retries: Union[int, Retries, None]) -> Any:
    if retries is None:
        return 0
    if isinstance(retries, bool) or not isinstance(retries, (int, Retries)):
        raise InvalidError(f"retries must be an int or gantry.Retries, not {retries!r}")
    if isinstance(retries, int):
        if not 0 <= retries <= 10:
            raise InvalidError(f"retries must be 0 to 10, not {retries}")
        return retries
    return retries.manifest()
